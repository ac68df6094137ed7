//! `neutrino check` end to end without a cluster: the real binary, pointed by KUBECONFIG
//! at a local HTTP server (in this file) answering the API server's endpoints that the
//! check reads with real object JSON: version, access reviews, the webhook configuration
//! (as `neutrino install` renders it), EndpointSlices, pods, namespaces, and the service
//! and pod proxies (the injector's `/ready`, each control plane's `/config_dump` and `/metrics`).

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// What the fake API server holds; the test changes it between runs.
#[derive(Clone)]
struct Cluster {
    webhook: Option<Value>,
    /// Requests for paths the server does not know.
    unknown: Arc<Mutex<Vec<String>>>,
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "7"}, "items": items})
}

fn pod(ns: &str, name: &str, proxy_image: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": {"app.kubernetes.io/name": "neutrino-control-plane"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    });
    if let Some(image) = proxy_image {
        pod["metadata"]["annotations"] = json!({"neutrino.io/injected": "0.1.0"});
        pod["spec"]["initContainers"] = json!([{"name": "neutrino-proxy", "image": image, "restartPolicy": "Always"}]);
    }
    pod
}

fn config_dump(pod: &str) -> Value {
    json!({"generation": 3, "proxies": [{
        "node_id": format!("{pod}.shop"), "pod": pod, "namespace": "shop", "service_account": "default",
        "types": {"Service": {"last_sent_generation": 3, "acked_generation": 3, "last_nack": null}},
    }]})
}

fn status_404(what: &str) -> (u16, Value) {
    let status = json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404});
    (404, status)
}

fn answer(cluster: &Cluster, method: &str, path: &str, query: &str, body: &[u8]) -> (u16, Value) {
    let ns = "/api/v1/namespaces/neutrino-system";
    match (method, path) {
        ("GET", "/version") => (
            200,
            json!({
                "major": "1", "minor": "32", "gitVersion": "v1.32.2", "gitCommit": "abc", "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64",
            }),
        ),
        (
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
            | "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        ) => {
            let mut review: Value = serde_json::from_slice(body).unwrap();
            review["status"] = json!({"allowed": true});
            (201, review)
        }
        ("GET", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/neutrino-sidecar-injector") => {
            match &cluster.webhook {
                Some(w) => (200, w.clone()),
                None => status_404("mutatingwebhookconfigurations neutrino-sidecar-injector"),
            }
        }
        ("GET", "/apis/discovery.k8s.io/v1/namespaces/neutrino-system/endpointslices") => {
            assert!(query.contains("labelSelector=kubernetes.io%2Fservice-name%3Dneutrino-injector"), "{query}");
            let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "neutrino-injector-x", "namespace": "neutrino-system"}, "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": true}}],
                "ports": [{"name": "https-webhook", "port": 15017, "protocol": "TCP"}]});
            (200, list("EndpointSliceList", vec![slice]))
        }
        ("GET", p) if p == format!("{ns}/services/https:neutrino-injector:443/proxy/ready") => (200, json!("ready")),
        ("GET", p) if p == format!("{ns}/pods") => {
            assert!(query.contains("labelSelector=app.kubernetes.io%2Fname%3Dneutrino-control-plane"), "{query}");
            let cps = vec![pod("neutrino-system", "cp-a", None), pod("neutrino-system", "cp-b", None)];
            (200, list("PodList", cps))
        }
        ("GET", p) if p.starts_with(&format!("{ns}/pods/")) && p.ends_with(":15014/proxy/config_dump") => {
            let replica = p.trim_start_matches(&format!("{ns}/pods/")).trim_end_matches(":15014/proxy/config_dump");
            (200, config_dump(if replica == "cp-a" { "web-1" } else { "web-2" }))
        }
        ("GET", p) if p.starts_with(&format!("{ns}/pods/")) && p.ends_with(":15014/proxy/metrics") => {
            // The mesh CA's issuer ends in 200 days, its anchor in 3000.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let text = format!(
                "neutrino_cp_issuer_expiry_timestamp_seconds {}\nneutrino_cp_anchor_expiry_timestamp_seconds {}\n",
                now + 200 * 86_400,
                now + 3000 * 86_400
            );
            (200, json!(text))
        }
        ("GET", "/api/v1/namespaces") => {
            let shop = json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"neutrino.io/inject": "enabled"}}});
            (200, list("NamespaceList", vec![shop]))
        }
        ("GET", "/api/v1/namespaces/shop/pods") => {
            let image = Some("neutrino/neutrino-proxy:0.1.0");
            (200, list("PodList", vec![pod("shop", "web-1", image), pod("shop", "web-2", image)]))
        }
        _ => {
            cluster.unknown.lock().unwrap().push(format!("{method} {path}?{query}"));
            status_404(path)
        }
    }
}

