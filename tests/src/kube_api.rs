//! A local HTTP server that speaks the Kubernetes API server's list/watch protocol with
//! real object JSON, for tests of the control plane's Kubernetes source: lists carrying
//! `metadata.resourceVersion`, and watches (`?watch=true&resourceVersion=N&
//! allowWatchBookmarks=true`) streaming newline-delimited ADDED / MODIFIED / DELETED /
//! BOOKMARK / ERROR events, plus the faults a real one has (410 Gone, dropped
//! connections). It stands in for a cluster, which cannot run here; it must not
//! interpret the objects beyond their metadata.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// A collection the control plane watches, by URL path segment.
const KINDS: [&str; 6] = ["services", "endpointslices", "pods", "namespaces", "configmaps", "authorizationpolicies"];

type Chunk = std::result::Result<Frame<Bytes>, std::io::Error>;

struct Watch {
    kind: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Chunk>,
}

impl Watch {
    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        self.namespace.as_deref().is_none_or(|ns| meta["namespace"] == ns)
            && self.name.as_deref().is_none_or(|n| meta["name"] == n)
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// kind -> "<namespace>/<name>" -> object (with its resourceVersion).
    objects: HashMap<&'static str, BTreeMap<String, Value>>,
    /// Every event with its resourceVersion, for watches that resume from an older one.
    history: Vec<(u64, &'static str, &'static str, Value)>,
    watches: Vec<Watch>,
    lists: HashMap<&'static str, usize>,
    watch_calls: HashMap<&'static str, usize>,
    bookmark_params: usize,
    /// A slow API server: ConfigMap lists answer after this long.
    configmap_list_delay: Duration,
    /// The pod proxy: "<namespace>/<pod>:<port>" -> the address it forwards to
    /// (see [`FakeApi::proxy_pod`]).
    pod_proxies: HashMap<String, std::net::SocketAddr>,
    /// Paths requested through the pod proxy, in order.
    pod_proxy_calls: Vec<String>,
    /// TokenReview answers: token -> `status` (see [`FakeApi::review_token`]).
    token_reviews: HashMap<String, Value>,
    /// The `spec` of every TokenReview received, in order.
    reviews_seen: Vec<Value>,
}

#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

fn key(obj: &Value) -> String {
    format!("{}/{}", obj["metadata"]["namespace"].as_str().unwrap_or(""), obj["metadata"]["name"].as_str().unwrap())
}

fn line(event: &str, obj: &Value) -> Chunk {
    let mut text = serde_json::to_vec(&json!({"type": event, "object": obj})).unwrap();
    text.push(b'\n');
    Ok(Frame::data(Bytes::from(text)))
}

impl FakeApi {
    /// Holds every ConfigMap list this long before answering (a slow API server).
    pub fn delay_configmap_lists(&self, by: Duration) {
        self.state().configmap_list_delay = by;
    }

    /// Watch requests that asked for bookmarks (`allowWatchBookmarks=true`).
    pub fn bookmark_requests(&self) -> usize {
        self.state().bookmark_params
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// Creates or replaces an object, as a client's apply would: a new resourceVersion,
    /// ADDED or MODIFIED to every matching watch.
    pub fn apply(&self, kind: &'static str, mut obj: Value) {
        let mut s = self.state();
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = key(&obj);
        let event =
            if s.objects.entry(kind).or_default().insert(k, obj.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        s.history.push((rv, kind, event, obj.clone()));
        s.watches.retain(|w| w.kind != kind || !w.matches(&obj) || w.tx.send(line(event, &obj)).is_ok());
    }

    /// Changes an object without telling any watch or keeping history: what a client
    /// that missed compacted events would never see without a new list.
    pub fn apply_unseen(&self, kind: &'static str, mut obj: Value) {
        let mut s = self.state();
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.objects.entry(kind).or_default().insert(key(&obj), obj);
    }

    pub fn delete(&self, kind: &'static str, namespace: &str, name: &str) {
        let mut s = self.state();
        s.rv += 1;
        let rv = s.rv;
        let mut obj = s.objects.entry(kind).or_default().remove(&format!("{namespace}/{name}")).unwrap();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push((rv, kind, "DELETED", obj.clone()));
        s.watches.retain(|w| w.kind != kind || !w.matches(&obj) || w.tx.send(line("DELETED", &obj)).is_ok());
    }

    /// A BOOKMARK with the newest resourceVersion to every watch of `kind`.
    pub fn bookmark(&self, kind: &'static str) -> usize {
        let mut s = self.state();
        s.rv += 1;
        let rv = s.rv.to_string();
        let (api_version, k) = type_of(kind);
        let bm = json!({"kind": k, "apiVersion": api_version, "metadata": {"resourceVersion": rv}});
        s.watches.retain(|w| w.kind != kind || w.tx.send(line("BOOKMARK", &bm)).is_ok());
        s.watches.iter().filter(|w| w.kind == kind).count()
    }

    /// Answers every watch of `kind` with ERROR 410 Gone and ends it, as the API server
    /// does when the resourceVersion has been compacted away.
    pub fn gone(&self, kind: &'static str) -> usize {
        let mut s = self.state();
        let rv = s.rv;
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: 1 ({rv})"), "reason": "Expired", "code": 410
        });
        let mut n = 0;
        s.watches.retain(|w| {
            if w.kind != kind {
                return true;
            }
            let _ = w.tx.send(line("ERROR", &status));
            n += 1;
            false
        });
        // The history is gone too: a resumed watch could not replay it.
        s.history.retain(|(_, k, _, _)| *k != kind);
        n
    }

