//! The proxy's side of validation: a scripted control plane (an in-process gRPC server
//! on a real socket) sends the real proxy process an invalid update; the proxy must
//! NACK it with reasons and keep serving its last good config.

#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use neutrino_proto::discovery_server::{Discovery, DiscoveryServer};
use neutrino_proto::{self as pb, DiscoveryRequest, DiscoveryResponse, Resource, resource::Body, type_url};
use neutrino_tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Hands the first stream's two ends to the test.
struct Scripted {
    ends: Mutex<Option<(mpsc::Receiver<DiscoveryResponse>, mpsc::Sender<DiscoveryRequest>)>>,
}

type Out = Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for Scripted {
    type StreamStream = Out;
    async fn stream(&self, req: Request<Streaming<DiscoveryRequest>>) -> Result<Response<Out>, Status> {
        let (mut responses, requests) =
            self.ends.lock().unwrap().take().ok_or_else(|| Status::unavailable("one stream only"))?;
        let mut inbound = req.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                if requests.send(r).await.is_err() {
                    return;
                }
            }
        });
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(r) = responses.recv().await {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn endpoints(address: &str) -> Resource {
    Resource::with_content_version(
        "default/orders".into(),
        Body::Endpoints(pb::Endpoints {
            service: "default/orders".into(),
            endpoints: vec![pb::Endpoint {
                address: address.into(),
                port: 8080,
                ready: true,
                capacity: Some(pb::ResourceVector { cpu_millis: 1000, memory_bytes: 1 << 30, gpu: 0 }),
                ..Default::default()
            }],
        }),
    )
}

fn response(type_url: &str, nonce: &str, resources: Vec<Resource>) -> DiscoveryResponse {
    DiscoveryResponse { type_url: type_url.into(), nonce: nonce.into(), resources, ..Default::default() }
}

async fn answer(requests: &mut mpsc::Receiver<DiscoveryRequest>, nonce: &str) -> DiscoveryRequest {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), requests.recv()).await.expect("an answer").expect("open");
        if r.response_nonce == nonce {
            return r;
        }
    }
}

#[tokio::test]
async fn an_invalid_update_is_nacked_with_reasons_and_the_old_version_kept() {
    let (resp_tx, resp_rx) = mpsc::channel(4);
    let (req_tx, mut req_rx) = mpsc::channel(16);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = Scripted { ends: Mutex::new(Some((resp_rx, req_tx))) };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(server))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let proxy = Proxy::start(port);

    // The proxy subscribes to every type, saying who it is.
    let first = tokio::time::timeout(Duration::from_secs(10), req_rx.recv()).await.unwrap().unwrap();
    assert_eq!(first.node.unwrap().id, "test-pod.default");

    let good = endpoints("10.1.0.1");
    resp_tx.send(response(type_url::SERVICE, "1", vec![])).await.unwrap();
    resp_tx.send(response(type_url::ENDPOINTS, "2", vec![good.clone()])).await.unwrap();
    resp_tx.send(response(type_url::POLICY, "p", vec![])).await.unwrap();
    assert!(answer(&mut req_rx, "1").await.error_detail.is_none());
    assert!(answer(&mut req_rx, "2").await.error_detail.is_none());
    assert!(answer(&mut req_rx, "p").await.error_detail.is_none());
    proxy.wait_ready().await;

    // One bad address in an otherwise fine update: the whole update is refused.
    let mut bad = endpoints("10.1.0.2");
    if let Some(Body::Endpoints(e)) = &mut bad.body {
        e.endpoints.push(pb::Endpoint { address: "orders-0".into(), ..e.endpoints[0].clone() });
    }
    bad = Resource::with_content_version(bad.name.clone(), bad.body.take().unwrap());
    resp_tx.send(response(type_url::ENDPOINTS, "3", vec![bad])).await.unwrap();
    let nack = answer(&mut req_rx, "3").await;
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3);
    assert_eq!(detail.reasons, ["Endpoints default/orders: endpoints[1].address \"orders-0\" is not an IP address"]);

    let dump = proxy.dump().await;
    assert_eq!(version(&dump, "Endpoints", "default/orders"), Some(good.version.clone()), "old version kept");
    assert_eq!(stream_count(&dump, "Endpoints", "nacks"), 1);
    assert_eq!(dump["stream"]["types"]["Endpoints"]["last_nack"][0], detail.reasons[0]);
    assert_eq!(proxy.ready_code().await, 200);

    // A good update after the bad one is accepted again.
    let next = endpoints("10.1.0.3");
    resp_tx.send(response(type_url::ENDPOINTS, "4", vec![next.clone()])).await.unwrap();
    assert!(answer(&mut req_rx, "4").await.error_detail.is_none());
    let dump = proxy.dump().await;
    assert_eq!(version(&dump, "Endpoints", "default/orders"), Some(next.version));
    assert!(dump["stream"]["types"]["Endpoints"]["last_nack"].is_null());
}
