//! End to end: the real `neutrino-injector` binary, spawned with a generated certificate
//! (or certificate files), answering over real HTTPS (HTTP/1.1 and HTTP/2) a client that
//! trusts only the CA it wrote. The shared AdmissionReview bodies
//! (`../shared/testdata/admission/`) and malformed ones built here: status codes, the
//! echoed uid, and the decoded patch applied to the review's pod.

mod common;
#[path = "common/server.rs"]
mod server;

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

use common::{names, read, shared, shared_files};
use server::{Injector, listening, tls};

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_neutrino-injector"))
        .args(["--addr", "127.0.0.1:0", "--log", "warn", "--events=false"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn neutrino-injector")
}

/// Starts the injector with a generated certificate and reads the CA it wrote.
fn start(extra: &[&str]) -> Injector {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    let ca_arg = ca.to_str().expect("utf-8 path");
    let mut args =
        vec!["--self-signed-dns", "localhost,neutrino-injector.neutrino-system.svc", "--ca-bundle-out", ca_arg];
    args.extend(extra);
    let mut child = spawn(&args);
    let addr = listening(&mut child);
    let ca_pem = std::fs::read_to_string(&ca).expect("the CA bundle is written before listening");
    Injector { child, addr, ca_pem, _dir: dir }
}

/// A body of `chunks` chunks of 64 KiB with no declared length (sent chunked).
struct Chunked {
    chunks: usize,
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        self.chunks -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b' '; 64 * 1024])))))
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    alpn: Option<Vec<u8>>,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send<B>(inj: (&SocketAddr, &str), h2: bool, req: Request<B>) -> Result<Reply, String>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tls(*inj.0, inj.1, h2).await?;
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await
    }
    .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status, alpn, body })
}

fn request(method: Method, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("request")
}

impl Injector {
    async fn post(&self, body: impl Into<Bytes>) -> Reply {
        self.call(request(Method::POST, "/mutate?timeout=10s", body)).await
    }

    async fn call(&self, req: Request<Full<Bytes>>) -> Reply {
        send((&self.addr, &self.ca_pem), false, req).await.expect("request")
    }
}

fn review(request: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}))
        .expect("json")
}

fn pod_request(uid: &str, object: Value) -> Value {
    json!({
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": "default",
        "object": object,
    })
}

fn app_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "a"}]}})
}

/// The response's patch, decoded and applied to `pod`.
fn patched(response: &Value, pod: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64 patch");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the review's pod");
    pod
}

#[tokio::test]
async fn the_shared_admission_reviews_are_answered_over_https() {
    let inj = start(&[]);
    let files = shared_files("admission");
    assert_eq!(files.len(), 4);
    let mut injected = 0;
    for path in files {
        let body = read(&path);
        let sent: Value = serde_json::from_str(&body).expect("json");
        let reply = inj.post(body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}: {}", path.display(), reply.text());
        let answer = reply.json();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = &answer["response"];
        assert_eq!(response["uid"], sent["request"]["uid"], "{}", path.display());
        assert_eq!(response["allowed"], true, "{}: {response}", path.display());
        if sent["request"]["kind"]["kind"] != "Pod" {
            assert!(response.get("patch").is_none(), "{}: a non-Pod is not patched", path.display());
            continue;
        }
        let pod = patched(response, &sent["request"]["object"]);
        let init = names(&pod["spec"]["initContainers"]);
        assert_eq!(init[..2], ["neutrino-init", "neutrino-proxy"], "{}", path.display());
        assert_eq!(pod["metadata"]["annotations"]["neutrino.io/injected"], neutrino_injector::VERSION);
        injected += 1;
    }
    assert_eq!(injected, 3);
    // The salesforce pod keeps its two init containers after ours.
    let sent: Value =
        serde_json::from_str(&read(&shared("admission/salesforce-generic-sidecar-injector-admissionreview.json")))
            .expect("json");
    let pod = patched(
        &inj.post(serde_json::to_vec(&sent).expect("json")).await.json()["response"],
        &sent["request"]["object"],
    );
    assert_eq!(names(&pod["spec"]["initContainers"]).len(), 4);
}