    /// Ends every watch of `kind`: cleanly (end of the chunked body), or by cutting the
    /// connection mid-stream.
    pub fn drop_watches(&self, kind: &'static str, cut: bool) -> usize {
        let mut s = self.state();
        let mut n = 0;
        s.watches.retain(|w| {
            if w.kind != kind {
                return true;
            }
            if cut {
                let _ = w.tx.send(Err(std::io::Error::other("connection cut by the test")));
            }
            n += 1;
            false
        });
        n
    }

    pub fn lists(&self, kind: &str) -> usize {
        self.state().lists.get(kind).copied().unwrap_or(0)
    }

    pub fn watch_calls(&self, kind: &str) -> usize {
        self.state().watch_calls.get(kind).copied().unwrap_or(0)
    }

    pub fn open_watches(&self, kind: &str) -> usize {
        self.state().watches.iter().filter(|w| w.kind == kind && !w.tx.is_closed()).count()
    }

    pub async fn serve(self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let api = self.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move {
                            if req.method() == hyper::Method::POST && req.uri().path() == TOKEN_REVIEWS {
                                return Ok::<_, Infallible>(api.token_review(req).await);
                            }
                            if req.uri().path().contains("/proxy/") {
                                return Ok::<_, Infallible>(api.pod_proxy(req.uri().path()).await);
                            }
                            let delay = api.state().configmap_list_delay;
                            let q = req.uri().query().unwrap_or("");
                            if req.uri().path().ends_with("/configmaps") && !q.contains("watch=") {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, Infallible>(api.handle(req))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        port
    }

    fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<BoxBody<Bytes, std::io::Error>> {
        let path = req.uri().path().to_string();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (namespace, kind) = match segments.as_slice() {
            ["api", "v1", "namespaces", ns, kind] | ["apis", _, _, "namespaces", ns, kind] => {
                (Some(ns.to_string()), *kind)
            }
            ["api", "v1", kind] | ["apis", _, _, kind] => (None, *kind),
            _ => return status(404, "NotFound", &format!("no route {path}")),
        };
        let Some(kind) = KINDS.iter().copied().find(|k| *k == kind) else {
            return status(404, "NotFound", &format!("unknown kind {kind}"));
        };
        let name = query.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_string);
        let filter = Watch { kind, namespace, name, tx: mpsc::unbounded_channel().0 };
        let mut s = self.state();
        if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            *s.watch_calls.entry(kind).or_default() += 1;
            if query.get("allowWatchBookmarks").is_some_and(|b| b == "true") {
                s.bookmark_params += 1;
            }
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let (tx, rx) = mpsc::unbounded_channel();
            for (rv, k, event, obj) in &s.history {
                if *rv > from && *k == kind && filter.matches(obj) {
                    let _ = tx.send(line(event, obj));
                }
            }
            s.watches.push(Watch { tx, ..filter });
            let body = StreamBody::new(UnboundedReceiverStream::new(rx));
            return Response::builder().header("content-type", "application/json").body(BoxBody::new(body)).unwrap();
        }
        *s.lists.entry(kind).or_default() += 1;
        let items: Vec<Value> = s
            .objects
            .get(kind)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| filter.matches(o))
            .map(|o| {
                // Lists carry their items without kind and apiVersion, as the API server's do.
                let mut o = o.clone();
                o.as_object_mut().unwrap().retain(|k, _| k != "kind" && k != "apiVersion");
                o
            })
            .collect();
        let (api_version, k) = type_of(kind);
        let list = json!({
            "kind": format!("{k}List"), "apiVersion": api_version,
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items
        });
        json_response(200, &list)
    }
}

