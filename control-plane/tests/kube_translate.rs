//! The Kubernetes translation (`watch::kube_translate`) on real object JSON: Services
//! and Pods from GoogleCloudPlatform/microservices-demo's manifests
//! (`../shared/testdata/k8s/`), as the API server would return them (namespace and
//! cluster IP filled in), and EndpointSlices written to the discovery.k8s.io/v1 schema.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use neutrino_control_plane::model::{Capacity, ServiceModel};
use neutrino_control_plane::watch::kube_translate::{
    ConfigMapRead, DEFAULT_CPU_MILLIS, DEFAULT_MEMORY_BYTES, Objects, Problem, Translation, parse_capacity_annotation,
    protocol_of, translate,
};
use neutrino_proto::Protocol;
use serde_json::{Value, json};

const NS: &str = "shop";
const MI: u64 = 1 << 20;

fn manifests() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata/k8s/microservices-demo-kubernetes-manifests.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| v.is_object())
        .collect()
}

/// The demo's Services as the API server returns them: namespaced, with a cluster IP.
fn demo_services() -> Vec<Service> {
    let mut out = Vec::new();
    for (i, mut doc) in manifests().into_iter().filter(|d| d["kind"] == "Service").enumerate() {
        let ip = format!("10.96.0.{}", i + 10);
        doc["metadata"]["namespace"] = json!(NS);
        doc["metadata"]["resourceVersion"] = json!("100");
        doc["spec"]["clusterIP"] = json!(ip);
        doc["spec"]["clusterIPs"] = json!([ip]);
        out.push(serde_json::from_value(doc).unwrap());
    }
    out
}

/// One Pod per Deployment, from its template, named like a ReplicaSet's pod.
fn demo_pods() -> Vec<Pod> {
    manifests()
        .into_iter()
        .filter(|d| d["kind"] == "Deployment")
        .map(|d| {
            let dep: Deployment = serde_json::from_value(d).unwrap();
            let name = dep.metadata.name.unwrap();
            let template = dep.spec.unwrap().template;
            let mut meta = template.metadata.unwrap_or_default();
            meta.name = Some(format!("{name}-7d9f8b6c5-x2k4q"));
            meta.namespace = Some(NS.into());
            Pod { metadata: meta, spec: template.spec, status: None }
        })
        .collect()
}

fn pod_of(deployment: &str) -> String {
    format!("{deployment}-7d9f8b6c5-x2k4q")
}

/// An EndpointSlice as the slice controller writes it.
fn slice(service: &str, name: &str, ports: Value, endpoints: Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": "200",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            },
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": "0b8e4a8c-1", "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints
    }))
    .unwrap()
}

fn endpoint(ip: &str, pod: &str, conditions: Value) -> Value {
    json!({
        "addresses": [ip],
        "conditions": conditions,
        "nodeName": "node-a",
        "zone": "europe-west1-b",
        "targetRef": {"kind": "Pod", "namespace": NS, "name": pod, "uid": "5f0c7b1e-2"}
    })
}

fn ready() -> Value {
    json!({"ready": true, "serving": true, "terminating": false})
}

/// A slice per demo Service that selects a Deployment, one ready endpoint each.
fn demo_slices(services: &[Service]) -> Vec<EndpointSlice> {
    services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = s.metadata.name.clone().unwrap();
            let app = s.spec.as_ref().unwrap().selector.as_ref().unwrap()["app"].clone();
            let p = &s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
            let target = match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => *n,
                _ => p.port,
            };
            slice(
                &name,
                &format!("{name}-abcde"),
                json!([{"name": p.name, "port": target, "protocol": "TCP"}]),
                json!([endpoint(&format!("10.244.1.{}", i + 10), &pod_of(&app), ready())]),
            )
        })
        .collect()
}

struct World {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    pods: Vec<Arc<Pod>>,
    namespaces: Vec<Arc<Namespace>>,
    configmaps: BTreeMap<String, ConfigMapRead>,
    fetched: BTreeMap<String, Result<Arc<[u8]>, String>>,
}

