//! Kubernetes discovery end to end, without a cluster: the real control-plane binary
//! with `--kubernetes`, pointed by KUBECONFIG at a local HTTP server (in this file) that
//! speaks the API server's list/watch protocol with real object JSON: lists carrying
//! `metadata.resourceVersion`, and watches (`?watch=true&resourceVersion=N&
//! allowWatchBookmarks=true`) streaming newline-delimited ADDED / MODIFIED / DELETED /
//! BOOKMARK / ERROR events. What the control plane made of it is read from its real
//! gRPC Discovery stream, as a proxy would see it.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, ensure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use neutrino_proto::discovery_client::DiscoveryClient;
use neutrino_proto::resource::Body;
use neutrino_proto::{DiscoveryRequest, Node, type_url};
use neutrino_tests::kube_api::FakeApi;
use neutrino_tests::*;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------ objects (real JSON)

const NS: &str = "shop";

fn namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": NS, "uid": "6f1c", "labels": {"kubernetes.io/metadata.name": NS}},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn service(name: &str, ip: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "annotations": annotations,
                     "labels": {"app": name}, "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
        },
        "status": {"loadBalancer": {}}
    })
}

fn slice(service: &str, endpoints: Value, port: u16) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x7k2p"), "namespace": NS, "generateName": format!("{service}-"),
            "labels": {"kubernetes.io/service-name": service,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                 "uid": format!("uid-{service}"), "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn endpoint(ip: &str, pod: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": "node-1", "zone": "zone-a",
        "targetRef": {"kind": "Pod", "namespace": NS, "name": pod, "uid": format!("uid-{pod}")}
    })
}

fn pod(name: &str, app: &str, cpu: &str, memory: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "labels": {"app": app},
                     "annotations": annotations,
                     "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1"}]},
        "spec": {
            "containers": [
                {"name": "server", "image": "registry.example/app:1", "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                 "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": "8", "memory": "16Gi"}}},
                {"name": "neutrino-proxy", "image": "neutrino-proxy:dev",
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}
            ],
            "restartPolicy": "Always", "serviceAccountName": "default", "nodeName": "node-1"
        },
        "status": {"phase": "Running", "podIP": "10.244.1.5", "qosClass": "Burstable"}
    })
}

const DOC: &str = r#"{"openapi": "3.0.0", "info": {"title": "t", "version": "1"}, "paths": {"/orders": {"get": {"operationId": "listOrders", "responses": {"200": {"description": "ok"}}}}}}"#;

fn configmap(name: &str, doc: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}")},
           "data": {"openapi.json": doc}})
}

// ------------------------------------------------------------ the control plane

