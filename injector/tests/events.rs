//! End to end: the real `neutrino-injector` with `--events`, its KUBECONFIG pointing at a
//! fake Kubernetes API server in this file (plain HTTP, hyper) that records the Events it
//! is sent and answers only when the test lets it. A skipped pod (the shared salesforce
//! review, a ReplicaSet's pod, made host-network) and a denied pod each become an
//! `events.k8s.io/v1` Event about the right object; the review is answered while the API
//! server still holds the Event's request; with no API server at all, reviews are answered
//! as promptly and the failure is logged once.

mod common;
#[path = "common/server.rs"]
mod server;

use std::convert::Infallible;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use common::{read, shared};
use server::{Injector, listening, tls};

/// What the fake API server was sent: (path, body).
#[derive(Clone, Default)]
struct ApiServer {
    received: Arc<Mutex<Vec<(String, Value)>>>,
    arrived: Arc<Notify>,
}

impl ApiServer {
    /// Serves on a free port; each request is recorded at once, answered once `open` is true.
    async fn start(open: watch::Receiver<bool>) -> (ApiServer, u16) {
        let server = ApiServer::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, open) = (s.clone(), open.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (s, mut open) = (s.clone(), open.clone());
                        async move {
                            let (method, path) = (req.method().clone(), req.uri().path().to_string());
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            s.received.lock().expect("lock").push((format!("{method} {path}"), value));
                            s.arrived.notify_waiters();
                            let _ = open.wait_for(|o| *o).await;
                            let mut r = Response::new(Full::new(body));
                            *r.status_mut() = StatusCode::CREATED;
                            r.headers_mut().insert("content-type", "application/json".parse().expect("header"));
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        (server, port)
    }

    /// Waits (up to 15 s) until `n` requests have arrived, and returns them.
    async fn wait_for(&self, n: usize) -> Vec<(String, Value)> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let arrived = self.arrived.notified();
            {
                let received = self.received.lock().expect("lock");
                if received.len() >= n {
                    return received.clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(tokio::time::timeout(left, arrived).await.is_ok(), "{n} Events did not arrive within 15 s");
        }
    }
}

/// Starts the injector with `--events`, its KUBECONFIG naming the API server on `port`.
fn start(port: u16, log: &str) -> Injector {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n"
        ),
    )
    .expect("kubeconfig");
    let ca = dir.path().join("ca.pem");
    let mut child = Command::new(env!("CARGO_BIN_EXE_neutrino-injector"))
        .args(["--addr", "127.0.0.1:0", "--log", log, "--events", "--self-signed-dns", "localhost"])
        .arg("--ca-bundle-out")
        .arg(&ca)
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "neutrino-injector-6d5f-x2k9q")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if log == "info" { Stdio::piped() } else { Stdio::inherit() })
        .spawn()
        .expect("spawn neutrino-injector");
    let addr = listening(&mut child);
    let ca_pem = std::fs::read_to_string(&ca).expect("CA bundle");
    Injector { child, addr, ca_pem, _dir: dir }
}

/// Posts an AdmissionReview over HTTPS; returns the answer and how long it took.
async fn post(inj: &Injector, body: &Value) -> (Value, Duration) {
    let started = Instant::now();
    let tls = tls(inj.addr, &inj.ca_pem, false).await.expect("TLS");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::post("/mutate")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).expect("json"))))
        .expect("request");
    let response = sender.send_request(req).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (serde_json::from_slice(&bytes).expect("JSON answer"), started.elapsed())
}

/// The shared salesforce review (a ReplicaSet's pod, generateName only), made host-network.
fn host_network_review() -> Value {
    let mut review: Value =
        serde_json::from_str(&read(&shared("admission/salesforce-generic-sidecar-injector-admissionreview.json")))
            .expect("json");
    review["request"]["object"]["spec"]["hostNetwork"] = json!(true);
    review
}

fn pod_review(uid: &str, pod: Value) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": "shop",
        "object": pod,
    }})
}

fn typo_pod() -> Value {
    json!({"metadata": {"name": "web-1", "annotations": {"config.neutrino.io/skip-outbound-ports": "mysql"}},
           "spec": {"containers": [{"name": "app", "image": "a"}]}})
}

