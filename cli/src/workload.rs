//! The demo's client: a mixed workload of light and heavy OpenAPI operations sent
//! through the client's sidecar, and the per-backend report. The costs and capacities
//! it reports come from the sidecar's own config, so the report shows what the mesh
//! knew when it chose.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use tokio::sync::Mutex;

/// (operation id, method, path, simulated work in ms, share of requests in %).
const MIX: [(&str, &str, &str, u64, u32); 4] = [
    ("getOrder", "GET", "/orders/{id}", 10, 60),
    ("createOrder", "POST", "/orders", 40, 25),
    ("renderInvoice", "POST", "/orders/{id}/render", 150, 10),
    ("forecastDemand", "POST", "/orders/{id}/forecast", 100, 5),
];

const CONCURRENCY: usize = 16;

#[derive(Debug, Default)]
struct Stats {
    by_op: BTreeMap<&'static str, u64>,
    latencies_ms: Vec<f64>,
    /// Requested cost times the time the backend worked on it, per dimension
    /// (cpu-millis x s, bytes x s, gpu x s). Time queued in the sidecar is not load.
    cost_seconds: [f64; 3],
}

fn cost_of(dump: &Value, op: &str) -> [f64; 3] {
    let routes = dump["resources"]["Service"]["shop/orders"]["body"]["Service"]["routes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let r = routes.iter().find(|r| r["operation_id"] == op);
    let c = r.map(|r| r["cost"].clone()).unwrap_or(Value::Null);
    [
        c["cpu_millis"].as_f64().unwrap_or(0.0),
        c["memory_bytes"].as_f64().unwrap_or(0.0),
        c["gpu"].as_f64().unwrap_or(0.0),
    ]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn run(dump: &Value, proxy: &str, total: usize) -> anyhow::Result<String> {
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy).context("proxy URL")?)
        .pool_max_idle_per_host(CONCURRENCY)
        .build()?;
    let stats: Arc<Mutex<BTreeMap<String, Stats>>> = Arc::default();
    let refused: Arc<Mutex<BTreeMap<&'static str, u64>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let (client, stats, refused) = (client.clone(), Arc::clone(&stats), Arc::clone(&refused));
        let costs: BTreeMap<&str, [f64; 3]> = MIX.iter().map(|m| (m.0, cost_of(dump, m.0))).collect();
        tasks.push(tokio::spawn(async move {
            // A fixed, per-worker sequence: the same mix on every run.
            let mut seed = 0x9E37_79B9_u64.wrapping_mul(worker as u64 + 1);
            for i in (worker..total).step_by(CONCURRENCY) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let roll = ((seed >> 33) % 100) as u32;
                let mut acc = 0;
                let (op, method, path, work, _) = *MIX.iter().find(|m| {
                    acc += m.4;
                    roll < acc
                })?;
                let url = format!("http://orders.shop{}?work-ms={work}", path.replace("{id}", &i.to_string()));
                let req = if method == "GET" { client.get(&url) } else { client.post(&url) };
                let t0 = Instant::now();
                let Ok(resp) = req.timeout(Duration::from_secs(30)).send().await else { continue };
                let status = resp.status();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let secs = t0.elapsed().as_secs_f64();
                if status.as_u16() == 503 {
                    *refused.lock().await.entry(op).or_default() += 1;
                    continue;
                }
                let backend = body["backend"].as_str().unwrap_or("?").to_string();
                let mut s = stats.lock().await;
                let e = s.entry(backend).or_default();
                *e.by_op.entry(op).or_default() += 1;
                e.latencies_ms.push(secs * 1000.0);
                for (d, c) in costs[op].iter().enumerate() {
                    e.cost_seconds[d] += c * work as f64 / 1000.0;
                }
            }
            Some(())
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let (stats, refused) = (stats.lock().await, refused.lock().await);
    Ok(report(dump, &stats, &refused, wall))
}

fn report(dump: &Value, stats: &BTreeMap<String, Stats>, refused: &BTreeMap<&str, u64>, wall: f64) -> String {
    let endpoints = dump["resources"]["Endpoints"]["shop/orders"]["body"]["Endpoints"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<14} {:>4} {:>6} {:>3}  {:>5}  {:>9} {:>11} {:>13} {:>14}  {:>6}  {:>7} {:>7}",
        "backend",
        "cpu",
        "memory",
        "gpu",
        "total",
        "getOrder",
        "createOrder",
        "renderInvoice",
        "forecastDemand",
        "util",
        "p50 ms",
        "p99 ms"
    );
    for ep in &endpoints {
        let name = ep["pod"].as_str().unwrap_or("?");
        let cap = &ep["capacity"];
        let caps = [
            cap["cpu_millis"].as_f64().unwrap_or(0.0),
            cap["memory_bytes"].as_f64().unwrap_or(0.0),
            cap["gpu"].as_f64().unwrap_or(0.0),
        ];
        let empty = Stats::default();
        let s = stats.get(name).unwrap_or(&empty);
        let util = (0..3).filter(|d| caps[*d] > 0.0).map(|d| s.cost_seconds[d] / (caps[d] * wall)).fold(0.0, f64::max);
        let mut lat = s.latencies_ms.clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        let n = |op: &str| s.by_op.get(op).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<14} {:>4} {:>6} {:>3}  {:>5}  {:>9} {:>11} {:>13} {:>14}  {:>5.0}%  {:>7.1} {:>7.1}",
            name,
            caps[0] / 1000.0,
            format!("{}Gi", caps[1] / f64::from(1u32 << 30)),
            caps[2],
            lat.len(),
            n("getOrder"),
            n("createOrder"),
            n("renderInvoice"),
            n("forecastDemand"),
            util * 100.0,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
    let total_refused: u64 = refused.values().sum();
    let _ = writeln!(
        out,
        "\nutil: requested cost x work time / capacity over the run ({wall:.1} s), dominant resource; latency as the client saw it, queueing included"
    );
    if total_refused > 0 {
        let list: Vec<String> = refused.iter().map(|(op, n)| format!("{op} {n}")).collect();
        let _ = writeln!(out, "refused with 503 (no backend had room within the queue timeout): {}", list.join(", "));
    }
    for op in ["renderInvoice", "forecastDemand"] {
        let where_: Vec<&str> =
            stats.iter().filter(|(_, s)| s.by_op.get(op).copied().unwrap_or(0) > 0).map(|(b, _)| b.as_str()).collect();
        let _ =
            writeln!(out, "{op} ran on: {}", if where_.is_empty() { "nowhere".to_string() } else { where_.join(", ") });
    }
    out
}