/// Serves `cluster` on a free loopback port until the runtime ends.
async fn serve(cluster: Cluster) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let cluster = cluster.clone();
                    async move {
                        let (method, path) = (req.method().to_string(), req.uri().path().to_string());
                        let query = req.uri().query().unwrap_or("").to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let (code, value) = answer(&cluster, &method, &path, &query, &body);
                        let text = match value {
                            Value::String(s) => s,
                            v => v.to_string(),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(text)));
                        *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    port
}

/// Runs `neutrino check` against the API server on `port`.
async fn check(port: u16) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_neutrino"));
    cmd.args(["check", "--timeout-secs", "5"]).env("KUBECONFIG", &kubeconfig).env_remove("KUBERNETES_SERVICE_HOST");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (out, stdout)
}

/// The webhook configuration as `neutrino install` renders it, with a CA ending
/// `days_left` days from now.
fn webhook(days_left: i64) -> Value {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let yaml = Command::new(env!("CARGO_BIN_EXE_neutrino")).args(["install", "--cert-manager"]).output().unwrap();
    let docs = neutrino_injector::manifest::read_documents(&String::from_utf8(yaml.stdout).unwrap()).unwrap();
    let mut hook = docs.into_iter().map(|(_, j)| j).find(|j| j["kind"] == "MutatingWebhookConfiguration").unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let at = |secs: i64| x509_parser::time::ASN1Time::from_timestamp(secs).unwrap().to_datetime();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (ca.not_before, ca.not_after) = (at(now - 400 * 86_400), at(now + days_left * 86_400));
    let pem = ca.self_signed(&KeyPair::generate().unwrap()).unwrap().pem();
    hook["webhooks"][0]["clientConfig"]["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(pem));
    hook
}

#[tokio::test]
async fn a_healthy_mesh_passes() {
    let cluster = Cluster { webhook: Some(webhook(365)), unknown: Arc::default() };
    let port = serve(cluster.clone()).await;
    let (out, stdout) = check(port).await;
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "✔ Kubernetes API: reachable, v1.32.2",
        "✔ Permissions (you): may install and inspect the mesh (11 rights checked)",
        "✔ Permissions (control plane): discovery may list and watch what it needs",
        "✔ Injector webhook: neutrino-sidecar-injector registered (failurePolicy Fail) -> neutrino-system/neutrino-injector",
        "✔ Injector reachable: 1 ready endpoints; /ready answers through the API server",
        "✔ Control plane: 2/2 pods ready",
        "✔ Proxies connected: 2 connected (1 on cp-a, 1 on cp-b), all in sync",
        "✔ Proxy versions: 2 at 0.1.0",
        "all checks passed",
    ] {
        assert!(stdout.lines().any(|l| l == line), "missing {line:?} in:\n{stdout}");
    }
    assert!(stdout.contains("✔ Webhook CA: valid for 36"), "{stdout}");
    assert!(
        stdout.contains("✔ Mesh CA: issuer valid for 199 more days")
            || stdout.contains("✔ Mesh CA: issuer valid for 200 more days"),
        "{stdout}"
    );
    assert_eq!(*cluster.unknown.lock().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn a_missing_webhook_fails() {
    let port = serve(Cluster { webhook: None, unknown: Arc::default() }).await;
    let (out, stdout) = check(port).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("✘ Injector webhook: neutrino-sidecar-injector is not registered\n"), "{stdout}");
    assert!(stdout.contains("    hint: install the mesh: neutrino install | kubectl apply -f -\n"), "{stdout}");
    assert!(!stdout.contains("Webhook CA"), "{stdout}");
}

#[tokio::test]
async fn an_expiring_ca_warns_and_an_expired_one_fails() {
    let port = serve(Cluster { webhook: Some(webhook(10)), unknown: Arc::default() }).await;
    let (out, stdout) = check(port).await;
    assert!(out.status.success(), "a warning alone exits 0:\n{stdout}");
    assert!(stdout.contains("⚠ Webhook CA: expires in 9 days") || stdout.contains("⚠ Webhook CA: expires in 10 days"));
    assert!(stdout.contains("all checks passed, 1 warning(s)"), "{stdout}");

    let port = serve(Cluster { webhook: Some(webhook(-2)), unknown: Arc::default() }).await;
    let (out, stdout) = check(port).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("✘ Webhook CA: expired on"), "{stdout}");
}

#[tokio::test]
async fn an_unreachable_api_fails_with_a_hint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (out, stdout) = check(port).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("✘ Kubernetes API: unreachable"), "{stdout}");
    assert!(stdout.contains("hint: check KUBECONFIG"), "{stdout}");
}