fn type_of(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "services" => ("v1", "Service"),
        "endpointslices" => ("discovery.k8s.io/v1", "EndpointSlice"),
        "pods" => ("v1", "Pod"),
        "namespaces" => ("v1", "Namespace"),
        "authorizationpolicies" => ("policy.neutrino.io/v1alpha1", "AuthorizationPolicy"),
        _ => ("v1", "ConfigMap"),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn json_response(code: u16, v: &Value) -> Response<BoxBody<Bytes, std::io::Error>> {
    let body = Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).map_err(|never: Infallible| match never {});
    Response::builder().status(code).header("content-type", "application/json").body(BoxBody::new(body)).unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<BoxBody<Bytes, std::io::Error>> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

impl FakeApi {
    /// Serves `GET /api/v1/namespaces/NS/pods/POD:PORT/proxy/PATH` by fetching `PATH`
    /// from `to`, as the API server's pod proxy does from the pod's IP.
    pub fn proxy_pod(&self, namespace: &str, pod: &str, port: u16, to: std::net::SocketAddr) {
        self.state().pod_proxies.insert(format!("{namespace}/{pod}:{port}"), to);
    }

    /// The paths requested through the pod proxy, in order.
    pub fn pod_proxy_calls(&self) -> Vec<String> {
        self.state().pod_proxy_calls.clone()
    }

    async fn pod_proxy(&self, path: &str) -> Response<BoxBody<Bytes, std::io::Error>> {
        self.state().pod_proxy_calls.push(path.to_string());
        let segments: Vec<&str> = path.trim_start_matches('/').splitn(7, '/').collect();
        let ["api", "v1", "namespaces", ns, "pods", pod_port, rest] = segments.as_slice() else {
            return status(404, "NotFound", &format!("no route {path}"));
        };
        let Some(rest) = rest.strip_prefix("proxy") else {
            return status(404, "NotFound", &format!("no route {path}"));
        };
        let Some(to) = self.state().pod_proxies.get(&format!("{ns}/{pod_port}")).copied() else {
            return status(404, "NotFound", &format!("pods \"{pod_port}\" not found"));
        };
        // What the API server answers when the pod does not: 503 with a Status.
        match reqwest::get(format!("http://{to}{rest}")).await {
            Ok(r) => {
                let code = r.status().as_u16();
                let body = Full::new(r.bytes().await.unwrap_or_default()).map_err(|never: Infallible| match never {});
                Response::builder().status(code).body(BoxBody::new(body)).unwrap()
            }
            Err(e) => status(503, "ServiceUnavailable", &format!("error trying to reach service: {e}")),
        }
    }
}

/// Where kube clients POST TokenReviews.
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

impl FakeApi {
    /// Makes `token` review as `status` (a TokenReviewStatus, e.g.
    /// `{"authenticated": true, "user": {"username": "system:serviceaccount:ns:sa"}, "audiences": ["neutrino"]}`).
    /// Unknown tokens review as `{"authenticated": false, "error": "invalid bearer token"}`.
    pub fn review_token(&self, token: &str, status: Value) {
        self.state().token_reviews.insert(token.to_string(), status);
    }

    /// The `spec` of each TokenReview received (token and audiences).
    pub fn reviews_seen(&self) -> Vec<Value> {
        self.state().reviews_seen.clone()
    }

    /// POST tokenreviews: the review echoed with its status, 201 Created, as the API server answers.
    async fn token_review(&self, req: Request<hyper::body::Incoming>) -> Response<BoxBody<Bytes, std::io::Error>> {
        let Ok(body) = req.into_body().collect().await else {
            return status(400, "BadRequest", "unreadable body");
        };
        let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return status(400, "BadRequest", "the body is not JSON");
        };
        if review["kind"] != "TokenReview" || review["apiVersion"] != "authentication.k8s.io/v1" {
            return status(400, "BadRequest", &format!("not an authentication.k8s.io/v1 TokenReview: {review}"));
        }
        let spec = review["spec"].clone();
        let mut s = self.state();
        s.reviews_seen.push(spec.clone());
        let token = spec["token"].as_str().unwrap_or("");
        let answer = s
            .token_reviews
            .get(token)
            .cloned()
            .unwrap_or_else(|| json!({"authenticated": false, "error": "invalid bearer token"}));
        json_response(
            201,
            &json!({
                "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null},
                "spec": spec, "status": answer
            }),
        )
    }
}

/// Writes a kubeconfig in `dir` pointing at the local API server on `port` (plain HTTP, no
/// credentials), as kube clients read it from KUBECONFIG; returns its path.
pub fn kubeconfig(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
         users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
         current-context: fake\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}
