//! Live load out of band: each backend's sidecar reports its pod's load on its stream;
//! control-plane replicas share reports through a real Redis and push the global view
//! on the Capacity lane; a replica that loses Redis keeps serving its own proxies'
//! reports and catches up when Redis returns; a killed replica's proxies move to the
//! other one and capacity keeps flowing.
//!
//! Load is made by holding requests on a sidecar's inbound listener with a declared
//! cost (`x-neutrino-cost`, as callers' proxies send it) against an app that answers
//! only when the request is cancelled: deterministic, no timing guesses.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use neutrino_proto::discovery_client::DiscoveryClient;
use neutrino_proto::{DiscoveryRequest, Node, WILDCARD, resource::Body, type_url};
use neutrino_tests::backend::Backend;
use neutrino_tests::*;
use tokio_stream::wrappers::ReceiverStream;

const SPEC: &str = "openapi: 3.0.3\ninfo: {title: web, version: '1'}\npaths:\n  /delay/{ms}:\n    post:\n      operationId: heavy\n      x-neutrino-resources: {cpu: '3', memory: 1Gi}\n      responses: {'200': {description: ok}}\n";

/// One backend pod: its app and its sidecar (inbound on the endpoint's port).
struct Pod {
    _app: Backend,
    sidecar: Sidecar,
    inbound: u16,
}

impl Pod {
    async fn start(name: &str, inbound: u16, control_planes: &str) -> Pod {
        let app = Backend::start(name).await;
        let sidecar = Sidecar::start(control_planes, name, inbound, app.port, &[]);
        sidecar.wait_ready().await;
        Pod { _app: app, sidecar, inbound }
    }

    /// Holds `cpu_millis` of declared cost on the pod until the returned curl is killed.
    fn hold(&self, cpu_millis: u64) -> Held {
        let child = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "120", "-X", "POST"])
            .args(["-H", &format!("x-neutrino-cost: {cpu_millis},0,0"), "-H", "host: web.default"])
            .arg(format!("http://127.0.0.1:{}/delay/110000", self.inbound))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Held(child)
    }
}

struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Capacity a replica pushes for default/web right now: cpu ppm by endpoint port.
async fn pushed(cp_grpc: u16) -> anyhow::Result<BTreeMap<u16, u32>> {
    let mut client = DiscoveryClient::connect(format!("http://127.0.0.1:{cp_grpc}")).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(DiscoveryRequest {
        node: Some(Node { id: "probe".into(), ..Default::default() }),
        type_url: type_url::CAPACITY.into(),
        subscribe: vec![WILDCARD.into()],
        ..Default::default()
    })
    .await?;
    let mut stream = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??;
    let resp = first.ok_or_else(|| anyhow::anyhow!("stream closed"))?;
    let mut out = BTreeMap::new();
    for r in resp.resources {
        if let Some(Body::Capacity(c)) = r.body
            && c.service == "default/web"
        {
            for l in c.loads {
                out.insert(l.port as u16, l.cpu_ppm);
            }
        }
    }
    Ok(out)
}

async fn wait_pushed(what: &str, cp: &ControlPlane, port: u16, want: Option<u32>) {
    wait_for(what, Duration::from_secs(10), || async {
        let seen = pushed(cp.grpc).await?;
        anyhow::ensure!(seen.get(&port).copied() == want, "pushed {seen:?}");
        Ok(())
    })
    .await;
}

async fn ready_detail(cp: &ControlPlane) -> String {
    get(cp.admin, "/ready").await.map(|(code, body)| format!("{code} {body}")).unwrap_or_default()
}