#[tokio::test]
async fn malformed_bodies_get_400_with_the_reason() {
    let inj = start(&[]);
    let good = String::from_utf8(review(pod_request("u-1", app_pod()))).expect("utf-8");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good.as_bytes()[..good.len() / 2].to_vec(), "not JSON"),
        (Vec::new(), "not JSON"),
        (b"[1, 2]".to_vec(), "not a JSON object"),
        (good.replace("AdmissionReview", "Pod").into_bytes(), "kind is \"Pod\""),
        (good.replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1").into_bytes(), "admissionReviewVersions"),
        (review(json!({"operation": "CREATE", "object": app_pod()})), "request.uid"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no request"),
    ];
    for (body, reason) in cases {
        let reply = inj.post(body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
        assert!(reply.text().contains(reason), "{reason:?} not in {:?}", reply.text());
    }
    // With the uid known, a Pod CREATE without its object is denied, not a 400.
    let mut no_object = pod_request("u-2", app_pod());
    no_object.as_object_mut().expect("map").remove("object");
    let reply = inj.post(review(no_object)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let response = &reply.json()["response"];
    assert_eq!((response["uid"].as_str(), response["allowed"].as_bool()), (Some("u-2"), Some(false)));
    assert!(response["status"]["message"].as_str().is_some_and(|m| m.contains("request.object")));
}

#[tokio::test]
async fn other_resources_and_operations_are_allowed_unpatched() {
    let inj = start(&[]);
    let mut update = pod_request("u-update", app_pod());
    update["operation"] = json!("UPDATE");
    let mut deployment = pod_request("u-deploy", json!({"kind": "Deployment"}));
    deployment["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["resource"] = json!({"group": "apps", "version": "v1", "resource": "deployments"});
    let mut exec = pod_request("u-exec", json!({"kind": "PodExecOptions"}));
    exec["subResource"] = json!("exec");
    for (uid, request) in [("u-update", update), ("u-deploy", deployment), ("u-exec", exec)] {
        let reply = inj.post(review(request)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["response"], json!({"uid": uid, "allowed": true}));
    }
}

#[tokio::test]
async fn skips_warn_bad_annotations_deny_and_injected_pods_are_left_alone() {
    let inj = start(&[]);
    let mut host = app_pod();
    host["spec"]["hostNetwork"] = json!(true);
    let reply = inj.post(review(pod_request("u-host", host.clone()))).await;
    let response = &reply.json()["response"];
    assert_eq!(response["allowed"], true);
    assert!(response["warnings"][0].as_str().is_some_and(|w| w.contains("hostNetwork")), "{response}");
    let pod = patched(response, &host);
    assert_eq!(pod["metadata"]["annotations"]["neutrino.io/inject-skipped"], "host-network");
    assert!(pod["spec"].get("initContainers").is_none());

    let mut system = pod_request("u-sys", app_pod());
    system["namespace"] = json!("neutrino-system");
    let response = &inj.post(review(system)).await.json()["response"];
    assert!(response["warnings"][0].as_str().is_some_and(|w| w.contains("neutrino-system")), "{response}");

    let mut typo = app_pod();
    typo["metadata"]["annotations"] = json!({"config.neutrino.io/skip-outbound-ports": "5432,mysql"});
    let response = &inj.post(review(pod_request("u-typo", typo))).await.json()["response"];
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().expect("message");
    assert!(message.contains("config.neutrino.io/skip-outbound-ports") && message.contains("mysql"), "{message}");

    let first = inj.post(review(pod_request("u-a", app_pod()))).await.json();
    let once = patched(&first["response"], &app_pod());
    let again = inj.post(review(pod_request("u-b", once))).await.json();
    assert_eq!(again["response"], json!({"uid": "u-b", "allowed": true}), "an injected pod gets no patch");
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let inj = start(&["--max-body-bytes", "1048576"]);
    let reply = inj.post(vec![b' '; 2 * 1024 * 1024]).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", reply.text());
    assert!(reply.text().contains("--max-body-bytes"));
    let chunked = Request::builder()
        .method(Method::POST)
        .uri("/mutate")
        .header("host", "localhost")
        .body(Chunked { chunks: 40 })
        .expect("request");
    let reply = send((&inj.addr, &inj.ca_pem), false, chunked).await.expect("chunked request");
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Under the limit, padding and all, is fine.
    let mut body = review(pod_request("u-big", app_pod()));
    body.extend(vec![b' '; 512 * 1024]);
    assert_eq!(inj.post(body).await.status, StatusCode::OK);
}

#[tokio::test]
async fn routes_methods_and_http2() {
    let inj = start(&[]);
    assert_eq!(inj.call(request(Method::GET, "/ready", "")).await.status, StatusCode::OK);
    assert_eq!(inj.call(request(Method::GET, "/mutate", "")).await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(inj.call(request(Method::POST, "/nowhere", "")).await.status, StatusCode::NOT_FOUND);
    let alias = inj.call(request(Method::POST, "/inject", review(pod_request("u-alias", app_pod())))).await;
    assert_eq!(alias.json()["response"]["uid"], "u-alias");
    let h2 =
        send((&inj.addr, &inj.ca_pem), true, request(Method::POST, "/mutate", review(pod_request("u-h2", app_pod()))))
            .await
            .expect("h2 request");
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h2.status, StatusCode::OK);
    assert_eq!(h2.json()["response"]["uid"], "u-h2");
    // A client that does not trust the injector's CA cannot talk to it.
    let other = neutrino_injector::tls::generate(&["localhost".into()]).expect("another CA");
    assert!(tls(inj.addr, &other.ca_pem, false).await.is_err());
}

fn write_pair(dir: &Path, generated: &neutrino_injector::tls::Generated) {
    // Key first, then certificate: the watcher may read between the two writes and must
    // then keep the old pair (a mismatch), never serve a broken one.
    std::fs::write(dir.join("tls.key"), &generated.key_pem).expect("key");
    std::fs::write(dir.join("tls.crt"), &generated.cert_pem).expect("cert");
}

#[tokio::test]
async fn certificate_files_are_served_and_reloaded_when_they_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = neutrino_injector::tls::generate(&["localhost".into()]).expect("cert");
    write_pair(dir.path(), &first);
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let mut child = spawn(&[
        "--tls-cert",
        cert.to_str().expect("path"),
        "--tls-key",
        key.to_str().expect("path"),
        "--tls-reload-secs",
        "1",
    ]);
    let addr = listening(&mut child);
    let inj = Injector { child, addr, ca_pem: first.ca_pem.clone(), _dir: dir };
    assert_eq!(inj.call(request(Method::GET, "/ready", "")).await.status, StatusCode::OK);

    let second = neutrino_injector::tls::generate(&["localhost".into()]).expect("cert");
    write_pair(inj._dir.path(), &second);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = send((&inj.addr, &second.ca_pem), false, request(Method::GET, "/ready", "")).await;
        if reply.is_ok_and(|r| r.status == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was not served within 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(tls(inj.addr, &first.ca_pem, false).await.is_err(), "the old certificate is no longer served");
}

#[test]
fn without_a_certificate_it_refuses_to_start_and_says_what_to_give() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_neutrino-injector")).args(["--addr", "127.0.0.1:0"]).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-cert") && stderr.contains("--self-signed-dns"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_neutrino-injector"))
        .args(["--addr", "127.0.0.1:0", "--self-signed-dns", "localhost", "--proxy-memory-limit", "huge"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--proxy-memory-limit"));
}

#[tokio::test]
async fn sigterm_stops_it_cleanly() {
    let mut inj = start(&[]);
    assert_eq!(inj.call(request(Method::GET, "/ready", "")).await.status, StatusCode::OK);
    let pid = inj.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = inj.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 15 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}
