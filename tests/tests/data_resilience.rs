//! Faults on the data path, end to end: backends killed mid-run, a control plane
//! restarted mid-run, a backend that fails every request, and route timeouts. Real
//! processes (the backends that die are real `python3 -m http.server` processes) and a
//! real client (curl through the proxy).

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use neutrino_tests::backend::{Backend, Mode};
use neutrino_tests::*;

/// curl through the proxy; the status of each URL (bodies discarded).
async fn curl(proxy_port: u16, args: Vec<String>) -> Vec<u16> {
    tokio::task::spawn_blocking(move || {
        // `-o` applies to one URL: give each URL its own.
        let args: Vec<String> = args
            .into_iter()
            .flat_map(|a| if a.starts_with("http") { vec!["-o".into(), "/dev/null".into(), a] } else { vec![a] })
            .collect();
        let out = Command::new("curl")
            .args(["-s", "--max-time", "20", "-x", &format!("http://127.0.0.1:{proxy_port}")])
            .args(["-w", "%{http_code}\\n"])
            .args(&args)
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse().unwrap_or(0)).collect()
    })
    .await
    .unwrap()
}

/// A real HTTP server process that can be killed: python's http.server, which logs
/// one line per request to `log`.
fn python_backend(port: u16, log: &std::path::Path) -> std::process::Child {
    Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("python3 runs")
}

fn requests_logged(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log).map(|s| s.matches("\"GET ").count()).unwrap_or(0)
}

async fn wait_listening(port: u16) {
    wait_for("a backend to listen", Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        Ok(())
    })
    .await;
}

fn mesh_yaml(ports: &[u16], extra: &str) -> String {
    let mut y = String::from("services:\n  - name: web\n    ports: [{port: 80, protocol: http}]\n");
    y.push_str(extra);
    y.push_str("    endpoints:\n");
    for p in ports {
        y.push_str(&format!("      - {{address: 127.0.0.1, port: {p}, capacity: {{cpu: 2, memory: 1Gi}}}}\n"));
    }
    y
}

#[tokio::test]
async fn no_idempotent_request_fails_when_a_backend_is_killed_mid_run() {
    let ports = [free_port(), free_port(), free_port()];
    let logs = tempfile::tempdir().unwrap();
    let log_of = |i: usize| logs.path().join(format!("backend-{i}.log"));
    let mut procs: Vec<_> = ports.iter().enumerate().map(|(i, p)| python_backend(*p, &log_of(i))).collect();
    for p in ports {
        wait_listening(p).await;
    }
    let mesh = MeshFile::new(&mesh_yaml(&ports, ""));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;

    let urls: Vec<String> = (0..400).map(|_| "http://web.default/".to_string()).collect();
    let run = tokio::spawn(curl(proxy.outbound, urls));
    // Kill one backend once traffic is flowing through it.
    wait_for("backend 1 to serve some requests", Duration::from_secs(10), || async {
        anyhow::ensure!(requests_logged(&log_of(1)) >= 5, "not yet");
        Ok(())
    })
    .await;
    procs[1].kill().unwrap();
    procs[1].wait().unwrap();
    let served_before_kill = requests_logged(&log_of(1));
    assert!(!run.is_finished(), "the kill must happen mid-run");
    let codes = run.await.unwrap();
    assert!(served_before_kill < 400);
    assert_eq!(codes.len(), 400);
    let failed: Vec<_> = codes.iter().filter(|c| **c != 200).collect();
    assert!(failed.is_empty(), "{} of 400 failed: {failed:?}", failed.len());
    for p in procs.iter_mut() {
        let _ = p.kill();
        let _ = p.wait();
    }
}

#[tokio::test]
async fn requests_keep_flowing_while_the_control_plane_restarts() {
    let backends = [Backend::start("a").await, Backend::start("b").await];
    let ports: Vec<u16> = backends.iter().map(|b| b.port).collect();
    let mesh = MeshFile::new(&mesh_yaml(&ports, ""));
    let mut cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;

    // Each request takes 5 ms at the backend: the run outlasts the restart.
    let urls: Vec<String> = (0..600).map(|_| "http://web.default/delay/5".to_string()).collect();
    let run = tokio::spawn(curl(proxy.outbound, urls));
    cp.proc.kill();
    wait_for("the proxy to lose its control plane", Duration::from_secs(10), || async {
        let d = proxy.dump().await;
        anyhow::ensure!(d["stream"]["state"] != "connected", "still connected");
        Ok(())
    })
    .await;
    cp.restart();
    assert!(!run.is_finished(), "the restart must happen mid-run");
    let codes = run.await.unwrap();
    assert_eq!(codes.len(), 600);
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    wait_for("the proxy to reconnect", Duration::from_secs(20), || async {
        let d = proxy.dump().await;
        anyhow::ensure!(d["stream"]["connects"] == 2, "{}", d["stream"]);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_failing_backend_is_ejected_and_its_failures_retried_elsewhere() {
    let good = Backend::start("good").await;
    let bad = Backend::start_with("bad", Mode::Failing).await;
    let mesh = MeshFile::new(&mesh_yaml(&[good.port, bad.port], ""));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;

    let urls: Vec<String> = (0..200).map(|i| format!("http://web.default/x/{i}")).collect();
    let codes = curl(proxy.outbound, urls).await;
    assert!(codes.iter().all(|c| *c == 200), "GETs are retried on the good backend: {codes:?}");
    // Ejected after five failures in a row: it saw a handful of requests, not half.
    assert!(bad.served() <= 8, "the failing backend got {} requests", bad.served());
    assert_eq!(good.served(), 200);

    // A POST is not idempotent: never retried, its 503 is the client's answer.
    let posts: Vec<String> = vec!["-X".into(), "POST".into(), "http://web.default/once".into()];
    let _ = curl(proxy.outbound, posts).await;
    assert!(good.served() + bad.served() <= 200 + 8 + 1);
}

#[tokio::test]
async fn the_routes_timeout_bounds_the_wait_for_an_answer() {
    let slow = Backend::start("slow").await;
    let spec_dir = tempfile::tempdir().unwrap();
    let spec = spec_dir.path().join("web.yaml");
    std::fs::write(
        &spec,
        "openapi: 3.0.3\ninfo: {title: web, version: '1'}\npaths:\n  /delay/{ms}:\n    get:\n      operationId: slow\n      x-neutrino-timeout: 300ms\n      responses: {'200': {description: ok}}\n",
    )
    .unwrap();
    let mesh = MeshFile::new(&mesh_yaml(&[slow.port], &format!("    openapi: {}\n", spec.display())));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    let started = std::time::Instant::now();
    let codes = curl(proxy.outbound, vec!["http://web.default/delay/3000".into()]).await;
    assert_eq!(codes, [504]);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let fast = curl(proxy.outbound, vec!["http://web.default/delay/10".into()]).await;
    assert_eq!(fast, [200]);
}
