//! The request log against a real Redis: one well-formed record per request, written
//! without slowing or failing requests, dropped and counted while Redis is down, and
//! read back with `neutrino logs`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use neutrino_tests::backend::Backend;
use neutrino_tests::*;

async fn curl_codes(proxy_port: u16, urls: Vec<String>) -> Vec<u16> {
    tokio::task::spawn_blocking(move || {
        let mut args = vec![];
        for u in urls {
            args.extend(["-o".to_string(), "/dev/null".to_string(), u]);
        }
        let out = Command::new("curl")
            .args(["-s", "--max-time", "20", "-x", &format!("http://127.0.0.1:{proxy_port}"), "-w", "%{http_code}\\n"])
            .args(&args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.parse().unwrap_or(0)).collect()
    })
    .await
    .unwrap()
}

async fn xlen(port: u16) -> anyhow::Result<u64> {
    let mut c = redis_client(port).get_multiplexed_async_connection().await?;
    Ok(redis::cmd("XLEN").arg("neutrino:requests").query_async(&mut c).await?)
}

struct Setup {
    _backend: Backend,
    _mesh: MeshFile,
    _spec: tempfile::TempDir,
    _cp: ControlPlane,
    proxy: Proxy,
    redis: RedisServer,
}

async fn setup() -> Setup {
    let redis = RedisServer::start().await;
    let backend = Backend::start("app").await;
    let spec = tempfile::tempdir().unwrap();
    std::fs::write(
        spec.path().join("web.yaml"),
        "openapi: 3.0.3\ninfo: {title: web, version: '1'}\npaths:\n  /items/{id}:\n    get:\n      operationId: getItem\n      x-neutrino-resources: {cpu: 250m, memory: 1Mi}\n      responses: {'200': {description: ok}}\n",
    )
    .unwrap();
    let mesh = MeshFile::new(&format!(
        "services:\n  - name: web\n    ports: [{{port: 80, protocol: http}}]\n    openapi: {}\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, name: web-0, capacity: {{cpu: 2, memory: 1Gi}}}}\n",
        spec.path().join("web.yaml").display(),
        backend.port
    ));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start_with(cp.grpc, &["--redis-url", &redis.url()]);
    proxy.wait_ready().await;
    Setup { _backend: backend, _mesh: mesh, _spec: spec, _cp: cp, proxy, redis }
}

#[tokio::test]
async fn every_request_leaves_one_well_formed_record() {
    let s = setup().await;
    let mut urls: Vec<String> = (0..30).map(|i| format!("http://web.default/items/{i}")).collect();
    urls.extend((0..10).map(|i| format!("http://web.default/status/{}", if i % 2 == 0 { 404 } else { 200 })));
    let codes = curl_codes(s.proxy.outbound, urls).await;
    assert_eq!(codes.len(), 40);
    wait_for("40 records", Duration::from_secs(10), || async {
        let n = xlen(s.redis.port).await?;
        anyhow::ensure!(n == 40, "{n} records");
        Ok(())
    })
    .await;
    let mut c = redis_client(s.redis.port).get_multiplexed_async_connection().await.unwrap();
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg("neutrino:requests").arg("-").arg("+").query_async(&mut c).await.unwrap();
    let records: Vec<HashMap<String, String>> = reply
        .ids
        .iter()
        .map(|r| r.map.keys().map(|k| (k.clone(), r.get::<String>(k).unwrap_or_default())).collect())
        .collect();
    let first = &records[0];
    assert_eq!(first["service"], "default/web");
    assert_eq!(first["operation"], "getItem");
    assert_eq!(first["status"], "200");
    assert_eq!(first["cost_cpu_millis"], "250");
    assert_eq!(first["cost_memory_bytes"], (1 << 20).to_string());
    assert_eq!(first["endpoint_pod"], "web-0");
    assert_eq!(first["source"], "test-pod.default");
    assert!(first["endpoint"].starts_with("127.0.0.1:"));
    assert!(first["reason"].contains("attempts 1"), "{}", first["reason"]);
    assert!(first["latency_us"].parse::<u64>().unwrap() > 0);
    assert!(first["time_ms"].parse::<u64>().unwrap() > 1_700_000_000_000);
    // Unmatched paths: the default route, no operation id; statuses as answered.
    let statuses: Vec<&str> = records[30..].iter().map(|r| r["status"].as_str()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "404").count(), 5);
    assert!(records[30..].iter().all(|r| r["operation"].is_empty()));

    // `neutrino logs` finds them, filtered.
    let out = Command::new(bin("neutrino"))
        .args(["logs", "--redis-url", &s.redis.url(), "--service", "default/web", "--status", "4xx", "-n", "50"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(text.lines().all(|l| l.contains(" 404 ") && l.contains("default/web")), "{text}");
}

#[tokio::test]
async fn with_redis_down_no_request_fails_and_drops_are_counted() {
    let mut s = setup().await;
    let warm = curl_codes(s.proxy.outbound, vec!["http://web.default/items/1".into()]).await;
    assert_eq!(warm, [200]);
    wait_for("the first record", Duration::from_secs(10), || async {
        anyhow::ensure!(xlen(s.redis.port).await? == 1, "not yet");
        Ok(())
    })
    .await;
    s.redis.kill();
    let urls: Vec<String> = (0..200).map(|i| format!("http://web.default/items/{i}")).collect();
    let codes = curl_codes(s.proxy.outbound, urls).await;
    assert_eq!(codes.len(), 200);
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    let dropped = wait_for("drops to be counted", Duration::from_secs(10), || async {
        let (_, text) = get(s.proxy.admin, "/metrics").await?;
        let d = metric(&text, "neutrino_proxy_request_log_dropped_total", "").unwrap_or(0.0);
        anyhow::ensure!(d >= 1.0, "no drops counted yet");
        Ok(d)
    })
    .await;
    assert!(dropped <= 200.0);

    // Redis comes back on the same port: records flow again.
    let port = s.redis.port;
    let _back = RedisServer::start_on(port).await;
    wait_for("records to flow again", Duration::from_secs(15), || async {
        let _ = curl_codes(s.proxy.outbound, vec!["http://web.default/items/again".into()]).await;
        anyhow::ensure!(xlen(port).await? >= 1, "none yet");
        Ok(())
    })
    .await;
}