/// Answers arrive well within this, whatever the API server does.
const PROMPT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn skipped_and_denied_pods_become_events_without_delaying_the_review() {
    let (open, gate) = watch::channel(false);
    let (api, port) = ApiServer::start(gate).await;
    let inj = start(port, "warn");

    // An injected pod records nothing: the Events below are the first the server gets.
    let ok = pod_review("u-ok", json!({"metadata": {"name": "ok"}, "spec": {"containers": [{"name": "a"}]}}));
    let (answer, _) = post(&inj, &ok).await;
    assert_eq!(answer["response"]["patchType"], "JSONPatch");

    let review = host_network_review();
    let (answer, took) = post(&inj, &review).await;
    assert!(took < PROMPT, "the review took {took:?}");
    let response = &answer["response"];
    assert_eq!((&response["uid"], &response["allowed"]), (&review["request"]["uid"], &json!(true)));
    assert!(response["warnings"][0].as_str().is_some_and(|w| w.contains("hostNetwork")), "{response}");

    // The API server has the Event and has not answered: the review did not wait for it.
    let received = api.wait_for(1).await;
    let (path, event) = &received[0];
    assert_eq!(path, "POST /apis/events.k8s.io/v1/namespaces/keymaker/events");
    assert_eq!(event["apiVersion"], "events.k8s.io/v1");
    assert_eq!((&event["type"], &event["reason"]), (&json!("Normal"), &json!("NeutrinoInjectionSkipped")));
    assert_eq!(event["metadata"]["namespace"], "keymaker");
    assert!(event["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("keymaker-keymaker-769579fd65.")));
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "namespace": "keymaker",
               "name": "keymaker-keymaker-769579fd65", "uid": "dcdda283-a4fc-11e9-a276-42010a3e0104"})
    );
    let note = event["note"].as_str().expect("note");
    assert!(
        note.contains("pod keymaker-keymaker-769579fd65-* (host-network)") && note.contains("hostNetwork"),
        "{note}"
    );
    assert_eq!(event["reportingController"], "neutrino.io/injector");
    assert_eq!(event["reportingInstance"], "neutrino-injector-6d5f-x2k9q");
    assert_eq!(event["action"], "InjectSidecar");
    assert!(event["eventTime"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");

    // A denied pod: answered at once too, while the first Event is still held.
    let (answer, took) = post(&inj, &pod_review("u-typo", typo_pod())).await;
    assert!(took < PROMPT, "the review took {took:?}");
    assert_eq!(answer["response"]["allowed"], false);
    let _ = open.send(true);
    let received = api.wait_for(2).await;
    let (path, event) = &received[1];
    assert_eq!(path, "POST /apis/events.k8s.io/v1/namespaces/shop/events");
    assert_eq!((&event["type"], &event["reason"]), (&json!("Warning"), &json!("NeutrinoInjectionDenied")));
    assert_eq!(event["regarding"], json!({"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web-1"}));
    let note = event["note"].as_str().expect("note");
    assert!(
        note.starts_with("pod web-1 denied: ") && note.contains("config.neutrino.io/skip-outbound-ports"),
        "{note}"
    );

    // A dry run has no side effects.
    let mut dry = host_network_review();
    dry["request"]["dryRun"] = json!(true);
    dry["request"]["uid"] = json!("u-dry");
    post(&inj, &dry).await;
    post(&inj, &pod_review("u-typo-2", typo_pod())).await;
    let received = api.wait_for(3).await;
    assert_eq!(received.len(), 3, "the dry run recorded nothing");
    assert_eq!(received[2].1["reason"], "NeutrinoInjectionDenied");
}

#[tokio::test]
async fn with_the_api_server_down_reviews_are_answered_and_the_failure_logged_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut inj = start(port, "info");
    for i in 0..3 {
        let mut review = host_network_review();
        review["request"]["uid"] = json!(format!("u-{i}"));
        let (answer, took) = post(&inj, &review).await;
        assert!(took < PROMPT, "the review took {took:?}");
        assert_eq!(
            (&answer["response"]["uid"], &answer["response"]["allowed"]),
            (&json!(format!("u-{i}")), &json!(true))
        );
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
    }
    let (answer, took) = post(&inj, &pod_review("u-typo", typo_pod())).await;
    assert!(took < PROMPT && answer["response"]["allowed"] == false, "{took:?} {answer}");

    // SIGTERM: the queued Events are tried before exit, then counted.
    let killed = Command::new("kill").args(["-TERM", &inj.child.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let mut stderr = String::new();
    inj.child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    let status = inj.child.wait().expect("wait");
    assert!(status.success(), "{status}\n{stderr}");
    let failures: Vec<&str> = stderr.lines().filter(|l| l.contains("recording the Event")).collect();
    assert_eq!(failures.len(), 1, "logged once:\n{stderr}");
    assert!(failures[0].contains("WARN") && failures[0].contains("reviews are answered as before"), "{stderr}");
    assert!(stderr.contains("events: 0 recorded, 4 failed, 0 dropped"), "{stderr}");
}
