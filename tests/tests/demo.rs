//! The README's main command, `neutrino demo`, as a user runs it: real processes on
//! the ports of examples/mesh.yaml, a mixed workload, and a report in which heavy work
//! went only where it fits, every hop over mTLS.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use neutrino_tests::bin;

#[test]
fn the_demo_sends_heavy_work_only_where_it_fits() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(bin("neutrino"))
        .args(["demo", "--mesh-file", "examples/mesh.yaml", "--requests", "200"])
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
}