#[tokio::test]
async fn replicas_share_load_through_redis_and_survive_losing_it() {
    let mut redis = RedisServer::start().await;
    let (p0, p1) = (free_port(), free_port());
    let mesh = WebMesh::new(SPEC, &[(p0, "web-0"), (p1, "web-1")]);
    let url = redis.url();
    let a = ControlPlane::start(&mesh.path(), &["--redis-url", &url, "--replica", "a"]);
    let b = ControlPlane::start(&mesh.path(), &["--redis-url", &url, "--replica", "b"]);
    a.wait_ready().await;
    b.wait_ready().await;
    // Each pod's sidecar talks to one replica only.
    let web0 = Pod::start("web-0", p0, &format!("127.0.0.1:{}", a.grpc)).await;
    let web1 = Pod::start("web-1", p1, &format!("127.0.0.1:{}", b.grpc)).await;

    // Idle pods report too: their load is known (zero), not missing.
    wait_pushed("web-0's idle report on the other replica", &b, p0, Some(0)).await;
    let h0 = web0.hold(3000);
    let _h1 = web1.hold(2000);
    wait_pushed("web-0's load on its own replica", &a, p0, Some(750_000)).await;
    wait_pushed("web-0's load pushed by the other replica", &b, p0, Some(750_000)).await;
    wait_pushed("web-1's load pushed by the other replica", &a, p1, Some(500_000)).await;
    assert!(a.metric("neutrino_cp_load_reports_total", "origin=\"redis\"").await >= 1.0);
    assert!(b.metric("neutrino_cp_load_reports_total", "origin=\"redis\"").await >= 1.0);
    assert!(ready_detail(&a).await.starts_with("200 ready"), "{}", ready_detail(&a).await);
    assert!(!ready_detail(&a).await.contains("degraded"));

    // Redis dies. Each replica keeps serving, says it is degraded, and still pushes
    // what its own proxies report.
    redis.kill();
    wait_for("replica a to report degraded", Duration::from_secs(10), || async {
        let detail = ready_detail(&a).await;
        anyhow::ensure!(detail.starts_with("200 ") && detail.contains("degraded"), "{detail}");
        Ok(())
    })
    .await;
    assert_eq!(a.metric("neutrino_cp_redis_connected", "").await, 0.0);
    drop(h0);
    wait_pushed("web-0's new load on its own replica while Redis is down", &a, p0, Some(0)).await;
    // The other replica cannot hear from web-0: its report expires to unknown, never
    // to "idle".
    wait_pushed("web-0's load to become unknown on the other replica", &b, p0, None).await;
    wait_pushed("web-1's load, local to b, still pushed", &b, p1, Some(500_000)).await;

    // Redis returns on the same address: both replicas reconnect and catch up.
    let _h0 = web0.hold(1000);
    let _redis = RedisServer::start_on(redis.port).await;
    wait_for("replica b to reconnect", Duration::from_secs(15), || async {
        let detail = ready_detail(&b).await;
        anyhow::ensure!(detail.starts_with("200 ") && !detail.contains("degraded"), "{detail}");
        Ok(())
    })
    .await;
    assert_eq!(b.metric("neutrino_cp_redis_connected", "").await, 1.0);
    wait_pushed("web-0's load on the other replica after Redis returned", &b, p0, Some(250_000)).await;
    drop(web0.sidecar.proc);
}

#[tokio::test]
async fn a_killed_replicas_proxies_move_to_the_other_and_capacity_keeps_flowing() {
    let p0 = free_port();
    let mesh = WebMesh::new(SPEC, &[(p0, "web-0")]);
    let mut a = ControlPlane::start(&mesh.path(), &[]);
    let b = ControlPlane::start(&mesh.path(), &[]);
    a.wait_ready().await;
    b.wait_ready().await;
    let both = format!("127.0.0.1:{},127.0.0.1:{}", a.grpc, b.grpc);
    let web0 = Pod::start("web-0", p0, &both).await;
    let caller = Proxy::start_with(a.grpc, &["--queue-timeout-ms", "200", "--control-plane", &both]);
    caller.wait_ready().await;
    assert_eq!(caller.dump().await["stream"]["control_plane"], format!("127.0.0.1:{}", a.grpc));

    a.proc.kill();
    let on_b = format!("127.0.0.1:{}", b.grpc);
    wait_for("the caller to move to replica b", Duration::from_secs(10), || async {
        let stream = caller.dump().await["stream"].clone();
        anyhow::ensure!(stream["control_plane"] == on_b.as_str() && stream["state"] == "connected", "{stream}");
        Ok(())
    })
    .await;

    // The backend's sidecar moved too: its load reaches b, and b pushes it to the
    // caller, which has never called web-0 (so it has no in-band report to go by).
    let held = web0.hold(3000);
    wait_pushed("web-0's load pushed by b", &b, p0, Some(750_000)).await;
    wait_for("the caller to hold b's Capacity for web", Duration::from_secs(10), || async {
        let cp = get_json(b.admin, "/config_dump").await?;
        let want = cp["resources"]["Capacity"]["default/web"].as_str().unwrap_or_default().to_string();
        let have = version(&caller.dump().await, "Capacity", "default/web").unwrap_or_default();
        anyhow::ensure!(have == want, "caller {have}, b {want}");
        Ok(())
    })
    .await;
    let heavy = || async {
        let out = tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-X", "POST"])
                .args(["-x", &format!("http://127.0.0.1:{}", caller.outbound), "http://web.default/delay/1"])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(heavy().await, "503", "the pushed load leaves no room for a heavy call");
    drop(held);
    wait_for("the heavy call to fit once the load is gone", Duration::from_secs(10), || async {
        let code = heavy().await;
        anyhow::ensure!(code == "200", "{code}");
        Ok(())
    })
    .await;
}
