//! Renders a proxy's `/config_dump` for people. Pure formatting over the JSON.

use std::fmt::Write;

use anyhow::{Context, bail};
use serde_json::Value;

pub async fn fetch(admin: &str) -> anyhow::Result<Value> {
    let url = format!("http://{admin}/config_dump");
    let resp = reqwest::get(&url).await.with_context(|| format!("fetching {url}; is the proxy running?"))?;
    if !resp.status().is_success() {
        bail!("{url} answered {}", resp.status());
    }
    resp.json().await.with_context(|| format!("decoding {url}"))
}

fn quantity_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) { format!("{}", millis / 1000) } else { format!("{millis}m") }
}

fn quantity_mem(bytes: u64) -> String {
    const GI: u64 = 1 << 30;
    const MI: u64 = 1 << 20;
    if bytes >= GI && bytes.is_multiple_of(GI) {
        format!("{}Gi", bytes / GI)
    } else if bytes >= MI && bytes.is_multiple_of(MI) {
        format!("{}Mi", bytes / MI)
    } else {
        bytes.to_string()
    }
}

pub fn render(dump: &Value) -> String {
    let mut out = String::new();
    let stream = &dump["stream"];
    let _ = writeln!(
        out,
        "proxy config: generation {}, ready {}, source {} ({})",
        dump["generation"],
        dump["ready"],
        stream["control_plane"].as_str().unwrap_or("?"),
        stream["state"].as_str().unwrap_or("?")
    );
    let empty = serde_json::Map::new();
    let services = dump["resources"]["Service"].as_object().unwrap_or(&empty);
    for (name, entry) in services {
        let svc = &entry["body"]["Service"];
        let ports: Vec<String> = svc["ports"]
            .as_array()
            .map(|ps| ps.iter().map(|p| format!("{}->{}", p["port"], p["target_port"])).collect())
            .unwrap_or_default();
        let vips: Vec<&str> =
            svc["virtual_ips"].as_array().map(|v| v.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let _ = writeln!(
            out,
            "\nservice {name}  version {}  vip {}  ports {}",
            entry["version"].as_str().unwrap_or("?"),
            if vips.is_empty() { "-".to_string() } else { vips.join(",") },
            ports.join(",")
        );
        let eps = &dump["resources"]["Endpoints"][name.as_str()];
        let list = eps["body"]["Endpoints"]["endpoints"].as_array().cloned().unwrap_or_default();
        let _ = writeln!(out, "  endpoints (version {}):", eps["version"].as_str().unwrap_or("none"));
        let _ = writeln!(
            out,
            "    {:<22} {:<14} {:<8} {:>5} {:>7} {:>4}  ready",
            "address", "pod", "zone", "cpu", "memory", "gpu"
        );
        for e in &list {
            let cap = &e["capacity"];
            let _ = writeln!(
                out,
                "    {:<22} {:<14} {:<8} {:>5} {:>7} {:>4}  {}",
                format!("{}:{}", e["address"].as_str().unwrap_or("?"), e["port"]),
                e["pod"].as_str().unwrap_or(""),
                e["zone"].as_str().unwrap_or(""),
                quantity_cpu(cap["cpu_millis"].as_u64().unwrap_or(0)),
                quantity_mem(cap["memory_bytes"].as_u64().unwrap_or(0)),
                cap["gpu"].as_u64().unwrap_or(0),
                e["ready"].as_bool().unwrap_or(false)
            );
        }
        let loads = dump["resources"]["Capacity"][name.as_str()]["body"]["Capacity"]["loads"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0);
        let _ = writeln!(out, "  live load reports: {loads}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_services_endpoints_and_quantities() {
        let dump = serde_json::json!({
            "generation": 3, "ready": true,
            "stream": {"control_plane": "127.0.0.1:15010", "state": "connected"},
            "resources": {
                "Service": {"shop/orders": {"version": "abc", "body": {"Service": {
                    "virtual_ips": ["10.96.0.10"], "ports": [{"port": 80, "target_port": 8080}]}}}},
                "Endpoints": {"shop/orders": {"version": "def", "body": {"Endpoints": {"endpoints": [
                    {"address": "127.0.0.1", "port": 18081, "pod": "orders-0", "zone": "a", "ready": true,
                     "capacity": {"cpu_millis": 500, "memory_bytes": 536870912u64, "gpu": 1}}]}}}}
            }
        });
        let text = render(&dump);
        assert!(text.contains("service shop/orders  version abc  vip 10.96.0.10  ports 80->8080"), "{text}");
        assert!(text.contains("127.0.0.1:18081"), "{text}");
        assert!(text.contains(" 500m ") && text.contains("512Mi"), "{text}");
    }
}
