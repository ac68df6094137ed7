//! The Discovery protocol as a proxy sees it: a raw gRPC client (no proxy logic)
//! against the real control-plane process, checking subscriptions, ACK/NACK and flow
//! control on the wire.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use neutrino_proto::discovery_client::DiscoveryClient;
use neutrino_proto::{DiscoveryRequest, DiscoveryResponse, ErrorDetail, Node, type_url};
use neutrino_tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

struct RawStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl RawStream {
    async fn open(url: String, first: DiscoveryRequest) -> Result<RawStream, tonic::Status> {
        let mut client = DiscoveryClient::connect(url).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let rx = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(RawStream { tx, rx })
    }

    async fn next(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response within 10 s")
            .expect("stream ok")
            .expect("stream open")
    }

    async fn ack(&self, r: &DiscoveryResponse) {
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }
}

fn node() -> Option<Node> {
    Some(Node { id: "raw-client".into(), pod: "raw".into(), namespace: "default".into(), ..Default::default() })
}

fn subscribe(type_url: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node(),
        type_url: type_url.into(),
        subscribe: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn names(r: &DiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

fn cpu_of(r: &DiscoveryResponse, name: &str) -> u64 {
    let res = r.resources.iter().find(|x| x.name == name).expect(name);
    match &res.body {
        Some(neutrino_proto::resource::Body::Endpoints(e)) => e.endpoints[0].capacity.unwrap().cpu_millis,
        other => panic!("not endpoints: {other:?}"),
    }
}

async fn started(services: usize) -> (MeshFile, ControlPlane) {
    let mesh = MeshFile::new(&mesh_yaml(services, &|_| 1000));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    cp.wait_ready().await;
    (mesh, cp)
}

#[tokio::test]
async fn a_proxy_receives_only_what_it_subscribed_to() {
    let (mesh, cp) = started(3).await;
    let mut s = RawStream::open(cp.grpc_url(), subscribe(type_url::ENDPOINTS, &["default/svc-1", "default/nope"]))
        .await
        .unwrap();
    let r = s.next().await;
    assert_eq!(names(&r), ["default/svc-1"]);
    assert_eq!(r.removed_resources, ["default/nope"], "a missing name is reported as not existing");
    s.ack(&r).await;

    // A change to another service sends nothing; a change to ours sends just it.
    mesh.write(&mesh_yaml(3, &|i| if i == 2 { 2000 } else { 1000 }));
    mesh.write(&mesh_yaml(3, &|i| if i == 1 { 2000 } else { 1000 }));
    let r = s.next().await;
    assert_eq!(names(&r), ["default/svc-1"]);
    assert_eq!(cpu_of(&r, "default/svc-1"), 2000);
    assert!(r.removed_resources.is_empty());
}

#[tokio::test]
async fn a_nacked_version_is_not_resent_and_the_next_one_is() {
    let (mesh, cp) = started(2).await;
    let mut s = RawStream::open(cp.grpc_url(), subscribe(type_url::ENDPOINTS, &["*"])).await.unwrap();
    let r = s.next().await;
    assert_eq!(names(&r), ["default/svc-0", "default/svc-1"]);
    s.send(DiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(ErrorDetail { code: 3, message: "test rejects".into(), reasons: vec!["because".into()] }),
        ..Default::default()
    })
    .await;
    // If the NACKed version were re-sent, it would arrive before this change.
    mesh.write(&mesh_yaml(2, &|i| if i == 1 { 1500 } else { 1000 }));
    let r = s.next().await;
    assert_eq!(names(&r), ["default/svc-1"], "only the new version, never the rejected one again");
    assert_eq!(cpu_of(&r, "default/svc-1"), 1500);
    assert_eq!(cp.metric("neutrino_cp_nacks_total", "kind=\"Endpoints\"").await, 1.0);
    let dump = get_json(cp.admin, "/config_dump").await.unwrap();
    let nack = dump["proxies"][0]["types"]["Endpoints"]["last_nack"].as_str().unwrap().to_string();
    assert!(nack.contains("test rejects") && nack.contains("because"), "{nack}");
}

#[tokio::test]
async fn a_slow_proxy_gets_the_latest_state_not_a_backlog() {
    let (mesh, cp) = started(2).await;
    let mut s = RawStream::open(cp.grpc_url(), subscribe(type_url::ENDPOINTS, &["*"])).await.unwrap();
    let first = s.next().await;
    // Not ACKed yet: the control plane must hold further pushes for this proxy.
    for n in 1..=5u32 {
        mesh.write(&mesh_yaml(2, &|_| 1000 + n * 100));
        wait_for("the edit to be published", Duration::from_secs(5), || async {
            let g = cp.metric("neutrino_cp_snapshot_generation", "").await;
            anyhow::ensure!(g == f64::from(n + 1), "generation {g}");
            Ok(())
        })
        .await;
    }
    assert_eq!(cp.metric("neutrino_cp_responses_sent_total", "kind=\"Endpoints\"").await, 1.0);
    s.ack(&first).await;
    let r = s.next().await;
    assert_eq!(cpu_of(&r, "default/svc-0"), 1500, "straight to the newest version");
    assert_eq!(r.system_version, "6");
    assert_eq!(cp.metric("neutrino_cp_responses_sent_total", "kind=\"Endpoints\"").await, 2.0);
}

#[tokio::test]
async fn unsubscribing_stops_updates_and_resubscribing_resends() {
    let (mesh, cp) = started(2).await;
    let mut s = RawStream::open(cp.grpc_url(), subscribe(type_url::SERVICE, &["default/svc-0"])).await.unwrap();
    let r = s.next().await;
    s.ack(&r).await;
    s.send(DiscoveryRequest {
        type_url: type_url::SERVICE.into(),
        unsubscribe: vec!["default/svc-0".into()],
        subscribe: vec!["default/svc-1".into()],
        ..Default::default()
    })
    .await;
    let r = s.next().await;
    assert_eq!(names(&r), ["default/svc-1"]);
    s.ack(&r).await;
    s.send(DiscoveryRequest {
        type_url: type_url::SERVICE.into(),
        subscribe: vec!["default/svc-0".into()],
        ..Default::default()
    })
    .await;
    let r = s.next().await;
    assert_eq!(names(&r), ["default/svc-0"], "re-subscribing sends it again");
    drop(mesh);
}

#[tokio::test]
async fn a_stream_without_a_node_identity_is_refused_with_a_reason() {
    let (_mesh, cp) = started(1).await;
    let mut req = subscribe(type_url::SERVICE, &["*"]);
    req.node = None;
    let err = match RawStream::open(cp.grpc_url(), req).await {
        Err(status) => status,
        Ok(mut s) => s.rx.message().await.expect_err("refused"),
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("node.id"), "{}", err.message());
}
