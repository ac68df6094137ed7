//! `neutrino-proxy wait-ready`, the legacy sidecar's postStart hook (exactly the flags the
//! injector writes: `--admin-addr 127.0.0.1:15020 --timeout-secs 60`, with other values):
//! it exits 0 once a real proxy's `/ready` answers 200, keeps trying while nothing
//! listens yet, and exits non-zero saying what `/ready` last said at the timeout.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use neutrino_tests::*;

fn wait_ready(port: u16, timeout_secs: u64) -> Output {
    Command::new(bin("neutrino-proxy"))
        .args(["wait-ready", "--admin-addr", &format!("127.0.0.1:{port}"), "--timeout-secs", &timeout_secs.to_string()])
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run neutrino-proxy wait-ready")
}

/// Answers every connection on `listener` with `status` and `body`, on a thread.
fn answer_with(listener: TcpListener, status: &'static str, body: &'static str) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let response =
                format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
            let _ = stream.write_all(response.as_bytes());
        }
    });
}

#[test]
fn exits_zero_once_a_real_proxy_is_ready() {
    let mesh = MeshFile::new(&mesh_yaml(1, &|_| 1000));
    let proxy = Proxy::start_local(&mesh.path());
    let out = wait_ready(proxy.admin, 20);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), proxy.proc.logs());
}

#[test]
fn keeps_trying_until_the_admin_port_opens() {
    let port = free_port();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        answer_with(TcpListener::bind(("127.0.0.1", port)).expect("bind"), "200 OK", "ready\n");
    });
    let start = Instant::now();
    let out = wait_ready(port, 20);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(start.elapsed() >= Duration::from_millis(700), "returned before the port opened");
    opener.join().expect("opener");
}

#[test]
fn fails_at_the_timeout_saying_what_ready_said() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    answer_with(listener, "503 Service Unavailable", "not ready: no config from the control plane yet\n");
    let start = Instant::now();
    let out = wait_ready(port, 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(stderr.contains("the proxy was not ready within 1 s"), "{stderr}");
    assert!(stderr.contains("503 not ready: no config from the control plane yet"), "{stderr}");
}