impl World {
    fn demo() -> World {
        let services = demo_services();
        let slices = demo_slices(&services);
        World {
            slices: slices.into_iter().map(Arc::new).collect(),
            services: services.into_iter().map(Arc::new).collect(),
            pods: demo_pods().into_iter().map(Arc::new).collect(),
            namespaces: vec![Arc::new(namespace(NS, json!({})))],
            configmaps: BTreeMap::new(),
            fetched: BTreeMap::new(),
        }
    }

    fn empty() -> World {
        World {
            services: vec![],
            slices: vec![],
            pods: vec![],
            namespaces: vec![],
            configmaps: BTreeMap::new(),
            fetched: BTreeMap::new(),
        }
    }

    fn run(&self) -> Translation {
        translate(Objects {
            services: &self.services,
            slices: &self.slices,
            pods: &self.pods,
            namespaces: &self.namespaces,
            configmaps: Some(&self.configmaps),
            fetched: Some(&self.fetched),
            policies: &[],
        })
    }
}

fn namespace(name: &str, labels: Value) -> Namespace {
    serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}),
    )
    .unwrap()
}

fn service(name: &str, extra_meta: Value, spec: Value) -> Service {
    let mut meta = json!({"name": name, "namespace": NS, "resourceVersion": "5"});
    if let (Some(m), Some(e)) = (meta.as_object_mut(), extra_meta.as_object()) {
        m.extend(e.clone());
    }
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec})).unwrap()
}

fn pod(name: &str, annotations: Value, spec: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "api"}, "annotations": annotations},
        "spec": spec
    }))
    .unwrap()
}

fn svc<'a>(t: &'a Translation, name: &str) -> &'a ServiceModel {
    t.mesh
        .services
        .get(&format!("{NS}/{name}"))
        .unwrap_or_else(|| panic!("{name} missing: {:?}", t.mesh.services.keys()))
}

#[test]
fn demo_manifests_become_services_with_endpoints_and_capacity() {
    let t = World::demo().run();
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    // 12 Services in the manifests, the LoadBalancer one included.
    assert_eq!(t.mesh.services.len(), 12, "{:?}", t.mesh.services.keys());

    let frontend = svc(&t, "frontend");
    assert_eq!(frontend.ports.len(), 1);
    assert_eq!((frontend.ports[0].port, frontend.ports[0].target_port), (80, 8080));
    assert_eq!(frontend.ports[0].protocol, Protocol::Http1, "port named http");
    assert_eq!(frontend.hostnames, vec!["frontend.shop", "frontend.shop.svc", "frontend.shop.svc.cluster.local"]);
    assert_eq!(frontend.virtual_ips.len(), 1);
    assert_eq!(frontend.endpoints.len(), 1);
    let ep = &frontend.endpoints[0];
    assert!(ep.ready);
    assert_eq!(ep.port, 0, "the service's target port");
    assert_eq!(ep.zone, "europe-west1-b");
    assert_eq!(ep.pod, pod_of("frontend"));
    assert_eq!(ep.labels.get("app").map(String::as_str), Some("frontend"));
    // requests: cpu 100m, memory 64Mi (limits are larger and not used).
    assert_eq!(ep.capacity, Capacity { cpu_millis: 100, memory_bytes: 64 * MI, gpu: 0 });

    // The LoadBalancer Service selects the same pods through its own slice.
    assert_eq!(svc(&t, "frontend-external").endpoints[0].pod, pod_of("frontend"));
    assert_ne!(svc(&t, "frontend-external").virtual_ips, frontend.virtual_ips);

    assert_eq!(svc(&t, "cartservice").ports[0].protocol, Protocol::Grpc);
    assert_eq!(svc(&t, "redis-cart").ports[0].protocol, Protocol::Tcp, "port named tcp-redis");
    assert_eq!(
        svc(&t, "redis-cart").endpoints[0].capacity,
        Capacity { cpu_millis: 70, memory_bytes: 200 * MI, gpu: 0 }
    );
    let email = svc(&t, "emailservice");
    assert_eq!((email.ports[0].port, email.ports[0].target_port), (5000, 8080));
    assert_eq!(
        svc(&t, "adservice").endpoints[0].capacity,
        Capacity { cpu_millis: 200, memory_bytes: 180 * MI, gpu: 0 }
    );
    assert!(t.mesh.specs.is_empty() && t.fetches.is_empty() && t.configmaps.is_empty());
}

