//! Endpoints and proxies coming and going: a removed endpoint finishes what it has in
//! flight, and a proxy told to stop (SIGTERM) drains its inbound connections while its
//! outbound side keeps working.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use neutrino_tests::backend::Backend;
use neutrino_tests::*;

async fn curl_code(args: Vec<String>) -> u16 {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "20", "-w", "%{http_code}"])
            .args(&args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
    })
    .await
    .unwrap()
}

fn yaml(ports: &[u16]) -> String {
    let mut y = String::from("services:\n  - name: web\n    ports: [{port: 80, protocol: http}]\n    endpoints:\n");
    for p in ports {
        y.push_str(&format!("      - {{address: 127.0.0.1, port: {p}, capacity: {{cpu: 2, memory: 1Gi}}}}\n"));
    }
    y
}

#[tokio::test]
async fn a_removed_endpoint_finishes_its_in_flight_requests() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let mesh = MeshFile::new(&yaml(&[a.port]));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    let out = proxy.outbound;
    let slow = tokio::spawn(curl_code(vec![
        "-x".into(),
        format!("http://127.0.0.1:{out}"),
        "http://web.default/delay/1500".into(),
    ]));
    wait_for("the slow request to reach a", Duration::from_secs(5), || async {
        anyhow::ensure!(a.served() == 1, "not yet");
        Ok(())
    })
    .await;
    // Replace a by b while the request is in flight.
    mesh.write(&yaml(&[b.port]));
    wait_for("the proxy to drop endpoint a", Duration::from_secs(5), || async {
        let d = proxy.dump().await;
        let eps = d["resources"]["Endpoints"]["default/web"]["body"]["Endpoints"]["endpoints"].clone();
        anyhow::ensure!(eps[0]["port"] == b.port && eps.as_array().map(Vec::len) == Some(1), "{eps}");
        Ok(())
    })
    .await;
    assert!(!slow.is_finished(), "the change must land while the request is in flight");
    let fresh = curl_code(vec!["-x".into(), format!("http://127.0.0.1:{out}"), "http://web.default/new".into()]).await;
    assert_eq!(fresh, 200);
    assert_eq!(b.served(), 1, "new requests go to b");
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request on a completed");
}

#[tokio::test]
async fn sigterm_drains_inbound_and_keeps_outbound_until_done() {
    let app = Backend::start("app").await;
    let mesh = MeshFile::new(&yaml(&[app.port]));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let app_addr = format!("127.0.0.1:{}", app.port);
    let mut proxy = Proxy::start_with(cp.grpc, &["--inbound-app-addr", &app_addr, "--drain-timeout-secs", "10"]);
    proxy.wait_ready().await;
    let (inbound, outbound) = (proxy.inbound, proxy.outbound);

    // A caller's pooled keep-alive connection, idle after one request: drain must close
    // it rather than wait the whole drain timeout for it.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", inbound)).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        idle.write_all(b"GET /warm HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    // A slow request arrives for this pod.
    let slow = tokio::spawn(curl_code(vec![format!("http://127.0.0.1:{inbound}/delay/1500")]));
    wait_for("the slow request to reach the app", Duration::from_secs(5), || async {
        anyhow::ensure!(app.served() == 2, "not yet");
        Ok(())
    })
    .await;
    proxy.proc.terminate();

    wait_for("/ready to report the drain", Duration::from_secs(5), || async {
        anyhow::ensure!(proxy.ready_code().await == 503, "still ready");
        Ok(())
    })
    .await;
    wait_for("new inbound connections to be refused", Duration::from_secs(5), || async {
        anyhow::ensure!(tokio::net::TcpStream::connect(("127.0.0.1", inbound)).await.is_err(), "still accepting");
        Ok(())
    })
    .await;
    // The app can still call out while it finishes.
    let out =
        curl_code(vec!["-x".into(), format!("http://127.0.0.1:{outbound}"), "http://web.default/during-drain".into()])
            .await;
    assert_eq!(out, 200);
    assert!(!slow.is_finished(), "the drain must be observed while the request is in flight");
    assert_eq!(slow.await.unwrap(), 200, "the in-flight inbound request completed");
    // Well before the 10 s drain timeout: the idle keep-alive connection was closed.
    let status = tokio::task::spawn_blocking(move || {
        let s = proxy.proc.wait_exit(Duration::from_secs(4));
        (s, proxy)
    })
    .await
    .unwrap()
    .0;
    assert!(status.is_some_and(|s| s.success()), "the proxy exits cleanly once drained: {status:?}");
    drop(idle);
}
