//! Traces across the mesh, received by a real OTLP/gRPC trace service in this process:
//! a client's span, the caller's proxy (A, CLIENT span), the backend's proxy (B, SERVER
//! span) and the app form one trace with the right parent links and our attributes. With
//! the collector down or hanging, requests still all succeed and the proxies count the
//! spans they dropped.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use neutrino_tests::backend::Backend;
use neutrino_tests::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span, status::StatusCode};
use serde_json::Value;

const SPEC: &str = "openapi: 3.0.3\ninfo: {title: web, version: '1'}\npaths:\n  /items/{id}:\n    get:\n      operationId: getItem\n      x-neutrino-resources: {cpu: 100m}\n      responses: {'200': {description: ok}}\n";

/// The OTLP trace service: keeps every span it is sent, with its resource.
#[derive(Clone, Default)]
struct Collector {
    got: Arc<Mutex<Vec<ResourceSpans>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().extend(req.into_inner().resource_spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Serves OTLP/gRPC on a loopback port; returns the port.
    async fn start(&self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        port
    }

    /// Every span received so far, with the pod (`k8s.pod.name`) that sent it.
    fn spans(&self) -> Vec<(String, Vec<KeyValue>, Span)> {
        let got = self.got.lock().unwrap();
        let mut out = Vec::new();
        for rs in got.iter() {
            let resource = rs.resource.as_ref().map(|r| r.attributes.clone()).unwrap_or_default();
            let pod = attr(&resource, "k8s.pod.name").unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push((pod.clone(), resource.clone(), s.clone()));
                }
            }
        }
        out
    }

    /// The one span of `kind` from `pod` in trace `trace_id`, once it has arrived.
    async fn wait_span(&self, pod: &str, kind: SpanKind, trace_id: &str) -> (Vec<KeyValue>, Span) {
        wait_for(&format!("the {kind:?} span of {pod} in trace {trace_id}"), Duration::from_secs(20), || async {
            let found: Vec<_> = self
                .spans()
                .into_iter()
                .filter(|(p, _, s)| p == pod && s.kind == kind as i32 && hex(&s.trace_id) == trace_id)
                .collect();
            ensure!(found.len() <= 1, "{} such spans", found.len());
            let (_, resource, span) = found.into_iter().next().context("not yet")?;
            Ok((resource, span))
        })
        .await
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An attribute's value as text (ints and doubles printed).
fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match v {
        AnyValue { value: Some(any_value::Value::StringValue(s)) } => s.clone(),
        AnyValue { value: Some(any_value::Value::IntValue(i)) } => i.to_string(),
        AnyValue { value: Some(any_value::Value::DoubleValue(d)) } => d.to_string(),
        AnyValue { value: Some(any_value::Value::BoolValue(b)) } => b.to_string(),
        other => format!("{other:?}"),
    })
}

/// The parent span id of a W3C traceparent.
fn parent_of(traceparent: &str) -> (&str, &str) {
    let mut parts = traceparent.split('-');
    let (_, trace, span) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    (trace, span)
}

/// curl through the caller's proxy: (status, body).
async fn call(proxy: u16, url: &str, headers: &[&str]) -> (u16, String) {
    let mut args: Vec<String> =
        ["-s", "--max-time", "10", "-w", "\n%{http_code}", "-x", &format!("http://127.0.0.1:{proxy}")]
            .iter()
            .map(|s| s.to_string())
            .collect();
    for h in headers {
        args.extend(["-H".to_string(), h.to_string()]);
    }
    args.push(url.to_string());
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl").args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    })
    .await
    .unwrap()
}

/// A caller's proxy (pod `client-0`) and the backend's sidecar (pod `web-0`, inbound on
/// the endpoint's port, forwarding to `app`), each with `env_a` / `env_b` added.
struct Mesh {
    _mesh: WebMesh,
    _cp: ControlPlane,
    a: Proc,
    a_admin: u16,
    a_outbound: u16,
    b: Proc,
    b_admin: u16,
    b_inbound: u16,
}

impl Mesh {
    async fn start(app: &Backend, env_a: &[(&str, &str)], env_b: &[(&str, &str)]) -> Mesh {
        let b_inbound = free_port();
        let mesh = WebMesh::new(SPEC, &[(b_inbound, "web-0")]);
        let cp = ControlPlane::start(&mesh.path(), &[]);
        let b = Sidecar::start(&format!("127.0.0.1:{}", cp.grpc), "web-0", b_inbound, app.port, env_b);
        let a = Proxy::start_env(cp.grpc, &["--pod", "client-0"], env_a);
        a.wait_ready().await;
        b.wait_ready().await;
        let (a_admin, a_outbound, b_admin) = (a.admin, a.outbound, b.admin);
        let (a, b) = (a.proc, b.proc);
        Mesh { _mesh: mesh, _cp: cp, a, a_admin, a_outbound, b, b_admin, b_inbound }
    }
}

