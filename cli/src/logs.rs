//! `neutrino logs`: reads the request log (a Redis Stream written by every proxy) and
//! prints the records that match the filters, newest last; `--follow` keeps printing.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};

/// Which records to show. Status is an exact code ("503") or a class ("5xx").
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub service: Option<String>,
    pub operation: Option<String>,
    pub status: Option<String>,
}

impl Filter {
    /// Pure: does a record with these fields pass?
    pub fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        let eq =
            |want: &Option<String>, key: &str| want.as_ref().is_none_or(|w| get(key).as_deref() == Some(w.as_str()));
        let status_ok = match &self.status {
            None => true,
            Some(s) if s.len() == 3 && s.ends_with("xx") => {
                get("status").is_some_and(|v| v.len() == 3 && v.as_bytes()[0] == s.as_bytes()[0])
            }
            Some(s) => get("status").as_deref() == Some(s.as_str()),
        };
        eq(&self.service, "service") && eq(&self.operation, "operation") && status_ok
    }
}

fn line(r: &StreamId) -> String {
    let f = |k: &str| r.get::<String>(k).unwrap_or_default();
    let mut out = String::new();
    let _ = write!(
        out,
        "{id:<17} {service:<22} {operation:<18} {status:>3} {latency:>9}  {endpoint} ({pod})  {reason}",
        id = r.id,
        service = f("service"),
        operation = if f("operation").is_empty() { "-".to_string() } else { f("operation") },
        status = f("status"),
        latency = format!("{:.1}ms", f("latency_us").parse::<f64>().unwrap_or(0.0) / 1000.0),
        endpoint = if f("endpoint").is_empty() { "-".to_string() } else { f("endpoint") },
        pod = f("endpoint_pod"),
        reason = f("reason"),
    );
    let trace = f("trace_id");
    if !trace.is_empty() {
        let _ = write!(out, "  trace {trace}");
    }
    out
}

pub async fn run(redis_url: &str, stream: &str, filter: &Filter, count: usize, follow: bool) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url).with_context(|| format!("bad Redis URL {redis_url}"))?;
    let mut con = tokio::time::timeout(Duration::from_secs(3), client.get_multiplexed_async_connection())
        .await
        .map_err(|_| anyhow::anyhow!("connecting to Redis at {redis_url} timed out; is it running?"))?
        .with_context(|| format!("connecting to Redis at {redis_url}; is it running?"))?;
    // The newest matching records: scan back far enough to find `count` of them.
    let scan = (count * 50).max(1000);
    let reply: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(scan)
        .query_async(&mut con)
        .await
        .with_context(|| format!("reading stream {stream}"))?;
    let mut last_id = reply.ids.first().map(|r| r.id.clone()).unwrap_or_else(|| "$".to_string());
    let mut shown: Vec<&StreamId> = reply.ids.iter().filter(|r| filter.matches(|k| r.get(k))).take(count).collect();
    shown.reverse();
    for r in shown {
        println!("{}", line(r));
    }
    if !follow {
        return Ok(());
    }
    loop {
        let reply: StreamReadReply = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(2000)
            .arg("COUNT")
            .arg(500)
            .arg("STREAMS")
            .arg(stream)
            .arg(&last_id)
            .query_async(&mut con)
            .await
            .with_context(|| format!("following stream {stream}"))?;
        for key in reply.keys {
            for r in key.ids {
                last_id.clone_from(&r.id);
                if filter.matches(|k| r.get(k)) {
                    println!("{}", line(&r));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn rec(service: &str, op: &str, status: &str) -> HashMap<String, String> {
        [("service", service), ("operation", op), ("status", status)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_by_service_operation_and_status_or_class() {
        let r = rec("shop/orders", "renderInvoice", "503");
        let get = |k: &str| r.get(k).cloned();
        assert!(Filter::default().matches(get));
        let f = |s: Option<&str>, o: Option<&str>, st: Option<&str>| Filter {
            service: s.map(str::to_string),
            operation: o.map(str::to_string),
            status: st.map(str::to_string),
        };
        assert!(f(Some("shop/orders"), None, Some("5xx")).matches(get));
        assert!(f(None, Some("renderInvoice"), Some("503")).matches(get));
        assert!(!f(None, None, Some("2xx")).matches(get));
        assert!(!f(Some("shop/users"), None, None).matches(get));
        assert!(!f(None, Some("getOrder"), None).matches(get));
    }
}
