//! `neutrino stat` and `neutrino top`: live views of the mesh's traffic from the proxies'
//! Prometheus metrics.
//!
//! Each view scrapes the proxies' `/metrics` twice (or every interval, for `top`): given
//! by address, or every meshed pod of a cluster through the API server (`scrape.rs`).
//! The difference, over the proxies seen both times, gives per service and operation the rate, success rate (not 5xx and
//! not failed) and p50/p99 latency (interpolated in the histogram's buckets), plus each
//! endpoint's utilization and capacity as the proxies estimate them. Outbound counts are
//! used: every request is counted once, at its caller's proxy. The arithmetic is pure
//! (`table`, `quantile`); only `scrape` does IO. It must not change anything it reads.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use prometheus_parse::{Sample, Value};

pub mod scrape;

pub use scrape::{Scrapes, Targets};

/// Counters of one (service, operation), summed over proxies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpCounts {
    /// By status class ("2xx", "5xx", "error", ...).
    pub by_class: BTreeMap<String, f64>,
    /// Cumulative histogram: upper bound (as written) -> count.
    pub buckets: BTreeMap<String, f64>,
}

/// One line of the operations table.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRow {
    pub service: String,
    pub operation: String,
    pub requests: f64,
    pub rps: f64,
    /// Share of requests answered without a 5xx or a failure; None without requests.
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One line of the endpoints table.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRow {
    pub service: String,
    pub endpoint: String,
    pub pod: String,
    /// The highest estimate among the proxies (0..1).
    pub utilization: f64,
    pub cpu_millis: f64,
    pub gpu: f64,
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => Some(*x),
        _ => None,
    }
}

fn label<'a>(s: &'a Sample, k: &str) -> &'a str {
    s.labels.get(k).unwrap_or("")
}

/// Outbound counters by (service, operation), summed over all scrapes.
pub fn counts<'a>(scrapes: impl IntoIterator<Item = &'a Vec<Sample>>) -> BTreeMap<(String, String), OpCounts> {
    let mut out: BTreeMap<(String, String), OpCounts> = BTreeMap::new();
    for s in scrapes.into_iter().flatten() {
        if label(s, "direction") != "outbound" {
            continue;
        }
        let key = (label(s, "service").to_string(), label(s, "operation").to_string());
        match (s.metric.as_str(), &s.value) {
            ("neutrino_proxy_requests_total", v) => {
                if let Some(n) = number(v) {
                    *out.entry(key).or_default().by_class.entry(label(s, "status_class").to_string()).or_default() += n;
                }
            }
            ("neutrino_proxy_request_duration_seconds", Value::Histogram(h)) => {
                let c = out.entry(key).or_default();
                for b in h {
                    *c.buckets.entry(format!("{}", b.less_than)).or_default() += b.count;
                }
            }
            _ => {}
        }
    }
    out
}

/// The `q` quantile (0..1) of a cumulative histogram, interpolated linearly within the
/// bucket it falls in (as Prometheus' histogram_quantile does); None when empty. A
/// quantile in the +Inf bucket is reported as the largest finite bound.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let frac = if in_bucket > 0.0 { (rank - lower.1) / in_bucket } else { 1.0 };
            return Some(lower.0 + (bound - lower.0) * frac);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

/// The operations table from the counters before and after `secs` seconds.
pub fn table(
    before: &BTreeMap<(String, String), OpCounts>,
    after: &BTreeMap<(String, String), OpCounts>,
    secs: f64,
) -> Vec<OpRow> {
    let empty = OpCounts::default();
    after
        .iter()
        .map(|((service, operation), now)| {
            let then = before.get(&(service.clone(), operation.clone())).unwrap_or(&empty);
            let delta = |m: &BTreeMap<String, f64>, k: &str, prev: &BTreeMap<String, f64>| {
                (m.get(k).copied().unwrap_or(0.0) - prev.get(k).copied().unwrap_or(0.0)).max(0.0)
            };
            let requests: f64 = now.by_class.keys().map(|k| delta(&now.by_class, k, &then.by_class)).sum();
            let failed = delta(&now.by_class, "5xx", &then.by_class) + delta(&now.by_class, "error", &then.by_class);
            let mut buckets: Vec<(f64, f64)> = now
                .buckets
                .keys()
                .filter_map(|k| Some((k.parse::<f64>().ok()?, delta(&now.buckets, k, &then.buckets))))
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            OpRow {
                service: service.clone(),
                operation: if operation.is_empty() { "(no route)".into() } else { operation.clone() },
                requests,
                rps: if secs > 0.0 { requests / secs } else { 0.0 },
                success: (requests > 0.0).then(|| (requests - failed) / requests),
                p50_ms: quantile(&buckets, 0.5).map(|s| s * 1e3),
                p99_ms: quantile(&buckets, 0.99).map(|s| s * 1e3),
            }
        })
        .collect()
}