#[tokio::test]
async fn one_trace_across_the_client_both_proxies_and_the_app() {
    let collector = Collector::default();
    let otlp = format!("http://127.0.0.1:{}", collector.start().await);
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let app = Backend::start("web-0").await;
    let mesh = Mesh::start(&app, &env, &env).await;

    // The client's own span: trace 4bf9..., span 00f0....
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let (code, body) = call(
        mesh.a_outbound,
        "http://web.default/items/7",
        &[&format!("traceparent: 00-{trace_id}-{client_span}-01"), "tracestate: client=1"],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();

    // A's CLIENT span: a child of the client's span, with our attributes.
    let (resource_a, a) = collector.wait_span("client-0", SpanKind::Client, trace_id).await;
    assert_eq!(hex(&a.parent_span_id), client_span, "A's client span is the client's child");
    assert_eq!(a.name, "GET getItem");
    let at = |k: &str| attr(&a.attributes, k);
    assert_eq!(at("http.request.method").as_deref(), Some("GET"));
    assert_eq!(at("url.path").as_deref(), Some("/items/7"));
    assert_eq!(at("http.route").as_deref(), Some("/items/{id}"));
    assert_eq!(at("server.address").as_deref(), Some("web.default"));
    assert_eq!(at("http.response.status_code").as_deref(), Some("200"));
    assert_eq!(at("network.peer.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(at("network.peer.port"), Some(mesh.b_inbound.to_string()));
    assert_eq!(at("neutrino.service").as_deref(), Some("default/web"));
    assert_eq!(at("neutrino.operation").as_deref(), Some("getItem"));
    assert_eq!(at("neutrino.cost.cpu_millis").as_deref(), Some("100"));
    assert_eq!(at("neutrino.cost.gpu").as_deref(), Some("0"));
    assert_eq!(at("neutrino.endpoint"), Some(format!("127.0.0.1:{}", mesh.b_inbound)));
    assert_eq!(at("neutrino.endpoint.pod").as_deref(), Some("web-0"));
    assert_eq!(at("neutrino.selection.reason").as_deref(), Some("single"), "one endpoint");
    let utilization: f64 = at("neutrino.endpoint.utilization").unwrap().parse().unwrap();
    assert!((0.0..=1.0).contains(&utilization) && utilization > 0.0, "{utilization}: 100m of 4 CPUs placed");
    assert_eq!(at("neutrino.retries").as_deref(), Some("0"));
    assert_eq!(at("neutrino.peer.identity").as_deref(), Some("client-0.default"));
    assert_eq!(attr(&resource_a, "service.name").as_deref(), Some("neutrino-proxy"));
    assert_eq!(attr(&resource_a, "k8s.namespace.name").as_deref(), Some("default"));
    assert_ne!(a.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));

    // B's SERVER span: a child of A's client span.
    let (_, b) = collector.wait_span("web-0", SpanKind::Server, trace_id).await;
    assert_eq!(hex(&b.parent_span_id), hex(&a.span_id), "B's server span is A's client span's child");
    assert_eq!(b.name, "GET getItem");
    let bt = |k: &str| attr(&b.attributes, k);
    assert_eq!(bt("neutrino.service").as_deref(), Some("default/web"));
    assert_eq!(bt("neutrino.operation").as_deref(), Some("getItem"));
    assert_eq!(bt("neutrino.pod").as_deref(), Some("web-0"));
    assert_eq!(bt("http.response.status_code").as_deref(), Some("200"));
    assert!(b.start_time_unix_nano >= a.start_time_unix_nano && b.end_time_unix_nano <= a.end_time_unix_nano);

    // The app's parent is B's server span; the client's tracestate came along.
    let headers = &seen["headers"];
    let traceparent = headers["traceparent"].as_str().unwrap();
    assert_eq!(parent_of(traceparent), (trace_id, hex(&b.span_id).as_str()), "the app's parent is B's span");
    assert!(traceparent.ends_with("-01"), "sampled: {traceparent}");
    assert_eq!(headers["tracestate"], "client=1");
    assert!(headers.get("x-neutrino-cost").is_none());

    // B3 on input (single header, as Zipkin-era clients send it): the same links.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let (code, body) =
        call(mesh.a_outbound, "http://web.default/items/8", &[&format!("b3: {b3_trace}-e457b5a2e4d86bd1-1")]).await;
    assert_eq!(code, 200, "{body}");
    let (_, a3) = collector.wait_span("client-0", SpanKind::Client, b3_trace).await;
    assert_eq!(hex(&a3.parent_span_id), "e457b5a2e4d86bd1");
    let (_, b3) = collector.wait_span("web-0", SpanKind::Server, b3_trace).await;
    assert_eq!(hex(&b3.parent_span_id), hex(&a3.span_id));
    let seen: Value = serde_json::from_str(&body).unwrap();
    let app_b3 = seen["headers"]["b3"].as_str().unwrap();
    assert_eq!(app_b3, format!("{b3_trace}-{}-1", hex(&b3.span_id)), "answered in kind");

    // No parent at all: A starts the trace, and it still reaches the app through B.
    let (code, body) = call(mesh.a_outbound, "http://web.default/items/9", &[]).await;
    assert_eq!(code, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    let (root_trace, b_span) = parent_of(seen["headers"]["traceparent"].as_str().unwrap());
    let (_, root) = collector.wait_span("client-0", SpanKind::Client, root_trace).await;
    assert!(root.parent_span_id.is_empty(), "A's span is the root");
    let (_, b9) = collector.wait_span("web-0", SpanKind::Server, root_trace).await;
    assert_eq!(hex(&b9.span_id), b_span);
    assert_eq!(hex(&b9.parent_span_id), hex(&root.span_id));

    for admin in [mesh.a_admin, mesh.b_admin] {
        wait_for("3 spans counted as exported, none dropped", Duration::from_secs(10), || async {
            let (_, text) = get(admin, "/metrics").await?;
            let exported = metric(&text, "neutrino_proxy_trace_spans_exported_total", "");
            ensure!(exported == Some(3.0), "exported {exported:?}");
            ensure!(metric(&text, "neutrino_proxy_trace_spans_dropped_total", "") == Some(0.0));
            Ok(())
        })
        .await;
    }
    assert!(!mesh.a.logs().contains("export failed") && !mesh.b.logs().contains("export failed"));
}

#[tokio::test]
async fn with_the_collector_down_or_hanging_every_request_succeeds_and_drops_are_counted() {
    // A's collector refuses connections; B's accepts them and never answers.
    let nobody = free_port();
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging_port = hanging.local_addr().unwrap().port();
    let refused = format!("http://127.0.0.1:{nobody}");
    let silent = format!("http://127.0.0.1:{hanging_port}");
    let common =
        [("OTEL_BSP_SCHEDULE_DELAY", "100"), ("OTEL_BSP_MAX_QUEUE_SIZE", "16"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "300")];
    let env_a: Vec<_> = [("OTEL_EXPORTER_OTLP_ENDPOINT", refused.as_str())].into_iter().chain(common).collect();
    let env_b: Vec<_> = [("OTEL_EXPORTER_OTLP_ENDPOINT", silent.as_str())].into_iter().chain(common).collect();
    let app = Backend::start("web-0").await;
    let mesh = Mesh::start(&app, &env_a, &env_b).await;

    const N: u64 = 50;
    for i in 0..N {
        let (code, body) = call(mesh.a_outbound, &format!("http://web.default/items/{i}"), &[]).await;
        assert_eq!(code, 200, "request {i}: {body}");
    }
    assert_eq!(app.served(), N);

    // Every span is lost, and counted: dropped from the full queue, or with its failed
    // (refused or timed-out) export. None is counted as exported.
    for (who, admin) in [("A (refused)", mesh.a_admin), ("B (hanging)", mesh.b_admin)] {
        wait_for(&format!("{who}: all {N} spans counted as dropped"), Duration::from_secs(30), || async {
            let (_, text) = get(admin, "/metrics").await?;
            let dropped =
                metric(&text, "neutrino_proxy_trace_spans_dropped_total", "").ok_or_else(|| anyhow!("no metric"))?;
            ensure!(dropped == N as f64, "dropped {dropped}");
            ensure!(metric(&text, "neutrino_proxy_trace_spans_exported_total", "") == Some(0.0));
            ensure!(metric(&text, "neutrino_proxy_trace_export_failures_total", "").unwrap_or(0.0) >= 1.0);
            Ok(text)
        })
        .await
        .lines()
        .filter(|l| l.starts_with("neutrino_proxy_trace_"))
        .for_each(|l| eprintln!("{who}: {l}"));
    }
    // Shutdown flushes with a short deadline: a hanging collector does not hold it up.
    let mut mesh = mesh;
    let stopping = std::time::Instant::now();
    mesh.b.terminate();
    let status = mesh.b.wait_exit(Duration::from_secs(10)).expect("B exits on SIGTERM despite the hanging collector");
    assert!(status.success(), "{status:?}");
    eprintln!("B stopped {:?} after SIGTERM", stopping.elapsed());
    drop(hanging);
}

/// A request on a raw Discovery stream.
fn discovery(type_url: &str, node: Option<&str>, nonce: &str, nack: Option<&str>) -> neutrino_proto::DiscoveryRequest {
    neutrino_proto::DiscoveryRequest {
        node: node.map(|id| neutrino_proto::Node { id: id.into(), ..Default::default() }),
        type_url: type_url.into(),
        subscribe: if nonce.is_empty() { vec![neutrino_proto::WILDCARD.into()] } else { vec![] },
        response_nonce: nonce.into(),
        error_detail: nack.map(|m| neutrino_proto::ErrorDetail {
            code: 3,
            message: m.into(),
            reasons: vec!["Endpoints default/web: rejected because the test says so".into()],
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_control_plane_traces_each_push_until_the_proxy_answers() {
    use neutrino_proto::type_url;
    let collector = Collector::default();
    let otlp = collector.start().await;
    let mesh = MeshFile::new("services:\n  - name: web\n    ports: [{port: 80}]\n");
    let (grpc, admin) = (free_port(), free_port());
    let args: Vec<String> = ["--mesh-file", &mesh.path().display().to_string(), "--grpc-addr"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("127.0.0.1:{grpc}"), "--admin-addr".into(), format!("127.0.0.1:{admin}")])
        .collect();
    let endpoint = format!("http://127.0.0.1:{otlp}");
    let _cp = Proc::spawn_env(
        "neutrino-control-plane",
        &args,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    wait_for("control plane /ready", Duration::from_secs(20), || async {
        let (code, body) = get(admin, "/ready").await?;
        ensure!(code == 200, "{code}: {body}");
        Ok(())
    })
    .await;

    // A proxy's stream, by hand: it ACKs the Service push and NACKs the Endpoints push.
    let mut client =
        neutrino_proto::discovery_client::DiscoveryClient::connect(format!("http://127.0.0.1:{grpc}")).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(discovery(type_url::SERVICE, Some("traced-proxy.default"), "", None)).await.unwrap();
    tx.send(discovery(type_url::ENDPOINTS, None, "", None)).await.unwrap();
    let mut inbound = client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for _ in 0..2 {
        let r = tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.unwrap().unwrap().unwrap();
        let nack = (r.type_url == type_url::ENDPOINTS).then_some("test rejects the update");
        tx.send(discovery(&r.type_url, None, &r.nonce, nack)).await.unwrap();
    }

    let cp_spans = || {
        collector
            .spans()
            .into_iter()
            .filter(|(_, res, _)| attr(res, "service.name").as_deref() == Some("neutrino-control-plane"))
            .map(|(_, _, s)| s)
            .collect::<Vec<Span>>()
    };
    let (acked, nacked) = wait_for("both push spans", Duration::from_secs(20), || async {
        let spans = cp_spans();
        let find = |name: &str| spans.iter().find(|s| s.name == name).cloned();
        match (find("push Service"), find("push Endpoints")) {
            (Some(a), Some(n)) => Ok((a, n)),
            _ => Err(anyhow!("spans so far: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>())),
        }
    })
    .await;
    assert_eq!(acked.kind, SpanKind::Producer as i32);
    assert_eq!(attr(&acked.attributes, "neutrino.node").as_deref(), Some("traced-proxy.default"));
    assert_eq!(attr(&acked.attributes, "neutrino.resources").as_deref(), Some("1"));
    assert_eq!(attr(&acked.attributes, "neutrino.outcome").as_deref(), Some("ack"));
    assert_eq!(acked.status.as_ref().map(|s| s.code), Some(StatusCode::Ok as i32));
    assert_eq!(attr(&nacked.attributes, "neutrino.outcome").as_deref(), Some("nack"));
    let status = nacked.status.clone().unwrap_or_default();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(status.message.contains("test rejects the update"), "{}", status.message);
    let event = nacked.events.iter().find(|e| e.name == "nack").expect("a nack event");
    assert!(attr(&event.attributes, "neutrino.reason.0").unwrap_or_default().contains("rejected because"));
    assert!(nacked.end_time_unix_nano >= nacked.start_time_unix_nano);
}
