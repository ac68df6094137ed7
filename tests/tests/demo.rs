//! The README's main command, `neutrino demo`, as a user runs it: real processes on
//! the ports of examples/mesh.yaml, a mixed workload, and a report in which heavy work
//! went only where it fits, every hop over mTLS, and the trace of one heavy request
//! (caught by the demo's own OTLP receiver) printed and written as Jaeger JSON.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::process::Command;

use neutrino_tests::bin;
use serde_json::Value;

#[test]
fn the_demo_sends_heavy_work_only_where_it_fits() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let dir = tempfile::tempdir().unwrap();
    let trace_file = dir.path().join("out/traces.json");
    let out = Command::new(bin("neutrino"))
        .args(["demo", "--mesh-file", "examples/mesh.yaml", "--requests", "200", "--trace-file"])
        .arg(&trace_file)
        .current_dir(root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("renderInvoice ran on: orders-large\n"), "{text}");
    assert!(text.contains("forecastDemand ran on: orders-large\n"), "{text}");
    for backend in ["orders-small", "orders-medium", "orders-large"] {
        let line =
            text.lines().find(|l| l.starts_with(backend)).unwrap_or_else(|| panic!("no row for {backend}:\n{text}"));
        let total: u64 = line.split_whitespace().nth(4).and_then(|t| t.parse().ok()).unwrap_or(0);
        assert!(total > 0, "{backend} served nothing:\n{text}");
    }
    // Every hop was mesh mTLS: verified handshakes, no plaintext reached a backend.
    let mtls = text.lines().find(|l| l.starts_with("mTLS:")).unwrap_or_else(|| panic!("no mTLS line:\n{text}"));
    let handshakes: u64 = mtls.split("made ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap_or(0);
    assert!(handshakes > 0, "{mtls}");
    assert!(mtls.contains("plaintext connections accepted: 0,"), "{mtls}");

    // The waterfall: a CLIENT span of the client's sidecar, and under it (indented deeper)
    // a SERVER span of a backend's sidecar, in one trace.
    let lines: Vec<&str> = text.lines().collect();
    let title = lines
        .iter()
        .position(|l| l.starts_with("trace ") && l.contains(" spans, "))
        .unwrap_or_else(|| panic!("no trace waterfall:\n{text}"));
    let trace_id = lines[title].split(' ').nth(1).unwrap().to_string();
    assert_eq!(trace_id.len(), 32, "{}", lines[title]);
    let rows: Vec<&str> = lines[title + 1..].iter().take_while(|l| l.starts_with("  ")).copied().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let first_word = |l: &str| l.split_whitespace().next().unwrap_or("").to_string();
    let client = rows
        .iter()
        .position(|l| first_word(l) == "client" && l.split_whitespace().nth(1) == Some("CLIENT"))
        .unwrap_or_else(|| panic!("no CLIENT row of the client's sidecar:\n{}", rows.join("\n")));
    let server = rows[client + 1..]
        .iter()
        .take_while(|l| indent(l) > indent(rows[client]))
        .find(|l| first_word(l).starts_with("orders-") && l.split_whitespace().nth(1) == Some("SERVER"))
        .unwrap_or_else(|| panic!("no SERVER row of a backend under the CLIENT row:\n{}", rows.join("\n")));
    assert!(["orders-small", "orders-medium", "orders-large"].contains(&first_word(server).as_str()), "{server}");
    assert!(rows[client].contains("endpoint 127.0.0.1:2808"), "{}", rows[client]);
    assert!(server.contains("caller=spiffe://cluster.local/ns/shop/sa/client"), "{server}");
    assert!(text.contains(&trace_file.display().to_string()), "the file is named:\n{text}");

    // The file: Jaeger JSON, every reference inside its own trace, spans of both sidecars.
    let json: Value = serde_json::from_slice(&std::fs::read(&trace_file).unwrap()).unwrap();
    let traces = json["data"].as_array().unwrap();
    assert!(!traces.is_empty());
    let mut kinds_by_pod: HashMap<String, HashSet<String>> = HashMap::new();
    let mut shown = None;
    for t in traces {
        let id = t["traceID"].as_str().unwrap();
        let spans = t["spans"].as_array().unwrap();
        let ids: HashSet<&str> = spans.iter().map(|s| s["spanID"].as_str().unwrap()).collect();
        let mut pods = HashSet::new();
        for s in spans {
            assert_eq!(s["traceID"], id);
            assert!(s["startTime"].as_u64().unwrap() > 1_600_000_000_000_000, "µs since the epoch: {s}");
            for r in s["references"].as_array().unwrap() {
                assert_eq!(r["traceID"], id, "{s}");
                assert!(ids.contains(r["spanID"].as_str().unwrap()), "reference to a span not in its trace: {s}");
            }
            let process = &t["processes"][s["processID"].as_str().unwrap()];
            assert!(process["serviceName"].is_string(), "{t}");
            let tag = |tags: &Value, key: &str| -> Option<String> {
                let t = tags.as_array()?.iter().find(|t| t["key"] == key)?;
                t["value"].as_str().map(str::to_string)
            };
            let pod = tag(&process["tags"], "k8s.pod.name").unwrap_or_default();
            let kind = tag(&s["tags"], "span.kind").unwrap_or_default();
            pods.insert(pod.clone());
            kinds_by_pod.entry(pod).or_default().insert(kind);
        }
        if id == trace_id {
            shown = Some(pods);
        }
    }
    let shown = shown.unwrap_or_else(|| panic!("the trace shown, {trace_id}, is not in the file"));
    assert!(shown.contains("client") && shown.iter().any(|p| p.starts_with("orders-")), "{shown:?}");
    assert!(kinds_by_pod.get("client").is_some_and(|k| k.contains("client")), "{kinds_by_pod:?}");
    assert!(
        ["orders-small", "orders-medium", "orders-large"]
            .iter()
            .any(|p| kinds_by_pod.get(*p).is_some_and(|k| k.contains("server"))),
        "{kinds_by_pod:?}"
    );
}