/// The endpoints table: the highest utilization estimate among proxies, and capacity.
pub fn endpoints<'a>(scrapes: impl IntoIterator<Item = &'a Vec<Sample>>) -> Vec<EndpointRow> {
    let mut rows: BTreeMap<(String, String), EndpointRow> = BTreeMap::new();
    for s in scrapes.into_iter().flatten() {
        let key = (label(s, "service").to_string(), label(s, "endpoint").to_string());
        let Some(v) = number(&s.value) else { continue };
        let row = || EndpointRow {
            service: key.0.clone(),
            endpoint: key.1.clone(),
            pod: label(s, "pod").to_string(),
            utilization: 0.0,
            cpu_millis: 0.0,
            gpu: 0.0,
        };
        match s.metric.as_str() {
            "neutrino_proxy_endpoint_utilization" => {
                let r = rows.entry(key.clone()).or_insert_with(row);
                r.utilization = r.utilization.max(v);
            }
            "neutrino_proxy_endpoint_capacity" => {
                let r = rows.entry(key.clone()).or_insert_with(row);
                match label(s, "resource") {
                    "cpu_millis" => r.cpu_millis = v,
                    "gpu" => r.gpu = v,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    rows.into_values().collect()
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |ms| if ms < 10.0 { format!("{ms:.2}") } else { format!("{ms:.0}") })
}

/// Renders both tables as text.
pub fn render(ops: &[OpRow], eps: &[EndpointRow], limit: usize) -> String {
    let mut out = format!(
        "{:<24} {:<20} {:>8} {:>8} {:>9} {:>9}\n",
        "SERVICE", "OPERATION", "RPS", "SUCCESS", "P50 ms", "P99 ms"
    );
    for r in ops.iter().take(limit) {
        let success = r.success.map_or("-".into(), |s| format!("{:.1}%", s * 100.0));
        out.push_str(&format!(
            "{:<24} {:<20} {:>8.1} {:>8} {:>9} {:>9}\n",
            r.service,
            r.operation,
            r.rps,
            success,
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms)
        ));
    }
    out.push_str(&format!(
        "\n{:<24} {:<22} {:<12} {:>6} {:>9} {:>4}\n",
        "SERVICE", "ENDPOINT", "POD", "UTIL", "CPU m", "GPU"
    ));
    for e in eps {
        out.push_str(&format!(
            "{:<24} {:<22} {:<12} {:>5.0}% {:>9.0} {:>4.0}\n",
            e.service,
            e.endpoint,
            e.pod,
            e.utilization * 100.0,
            e.cpu_millis,
            e.gpu
        ));
    }
    out
}

/// The counters of the proxies present in both scrapes, before and after: a proxy that
/// appeared or vanished between them (a pod started or gone, a scrape that failed) would
/// otherwise count its whole history as one window's traffic, or as a drop.
pub fn paired(before: &Scrapes, after: &Scrapes) -> (Counts, Counts) {
    let both = |a: &'_ Scrapes, b: &Scrapes| counts(a.iter().filter(|(k, _)| b.contains_key(*k)).map(|(_, v)| v));
    (both(before, after), both(after, before))
}

/// Counters by (service, operation).
pub type Counts = BTreeMap<(String, String), OpCounts>;

async fn round(targets: &Targets) -> Result<Scrapes> {
    let round = scrape::round(targets).await?;
    for skipped in &round.skipped {
        eprintln!("skipped {skipped}");
    }
    if matches!(targets, Targets::Cluster { .. }) && round.scrapes.is_empty() {
        eprintln!(
            "no meshed pod answered ({} found); check the namespace (-n, -A) and that pods carry the neutrino-proxy \
             container",
            round.pods
        );
    }
    Ok(round.scrapes)
}

/// `neutrino stat`: two scrapes `window` apart, one report.
pub async fn stat(targets: &Targets, window: Duration) -> Result<()> {
    let before = round(targets).await?;
    tokio::time::sleep(window).await;
    let now = round(targets).await?;
    let (then, after) = paired(&before, &now);
    let ops = table(&then, &after, window.as_secs_f64());
    print!("{}", render(&ops, &endpoints(now.values()), usize::MAX));
    Ok(())
}

/// `neutrino top`: the busiest routes, refreshed every `interval` (until Ctrl-C, or
/// `iterations` times).
pub async fn top(targets: &Targets, interval: Duration, limit: usize, iterations: Option<u64>) -> Result<()> {
    let mut before = round(targets).await?;
    let mut n = 0u64;
    loop {
        tokio::time::sleep(interval).await;
        let now = round(targets).await?;
        let (then, after) = paired(&before, &now);
        let mut ops = table(&then, &after, interval.as_secs_f64());
        ops.sort_by(|a, b| b.rps.total_cmp(&a.rps));
        // Clear the screen and home the cursor, then redraw.
        print!("\x1b[2J\x1b[H{}", render(&ops, &endpoints(now.values()), limit));
        before = now;
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_parse::Scrape;

    fn parse(text: &str) -> Vec<Sample> {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid").samples
    }

    const BEFORE: &str = "# TYPE neutrino_proxy_requests counter\n\
neutrino_proxy_requests_total{direction=\"outbound\",service=\"shop/orders\",operation=\"get\",status_class=\"2xx\"} 10\n\
neutrino_proxy_requests_total{direction=\"inbound\",service=\"shop/orders\",operation=\"get\",status_class=\"2xx\"} 999\n\
# TYPE neutrino_proxy_request_duration_seconds histogram\n\
neutrino_proxy_request_duration_seconds_bucket{le=\"0.001\",direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 5\n\
neutrino_proxy_request_duration_seconds_bucket{le=\"0.01\",direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 10\n\
neutrino_proxy_request_duration_seconds_bucket{le=\"+Inf\",direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 10\n\
neutrino_proxy_request_duration_seconds_sum{direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 0.05\n\
neutrino_proxy_request_duration_seconds_count{direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 10\n";

    const AFTER: &str = "# TYPE neutrino_proxy_requests counter\n\
neutrino_proxy_requests_total{direction=\"outbound\",service=\"shop/orders\",operation=\"get\",status_class=\"2xx\"} 100\n\
neutrino_proxy_requests_total{direction=\"outbound\",service=\"shop/orders\",operation=\"get\",status_class=\"5xx\"} 10\n\
# TYPE neutrino_proxy_request_duration_seconds histogram\n\
neutrino_proxy_request_duration_seconds_bucket{le=\"0.001\",direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 5\n\
neutrino_proxy_request_duration_seconds_bucket{le=\"0.01\",direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 110\n\
neutrino_proxy_request_duration_seconds_bucket{le=\"+Inf\",direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 110\n\
neutrino_proxy_request_duration_seconds_sum{direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 0.5\n\
neutrino_proxy_request_duration_seconds_count{direction=\"outbound\",service=\"shop/orders\",operation=\"get\"} 110\n\
# TYPE neutrino_proxy_endpoint_utilization gauge\n\
neutrino_proxy_endpoint_utilization{service=\"shop/orders\",endpoint=\"10.0.0.1:80\",pod=\"o-1\"} 0.25\n\
# TYPE neutrino_proxy_endpoint_capacity gauge\n\
neutrino_proxy_endpoint_capacity{service=\"shop/orders\",endpoint=\"10.0.0.1:80\",pod=\"o-1\",resource=\"cpu_millis\"} 2000\n";

    #[test]
    fn rates_success_and_latency_come_from_the_difference() {
        let before = counts(&[parse(BEFORE)]);
        let after_samples = parse(AFTER);
        let rows = table(&before, &counts(std::slice::from_ref(&after_samples)), 10.0);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.service.as_str(), r.operation.as_str()), ("shop/orders", "get"));
        assert_eq!(r.requests, 100.0, "90 more 2xx and 10 new 5xx; inbound ignored");
        assert_eq!(r.rps, 10.0);
        assert_eq!(r.success, Some(0.9));
        // All 100 new requests fell between 1 and 10 ms.
        assert!((r.p50_ms.expect("p50") - 5.5).abs() < 1e-9, "{r:?}");
        assert!((r.p99_ms.expect("p99") - 9.91).abs() < 1e-9, "{r:?}");
        let eps = endpoints(&[after_samples]);
        assert_eq!(eps.len(), 1);
        assert_eq!((eps[0].pod.as_str(), eps[0].utilization, eps[0].cpu_millis), ("o-1", 0.25, 2000.0));
    }

    #[test]
    fn quantiles_interpolate_and_handle_edges() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(quantile(&[(0.1, 10.0), (f64::INFINITY, 10.0)], 0.5), Some(0.05));
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 4.0)], 0.5), Some(0.1), "beyond the last bound");
    }

    #[test]
    fn the_render_lists_every_row() {
        let before = counts(&[parse(BEFORE)]);
        let after = parse(AFTER);
        let text = render(&table(&before, &counts(std::slice::from_ref(&after)), 10.0), &endpoints(&[after]), 10);
        assert!(text.contains("shop/orders") && text.contains("90.0%") && text.contains("o-1"), "{text}");
    }

    #[test]
    fn only_proxies_seen_in_both_scrapes_count() {
        let before: Scrapes = [("a".to_string(), parse(BEFORE))].into();
        // "b" appeared with 110 requests of history: not this window's traffic.
        let after: Scrapes = [("a".to_string(), parse(AFTER)), ("b".to_string(), parse(AFTER))].into();
        let (then, now) = paired(&before, &after);
        let rows = table(&then, &now, 10.0);
        assert_eq!(rows[0].requests, 100.0, "{rows:?}");
        // "a" gone (a failed scrape): nothing to compare, no negative or bogus rate.
        let (then, now) = paired(&after, &[("b".to_string(), parse(AFTER))].into());
        assert!(table(&then, &now, 10.0).iter().all(|r| r.requests == 0.0));
    }
}