#[test]
fn output_does_not_depend_on_input_order() {
    let w = World::demo();
    let first = w.run();
    let mut r = World::demo();
    r.services.reverse();
    r.slices.reverse();
    r.pods.reverse();
    assert_eq!(first, r.run());
}

fn api_world(endpoints: Value) -> World {
    let mut w = World::empty();
    w.services.push(Arc::new(service(
        "api",
        json!({}),
        json!({"type": "ClusterIP", "clusterIP": "10.96.1.1", "clusterIPs": ["10.96.1.1"],
               "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}]}),
    )));
    w.slices.push(Arc::new(slice(
        "api",
        "api-xyz12",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        endpoints,
    )));
    w
}

#[test]
fn readiness_follows_ready_serving_and_terminating() {
    let w = api_world(json!([
        // No conditions at all: the API says to read them as ready and serving.
        {"addresses": ["10.244.0.1"], "targetRef": {"kind": "Pod", "namespace": NS, "name": "api-1"}},
        {"addresses": ["10.244.0.2"], "conditions": {"ready": false, "serving": false, "terminating": false}},
        {"addresses": ["10.244.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        {"addresses": ["10.244.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
        {"addresses": ["10.244.0.5"], "conditions": {"ready": true}},
        {"addresses": ["10.244.0.6"], "conditions": {"ready": false}}
    ]));
    let t = w.run();
    let api = svc(&t, "api");
    let got: Vec<(String, bool)> = api.endpoints.iter().map(|e| (e.address.to_string(), e.ready)).collect();
    assert_eq!(
        got,
        vec![
            ("10.244.0.1".into(), true),
            ("10.244.0.2".into(), false), // starting or failing its probe: kept, not ready
            ("10.244.0.3".into(), false), // terminating but serving: kept for what is in flight
            // 10.244.0.4: terminating and no longer serving: dropped
            ("10.244.0.5".into(), true),
            ("10.244.0.6".into(), false),
        ]
    );
    // Named target port resolved by the slice controller.
    assert_eq!(api.ports[0].target_port, 8080);
    // Pods not (yet) in the store get the default capacity, never none.
    assert!(api.endpoints.iter().all(|e| e.capacity.cpu_millis == DEFAULT_CPU_MILLIS));
    assert_eq!(api.endpoints[0].pod, "api-1");
}

#[test]
fn an_address_in_two_slices_is_kept_once_and_ready_if_either_says_so() {
    let mut w = api_world(json!([{"addresses": ["10.244.0.1"], "conditions": {"ready": false}}]));
    w.slices.push(Arc::new(slice(
        "api",
        "api-zzz99",
        json!([{"name": "http", "port": 8080}]),
        json!([{"addresses": ["10.244.0.1"], "conditions": {"ready": true}}]),
    )));
    let t = w.run();
    assert_eq!(svc(&t, "api").endpoints.len(), 1);
    assert!(svc(&t, "api").endpoints[0].ready);
}

#[test]
fn a_single_port_service_mid_rollout_carries_each_slices_port() {
    let mut w = api_world(json!([{"addresses": ["10.244.0.1"]}]));
    w.slices.push(Arc::new(slice(
        "api",
        "api-zzz99",
        json!([{"name": "http", "port": 9090}]),
        json!([{"addresses": ["10.244.0.2"]}]),
    )));
    let t = w.run();
    let api = svc(&t, "api");
    assert_eq!(api.ports[0].target_port, 8080, "the first slice by name");
    let ports: Vec<u16> = api.endpoints.iter().map(|e| e.port).collect();
    assert_eq!(ports, vec![0, 9090]);
}

#[test]
fn capacity_rules() {
    let mut w = api_world(json!([
        endpoint("10.244.0.1", "limits-only", ready()),
        endpoint("10.244.0.2", "with-sidecar", ready()),
        endpoint("10.244.0.3", "gpu", ready()),
        endpoint("10.244.0.4", "annotated", ready()),
        endpoint("10.244.0.5", "bad-annotation", ready()),
        endpoint("10.244.0.6", "best-effort", ready()),
        endpoint("10.244.0.7", "pod-level", ready()),
        endpoint("10.244.0.8", "zero", ready()),
    ]));
    let res = |requests: Value, limits: Value| json!({"requests": requests, "limits": limits});
    w.pods = vec![
        pod("limits-only", json!({}), json!({"containers": [{"name": "app", "resources": {"limits": {"cpu": "2", "memory": "1Gi"}}}]})),
        pod(
            "with-sidecar",
            json!({}),
            json!({"containers": [
                {"name": "app", "resources": res(json!({"cpu": "500m", "memory": "256Mi"}), json!({}))},
                {"name": "worker", "resources": res(json!({"cpu": "250m"}), json!({"cpu": "1", "memory": "128Mi"}))},
                {"name": "neutrino-proxy", "resources": res(json!({"cpu": "100m", "memory": "64Mi"}), json!({}))}
            ],
            "initContainers": [{"name": "neutrino-init", "resources": res(json!({"cpu": "4"}), json!({}))}]}),
        ),
        pod(
            "gpu",
            json!({}),
            json!({"containers": [{"name": "model", "resources": res(
                json!({"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}),
                json!({"nvidia.com/gpu": "2"}))}]}),
        ),
        pod(
            "annotated",
            json!({"neutrino.io/capacity": "cpu=2, nvidia.com/gpu=1"}),
            json!({"containers": [{"name": "app", "resources": res(json!({"cpu": "100m", "memory": "64Mi"}), json!({}))}]}),
        ),
        pod(
            "bad-annotation",
            json!({"neutrino.io/capacity": "cpu=lots"}),
            json!({"containers": [{"name": "app", "resources": res(json!({"cpu": "300m", "memory": "64Mi"}), json!({}))}]}),
        ),
        pod("best-effort", json!({}), json!({"containers": [{"name": "app", "image": "nginx"}]})),
        pod(
            "pod-level",
            json!({}),
            json!({"resources": {"requests": {"cpu": "3"}},
                   "containers": [{"name": "app", "resources": res(json!({"cpu": "1", "memory": "2Gi"}), json!({}))}]}),
        ),
        pod(
            "zero",
            json!({}),
            json!({"containers": [{"name": "app", "resources": res(json!({"cpu": "0", "memory": "0"}), json!({}))}]}),
        ),
    ]
    .into_iter()
    .map(Arc::new)
    .collect();
    let t = w.run();
    let caps: BTreeMap<String, Capacity> =
        svc(&t, "api").endpoints.iter().map(|e| (e.pod.clone(), e.capacity)).collect();
    let cap = |cpu_millis, memory_bytes, gpu| Capacity { cpu_millis, memory_bytes, gpu };
    assert_eq!(caps["limits-only"], cap(2000, 1024 * MI, 0), "limits when there are no requests");
    // 500m + 250m (request, not the 1-core limit); memory 256Mi + 128Mi (limit); the
    // sidecar and the init container not counted.
    assert_eq!(caps["with-sidecar"], cap(750, 384 * MI, 0));
    assert_eq!(caps["gpu"], cap(8000, 32 * 1024 * MI, 2));
    assert_eq!(caps["annotated"], cap(2000, 64 * MI, 1), "the annotation overrides what it names");
    assert_eq!(caps["bad-annotation"], cap(300, 64 * MI, 0), "a bad annotation is ignored");
    assert_eq!(caps["best-effort"], cap(DEFAULT_CPU_MILLIS, DEFAULT_MEMORY_BYTES, 0));
    assert_eq!(caps["pod-level"], cap(3000, 2048 * MI, 0), "pod-level resources win where set");
    assert_eq!(caps["zero"], cap(DEFAULT_CPU_MILLIS, DEFAULT_MEMORY_BYTES, 0), "never an endpoint without capacity");
    assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
    assert!(matches!(&t.problems[0], Problem::CapacityAnnotation { pod, .. } if pod == "shop/bad-annotation"));
    assert!(t.problems[0].to_string().contains("cpu=2,memory=4Gi"), "{}", t.problems[0]);
}

#[test]
fn capacity_annotation_syntax() {
    assert_eq!(
        parse_capacity_annotation("cpu=2,memory=4Gi,nvidia.com/gpu=1"),
        Ok([Some(2000), Some(4 << 30), Some(1)])
    );
    assert_eq!(parse_capacity_annotation(" memory = 512Mi "), Ok([None, Some(512 * MI), None]));
    assert_eq!(parse_capacity_annotation("amd.com/gpu=4"), Ok([None, None, Some(4)]));
    for bad in ["", "cpu", "cpu=-1", "disk=1Gi", "nvidia.com/gpu=0.5", "cpu=0,memory=0"] {
        assert!(parse_capacity_annotation(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn protocols_from_app_protocol_then_port_name() {
    assert_eq!(protocol_of(Some("kubernetes.io/h2c"), Some("grpc")), Protocol::Http2);
    assert_eq!(protocol_of(Some("h2c"), None), Protocol::Http2);
    assert_eq!(protocol_of(Some("grpc"), None), Protocol::Grpc);
    assert_eq!(protocol_of(Some("HTTP"), None), Protocol::Http1);
    assert_eq!(protocol_of(Some("kubernetes.io/ws"), Some("http")), Protocol::Http1, "unknown appProtocol: the name");
    assert_eq!(protocol_of(None, Some("grpc-web")), Protocol::Grpc);
    assert_eq!(protocol_of(None, Some("tcp-redis")), Protocol::Tcp);
    assert_eq!(protocol_of(None, Some("metrics")), Protocol::Unspecified);
    assert_eq!(protocol_of(None, None), Protocol::Unspecified);
}

#[test]
fn skipped_services_and_namespaces() {
    let mut w = World::demo();
    w.services.push(Arc::new(service(
        "external-db",
        json!({}),
        json!({"type": "ExternalName", "externalName": "db.example.com", "ports": [{"port": 5432}]}),
    )));
    w.services.push(Arc::new(service(
        "dns-udp",
        json!({}),
        json!({"clusterIP": "10.96.2.2", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}),
    )));
    w.services.push(Arc::new(service("headless", json!({}), json!({"clusterIP": "None", "ports": [{"port": 7000}]}))));
    let t = w.run();
    assert!(!t.mesh.services.contains_key("shop/external-db"));
    assert!(!t.mesh.services.contains_key("shop/dns-udp"));
    let headless = svc(&t, "headless");
    assert!(headless.virtual_ips.is_empty(), "headless: reached by hostname only");
    assert_eq!(headless.ports[0].target_port, 7000);

    w.namespaces = vec![Arc::new(namespace(NS, json!({"neutrino.io/discovery": "disabled"})))];
    assert!(w.run().mesh.services.is_empty(), "opted-out namespace");
}

fn openapi_world(annotation: &str) -> World {
    let mut w = api_world(json!([
        endpoint("10.244.0.1", "api-1", ready()),
        endpoint("10.244.0.2", "api-2", json!({"ready": false})),
        endpoint("10.244.0.3", "api-3", ready()),
    ]));
    let spec = w.services[0].spec.clone();
    let mut s = service("api", json!({"annotations": {"neutrino.io/openapi": annotation}}), json!({}));
    s.spec = spec;
    w.services = vec![Arc::new(s)];
    w
}

fn configmap(data: Value) -> Arc<ConfigMap> {
    Arc::new(
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "api-openapi", "namespace": NS}, "data": data}))
        .unwrap(),
    )
}

#[test]
fn openapi_from_a_configmap() {
    let mut w = openapi_world("configmap:api-openapi/openapi.yaml");
    // Not read yet: published without a document, and the ConfigMap is asked for.
    let t = w.run();
    assert_eq!(t.configmaps.iter().cloned().collect::<Vec<_>>(), vec![(NS.to_string(), "api-openapi".to_string())]);
    assert_eq!(svc(&t, "api").openapi, None);
    w.configmaps.insert(format!("{NS}/api-openapi"), ConfigMapRead::Pending);
    assert_eq!(svc(&w.run(), "api").openapi, None);

    let origin = format!("configmap:{NS}/api-openapi/openapi.yaml");
    w.configmaps.insert(
        format!("{NS}/api-openapi"),
        ConfigMapRead::Read(Some(configmap(json!({"openapi.yaml": "openapi: 3.0.0"})))),
    );
    let t = w.run();
    assert_eq!(svc(&t, "api").openapi.as_deref(), Some(origin.as_str()));
    assert_eq!(t.mesh.specs[&origin].as_deref().unwrap(), b"openapi: 3.0.0");

    w.configmaps.insert(format!("{NS}/api-openapi"), ConfigMapRead::Read(Some(configmap(json!({"other": "x"})))));
    let err = w.run().mesh.specs[&origin].clone().unwrap_err();
    assert!(err.contains("no key \"openapi.yaml\""), "{err}");

    w.configmaps.insert(format!("{NS}/api-openapi"), ConfigMapRead::Read(None));
    let err = w.run().mesh.specs[&origin].clone().unwrap_err();
    assert!(err.contains("does not exist"), "{err}");

    // binaryData (base64 in JSON) works too.
    let cm: ConfigMap = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "api-openapi", "namespace": NS}, "binaryData": {"openapi.yaml": "b3BlbmFwaTogMy4wLjA="}}))
    .unwrap();
    w.configmaps.insert(format!("{NS}/api-openapi"), ConfigMapRead::Read(Some(Arc::new(cm))));
    assert_eq!(w.run().mesh.specs[&origin].as_deref().unwrap(), b"openapi: 3.0.0");
}

#[test]
fn openapi_from_a_path_the_service_serves() {
    let mut w = openapi_world("/openapi.json");
    let t = w.run();
    let origin = format!("http:{NS}/api:80/openapi.json");
    assert_eq!(t.fetches.len(), 1);
    assert_eq!(t.fetches[0].origin, origin);
    assert_eq!(t.fetches[0].path, "/openapi.json");
    let want: Vec<SocketAddr> = ["10.244.0.1:8080", "10.244.0.3:8080"].iter().map(|a| a.parse().unwrap()).collect();
    assert_eq!(t.fetches[0].candidates, want, "ready endpoints on the target port");
    assert_eq!(svc(&t, "api").openapi, None, "nothing fetched yet");

    w.fetched.insert(origin.clone(), Err("fetching: connection refused".into()));
    let t = w.run();
    assert_eq!(svc(&t, "api").openapi.as_deref(), Some(origin.as_str()));
    assert!(t.mesh.specs[&origin].is_err(), "a failed fetch is reported through specs, not dropped");
}

#[test]
fn bad_openapi_annotations_are_reported() {
    for bad in ["configmap:no-key", "openapi.json", "configmap:/k"] {
        let t = openapi_world(bad).run();
        assert_eq!(svc(&t, "api").openapi, None);
        assert!(matches!(t.problems.as_slice(), [Problem::OpenapiAnnotation { .. }]), "{bad}: {:?}", t.problems);
    }
    // A path on a gRPC-only service: nowhere to fetch it from.
    let mut w = openapi_world("/openapi.json");
    let spec =
        serde_json::from_value(json!({"clusterIP": "10.96.1.1", "ports": [{"name": "grpc", "port": 9000}]})).unwrap();
    let mut s = Service::clone(&w.services[0]);
    s.spec = Some(spec);
    w.services = vec![Arc::new(s)];
    let t = w.run();
    assert!(matches!(t.problems.as_slice(), [Problem::OpenapiNoPort { .. }]), "{:?}", t.problems);
    assert!(t.fetches.is_empty());
}

#[test]
fn ipv6_slices_add_endpoints_and_fqdn_slices_are_ignored() {
    let mut w = api_world(json!([{"addresses": ["10.244.0.1"]}]));
    let mut v6 = slice("api", "api-v6", json!([{"name": "http", "port": 8080}]), json!([{"addresses": ["fd00::1"]}]));
    v6.address_type = "IPv6".into();
    let mut fqdn =
        slice("api", "api-fqdn", json!([{"name": "http", "port": 8080}]), json!([{"addresses": ["db.example.com"]}]));
    fqdn.address_type = "FQDN".into();
    w.slices.extend([Arc::new(v6), Arc::new(fqdn)]);
    let t = w.run();
    let addrs: Vec<IpAddr> = svc(&t, "api").endpoints.iter().map(|e| e.address).collect();
    assert_eq!(addrs, vec!["10.244.0.1".parse::<IpAddr>().unwrap(), "fd00::1".parse().unwrap()]);
}