struct Cp {
    child: std::process::Child,
    log: std::path::PathBuf,
    grpc: u16,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl Cp {
    fn start(api_port: u16) -> Cp {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = neutrino_tests::kube_api::kubeconfig(dir.path(), api_port);
        let (grpc, admin) = (free_port(), free_port());
        let mut cmd = std::process::Command::new(bin("neutrino-control-plane"));
        cmd.args(["--kubernetes", "--grpc-addr", &format!("127.0.0.1:{grpc}"), "--admin-addr"])
            .arg(format!("127.0.0.1:{admin}"))
            .args(["--debounce-quiet-ms", "20", "--log", "info,neutrino_control_plane=debug"])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("NEUTRINO_MESH_FILE")
            .env_remove("KUBERNETES_SERVICE_HOST");
        let (child, log) = spawn_logged("neutrino-control-plane", cmd, dir.path());
        Cp { child, log, grpc, admin, _dir: dir }
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- control plane log -----\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// What a proxy would hold: every Service, Endpoints and Policy resource, kept current from a
/// wildcard Discovery stream that ACKs each response.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<BTreeMap<(String, String), Body>>>, Arc<Mutex<BTreeMap<(String, String), Body>>>);

impl Seen {
    async fn follow(grpc: u16) -> Seen {
        let seen = Seen::default();
        let mut client = wait_for("the Discovery port", WAIT, || async {
            Ok(DiscoveryClient::connect(format!("http://127.0.0.1:{grpc}")).await?)
        })
        .await;
        let (tx, rx) = mpsc::channel(8);
        for (i, t) in [type_url::SERVICE, type_url::ENDPOINTS, type_url::POLICY].into_iter().enumerate() {
            let node = (i == 0).then(|| Node { id: "test.shop".into(), pod: "test".into(), ..Default::default() });
            tx.send(DiscoveryRequest { node, type_url: t.into(), subscribe: vec!["*".into()], ..Default::default() })
                .await
                .unwrap();
        }
        let mut stream = client.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let state = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                {
                    let mut m = state.0.lock().unwrap();
                    let short = type_url::short(&r.type_url).to_string();
                    for name in &r.removed_resources {
                        m.remove(&(short.clone(), name.clone()));
                    }
                    let mut first = state.1.lock().unwrap();
                    for res in r.resources {
                        if let Some(body) = res.body {
                            let key = (short.clone(), res.name);
                            first.entry(key.clone()).or_insert_with(|| body.clone());
                            m.insert(key, body);
                        }
                    }
                }
                let ack = DiscoveryRequest { type_url: r.type_url, response_nonce: r.nonce, ..Default::default() };
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        });
        seen
    }

    fn endpoints(&self, name: &str) -> Option<neutrino_proto::Endpoints> {
        match self.0.lock().unwrap().get(&("Endpoints".into(), format!("{NS}/{name}"))) {
            Some(Body::Endpoints(e)) => Some(e.clone()),
            _ => None,
        }
    }

    fn policy(&self, name: &str) -> Option<neutrino_proto::Policy> {
        match self.0.lock().unwrap().get(&("Policy".into(), format!("{NS}/{name}"))) {
            Some(Body::Policy(p)) => Some(p.clone()),
            _ => None,
        }
    }

    /// The first version of a Service this stream received.
    fn first_service(&self, name: &str) -> Option<neutrino_proto::Service> {
        match self.1.lock().unwrap().get(&("Service".into(), format!("{NS}/{name}"))) {
            Some(Body::Service(s)) => Some(s.clone()),
            _ => None,
        }
    }

    fn service(&self, name: &str) -> Option<neutrino_proto::Service> {
        match self.0.lock().unwrap().get(&("Service".into(), format!("{NS}/{name}"))) {
            Some(Body::Service(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Waits until the endpoints of `name` are exactly `want` as (address, ready, cpu millis, memory bytes).
    async fn wait_endpoints(&self, what: &str, name: &str, want: &[(&str, bool, u64, u64)]) {
        wait_for(what, WAIT, || async {
            let e = self.endpoints(name).ok_or_else(|| anyhow!("no Endpoints {name}"))?;
            let got: Vec<(String, bool, u64, u64)> = e
                .endpoints
                .iter()
                .map(|ep| {
                    let c = ep.capacity.unwrap_or_default();
                    (ep.address.clone(), ep.ready, c.cpu_millis, c.memory_bytes)
                })
                .collect();
            let want: Vec<(String, bool, u64, u64)> =
                want.iter().map(|(a, r, c, m)| (a.to_string(), *r, *c, *m)).collect();
            ensure!(got == want, "have {got:?}, want {want:?}");
            Ok(())
        })
        .await
    }
}

const GI: u64 = 1 << 30;

/// A fake cluster with one Service "orders" (a ready pod and a starting one) whose
/// OpenAPI document is in a ConfigMap, and the control plane watching it.
async fn started() -> (FakeApi, Cp, Seen) {
    let api = FakeApi::default();
    // Slow enough that a view sent before the ConfigMap is read would be published.
    api.delay_configmap_lists(Duration::from_millis(300));
    api.apply("namespaces", namespace());
    api.apply(
        "services",
        service("orders", "10.96.0.20", json!({"neutrino.io/openapi": "configmap:orders-api/openapi.json"})),
    );
    api.apply("configmaps", configmap("orders-api", DOC));
    api.apply("pods", pod("orders-1", "orders", "2", "4Gi", json!({})));
    api.apply("pods", pod("orders-2", "orders", "2", "4Gi", json!({"neutrino.io/capacity": "cpu=500m"})));
    api.apply(
        "endpointslices",
        slice(
            "orders",
            json!([
                endpoint("10.244.1.5", "orders-1", true, true, false),
                endpoint("10.244.1.6", "orders-2", false, false, false)
            ]),
            8080,
        ),
    );
    let port = api.clone().serve().await;
    let cp = Cp::start(port);
    let seen = Seen::follow(cp.grpc).await;
    seen.wait_endpoints(
        "the initial endpoints",
        "orders",
        &[("10.244.1.5", true, 2000, 4 * GI), ("10.244.1.6", false, 500, 4 * GI)],
    )
    .await;
    (api, cp, seen)
}

// ------------------------------------------------------------ the tests

#[tokio::test]
async fn adds_updates_deletes_and_bookmarks_reach_the_discovery_stream() {
    let (api, cp, seen) = started().await;
    let (code, body) = get(cp.admin, "/ready").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(api.bookmark_requests() > 0, "watches ask for bookmarks");

    // The Service: cluster IP, DNS names, and routes from the ConfigMap's document.
    let svc = seen.service("orders").unwrap();
    assert_eq!(svc.virtual_ips, ["10.96.0.20"]);
    assert!(svc.hostnames.contains(&"orders.shop.svc.cluster.local".to_string()));
    assert_eq!(svc.ports[0].target_port, 8080);
    wait_for("routes from the ConfigMap", WAIT, || async {
        let s = seen.service("orders").ok_or_else(|| anyhow!("no service"))?;
        ensure!(s.routes.iter().any(|r| r.operation_id == "listOrders"), "routes {:?}", s.routes);
        Ok(())
    })
    .await;
    // The view was held until the ConfigMap was read: never a version without routes.
    let first = seen.first_service("orders").unwrap();
    assert!(first.routes.iter().any(|r| r.operation_id == "listOrders"), "first version: {:?}", first.routes);
    let e = seen.endpoints("orders").unwrap();
    assert_eq!(e.endpoints[0].pod, "orders-1");
    assert_eq!(e.endpoints[0].zone, "zone-a");

    // Updates: the starting pod becomes ready; the first starts terminating (still
    // serving: kept, not ready); a pod's requests change.
    api.apply(
        "endpointslices",
        slice(
            "orders",
            json!([
                endpoint("10.244.1.5", "orders-1", false, true, true),
                endpoint("10.244.1.6", "orders-2", true, true, false)
            ]),
            8080,
        ),
    );
    seen.wait_endpoints(
        "readiness changes",
        "orders",
        &[("10.244.1.5", false, 2000, 4 * GI), ("10.244.1.6", true, 500, 4 * GI)],
    )
    .await;
    api.apply("pods", pod("orders-1", "orders", "3", "6Gi", json!({})));
    seen.wait_endpoints(
        "the pod's new requests",
        "orders",
        &[("10.244.1.5", false, 3000, 6 * GI), ("10.244.1.6", true, 500, 4 * GI)],
    )
    .await;

    // A bookmark moves the resourceVersion on; nothing is listed again, and the next
    // event still arrives.
    let lists = api.lists("endpointslices");
    assert!(api.bookmark("endpointslices") > 0, "a watch is open");
    api.apply("endpointslices", slice("orders", json!([endpoint("10.244.1.6", "orders-2", true, true, false)]), 8080));
    seen.wait_endpoints("the terminated pod gone", "orders", &[("10.244.1.6", true, 500, 4 * GI)]).await;
    assert_eq!(api.lists("endpointslices"), lists, "a bookmark is not a reason to list again");

    // A new document in the ConfigMap reaches the routes.
    api.apply("configmaps", configmap("orders-api", &DOC.replace("listOrders", "listAllOrders")));
    wait_for("routes from the edited ConfigMap", WAIT, || async {
        let s = seen.service("orders").ok_or_else(|| anyhow!("no service"))?;
        ensure!(s.routes.iter().any(|r| r.operation_id == "listAllOrders"), "routes {:?}", s.routes);
        Ok(())
    })
    .await;

    // Deletes: the Service goes, and with it its Endpoints.
    api.delete("services", NS, "orders");
    api.delete("endpointslices", NS, "orders-x7k2p");
    wait_for("the service removed", WAIT, || async {
        ensure!(seen.service("orders").is_none() && seen.endpoints("orders").is_none(), "still there");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_410_gone_makes_it_list_again() {
    let (api, _cp, seen) = started().await;
    let lists = api.lists("endpointslices");
    // A change the watch never delivers (its events were compacted away), then 410.
    api.apply_unseen(
        "endpointslices",
        slice("orders", json!([endpoint("10.244.1.7", "orders-1", true, true, false)]), 8080),
    );
    assert_eq!(api.gone("endpointslices"), 1, "one open watch answered with 410");
    seen.wait_endpoints("the state after the new list", "orders", &[("10.244.1.7", true, 2000, 4 * GI)]).await;
    assert_eq!(api.lists("endpointslices"), lists + 1, "exactly one new list");
    // And it watches again from the new list's resourceVersion.
    wait_for("a new watch", WAIT, || async {
        ensure!(api.open_watches("endpointslices") == 1, "no watch open");
        Ok(())
    })
    .await;
    api.apply("pods", pod("orders-1", "orders", "1", "1Gi", json!({})));
    seen.wait_endpoints("a change after the relist", "orders", &[("10.244.1.7", true, 1000, GI)]).await;
}

#[tokio::test]
async fn a_dropped_watch_is_resumed_without_a_new_list() {
    let (api, _cp, seen) = started().await;
    for (round, cut) in [(1u64, false), (2, true)] {
        let (lists, watches) = (api.lists("pods"), api.watch_calls("pods"));
        assert_eq!(api.drop_watches("pods", cut), 1, "one open pod watch");
        // A change while the watch is down: the resumed watch replays it.
        let cpu = format!("{}", 2 + round);
        api.apply("pods", pod("orders-1", "orders", &cpu, "4Gi", json!({})));
        seen.wait_endpoints(
            if cut { "the change after a cut connection" } else { "the change after a closed watch" },
            "orders",
            &[("10.244.1.5", true, (2 + round) * 1000, 4 * GI), ("10.244.1.6", false, 500, 4 * GI)],
        )
        .await;
        assert!(api.watch_calls("pods") > watches, "it watched again");
        assert_eq!(api.lists("pods"), lists, "resumed from its resourceVersion, no new list");
    }
}

#[tokio::test]
async fn openapi_from_a_path_the_service_serves() {
    // The service's own endpoint: a local HTTP server answering /openapi.json.
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = app.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    // A slow app: a view sent before its answer would be published.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let code = if req.uri().path() == "/openapi.json" { 200 } else { 404 };
                    Ok::<_, Infallible>(Response::builder().status(code).body(Full::new(Bytes::from(DOC))).unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    let api = FakeApi::default();
    api.apply("namespaces", namespace());
    api.apply("services", service("web", "10.96.0.30", json!({"neutrino.io/openapi": "/openapi.json"})));
    api.apply("pods", pod("web-1", "web", "1", "1Gi", json!({})));
    api.apply("endpointslices", slice("web", json!([endpoint("127.0.0.1", "web-1", true, true, false)]), app_port));
    // A second service whose path answers 404: reported, not fatal.
    api.apply("services", service("broken", "10.96.0.31", json!({"neutrino.io/openapi": "/missing.json"})));
    api.apply("endpointslices", slice("broken", json!([endpoint("127.0.0.1", "web-1", true, true, false)]), app_port));
    let cp = Cp::start(api.clone().serve().await);
    let seen = Seen::follow(cp.grpc).await;
    wait_for("routes fetched from the service", WAIT, || async {
        let s = seen.service("web").ok_or_else(|| anyhow!("no service"))?;
        ensure!(s.routes.iter().any(|r| r.operation_id == "listOrders"), "routes {:?}", s.routes);
        Ok(())
    })
    .await;
    let first = seen.first_service("web").unwrap();
    assert!(!first.routes.is_empty(), "held until the first fetch answered");
    assert!(seen.service("broken").unwrap().routes.is_empty());
    wait_for("the failed fetch counted", WAIT, || async {
        let (_, text) = get(cp.admin, "/metrics").await?;
        let n = metric(&text, "neutrino_cp_openapi_errors_total", "").unwrap_or(0.0);
        ensure!(n >= 1.0, "openapi errors {n}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn before_the_first_list_ready_says_why() {
    // Nothing listens on this port.
    let closed = free_port();
    let cp = Cp::start(closed);
    wait_for("/ready to explain", WAIT, || async {
        let (code, body) = get(cp.admin, "/ready").await?;
        ensure!(code == 503 && body.contains("watching") && body.contains("RBAC"), "{code}: {body}");
        Ok(())
    })
    .await;
}

#[test]
fn exactly_one_source_must_be_chosen() {
    for args in [&[][..], &["--kubernetes", "--mesh-file", "mesh.yaml"][..]] {
        let out = std::process::Command::new(bin("neutrino-control-plane"))
            .args(args)
            .env_remove("NEUTRINO_MESH_FILE")
            .env_remove("NEUTRINO_KUBERNETES")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--mesh-file") && err.contains("--kubernetes"), "{args:?}: {err}");
    }
}

fn authorization_policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "policy.neutrino.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": spec
    })
}

#[tokio::test]
async fn injected_pods_get_identities_and_authorization_policies_become_policy_resources() {
    let (api, _cp, seen) = started().await;
    let identities = || seen.endpoints("orders").map(|e| e.endpoints.iter().map(|ep| ep.identity.clone()).collect());
    // The fixture's pods carry the injected proxy container and run as "default".
    let default_sa = "spiffe://cluster.local/ns/shop/sa/default".to_string();
    assert_eq!(identities(), Some(vec![default_sa.clone(), default_sa.clone()]));
    // Every service has its Policy: no objects yet, so no rules, allow, permissive.
    wait_for("the first Policy", WAIT, || async {
        let p = seen.policy("orders").ok_or_else(|| anyhow!("no Policy"))?;
        ensure!((p.service.as_str(), p.tls_mode, p.default_action, p.allow.len()) == ("shop/orders", 0, 0, 0), "{p:?}");
        Ok(())
    })
    .await;

    // A pod that runs as its own service account, as a native sidecar, and one without a proxy.
    let mut native = pod("orders-1", "orders", "2", "4Gi", json!({}));
    native["spec"]["serviceAccountName"] = json!("orders");
    let proxy = native["spec"]["containers"].as_array_mut().unwrap().remove(1);
    native["spec"]["initContainers"] = json!([{"name": "neutrino-init", "image": "neutrino-proxy:dev"},
                                               {"restartPolicy": "Always", "name": proxy["name"], "image": proxy["image"]}]);
    api.apply("pods", native);
    let mut plain = pod("orders-2", "orders", "2", "4Gi", json!({"neutrino.io/capacity": "cpu=500m"}));
    plain["spec"]["containers"].as_array_mut().unwrap().truncate(1);
    api.apply("pods", plain);
    wait_for("identities from the pods", WAIT, || async {
        let got = identities();
        ensure!(got == Some(vec!["spiffe://cluster.local/ns/shop/sa/orders".to_string(), String::new()]), "{got:?}");
        Ok(())
    })
    .await;

    // An AuthorizationPolicy, and the namespace made strict.
    api.apply(
        "authorizationpolicies",
        authorization_policy(
            "orders-callers",
            json!({"service": "orders", "allow": [
                {"from": ["spiffe://cluster.local/ns/shop/sa/web"], "operations": ["listOrders"], "methods": ["get"]}
            ]}),
        ),
    );
    let mut ns = namespace();
    ns["metadata"]["labels"]["neutrino.io/tls"] = json!("strict");
    api.apply("namespaces", ns);
    wait_for("the policy pushed", WAIT, || async {
        let p = seen.policy("orders").ok_or_else(|| anyhow!("no Policy"))?;
        ensure!(p.tls_mode == neutrino_proto::TlsMode::Strict as i32, "{p:?}");
        ensure!(
            p.allow
                == [neutrino_proto::AllowRule {
                    identities: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
                    operations: vec!["listOrders".into()],
                    methods: vec!["GET".into()],
                    paths: vec![],
                }],
            "{p:?}"
        );
        Ok(())
    })
    .await;

    // Deleted: the rules go again.
    api.delete("authorizationpolicies", NS, "orders-callers");
    wait_for("the policy's rules removed", WAIT, || async {
        let p = seen.policy("orders").ok_or_else(|| anyhow!("no Policy"))?;
        ensure!(p.allow.is_empty() && p.tls_mode == neutrino_proto::TlsMode::Strict as i32, "{p:?}");
        Ok(())
    })
    .await;
}
