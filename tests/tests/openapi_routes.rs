//! OpenAPI documents to routes, end to end: the control plane reads each service's
//! document, turns it into routes with their costs, pushes them, and keeps a service's
//! last good routes when its document breaks.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::ensure;
use neutrino_tests::*;

const SPEC: &str = r#"
openapi: 3.0.3
info: {title: orders, version: "1"}
paths:
  /orders/{id}:
    get:
      operationId: getOrder
      responses: {"200": {description: ok}}
    post:
      operationId: renderOrder
      x-neutrino-resources: {cpu: "2", memory: 4Gi, gpu: 1}
      x-neutrino-timeout: 5s
      responses: {"200": {description: ok}}
"#;

fn mesh(spec_path: &str) -> String {
    format!(
        "services:\n  - name: orders\n    ports: [{{port: 80}}]\n    openapi: {spec_path}\n    endpoints:\n      - {{address: 10.1.0.1, capacity: {{cpu: 4, memory: 8Gi, gpu: 1}}}}\n"
    )
}

fn routes(dump: &serde_json::Value) -> Vec<(String, String, u64)> {
    dump["resources"]["Service"]["default/orders"]["body"]["Service"]["routes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r["operation_id"].as_str().unwrap_or_default().to_string(),
                r["method"].as_str().unwrap_or_default().to_string(),
                r["cost"]["cpu_millis"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test]
async fn routes_reach_the_proxy_and_a_broken_document_keeps_the_last_good_ones() {
    // The document lives in another directory than the mesh file, named relatively.
    let specs = tempfile::tempdir().unwrap();
    let spec = specs.path().join("orders.yaml");
    std::fs::write(&spec, SPEC).unwrap();
    let mesh_file = MeshFile::new(&mesh(&spec.display().to_string()));
    let cp = ControlPlane::start(&mesh_file.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;

    let dump = proxy.dump().await;
    assert_eq!(
        routes(&dump),
        [("getOrder".to_string(), "GET".to_string(), 0), ("renderOrder".to_string(), "POST".to_string(), 2000)]
    );
    let svc = &dump["resources"]["Service"]["default/orders"]["body"]["Service"];
    assert_eq!(svc["routes"][1]["timeout_ms"], 5000);
    assert_eq!(svc["routes"][1]["cost"]["gpu"], 1);
    assert_eq!(svc["default_cost"]["cpu_millis"], 100);

    // Break the document: reported, counted, routes kept.
    std::fs::write(&spec, "openapi: 3.0.3\npaths: [\n").unwrap();
    let err = wait_for("the broken document to be reported", Duration::from_secs(5), || async {
        let d = get_json(cp.admin, "/config_dump").await?;
        let e = d["source"]["openapi_errors"]["default/orders"].as_str().unwrap_or_default().to_string();
        ensure!(!e.is_empty(), "no error yet");
        Ok(e)
    })
    .await;
    assert!(err.contains("orders.yaml: not valid YAML"), "{err}");
    assert!(cp.metric("neutrino_cp_openapi_errors_total", "").await >= 1.0);
    assert_eq!(routes(&proxy.dump().await), routes(&dump), "last good routes kept");

    // Fix it with a new operation: the edit of the document alone reaches the proxy.
    std::fs::write(&spec, SPEC.replace("getOrder", "fetchOrder")).unwrap();
    wait_for("the fixed document's routes", Duration::from_secs(5), || async {
        let r = routes(&proxy.dump().await);
        ensure!(r.first().map(|x| x.0.as_str()) == Some("fetchOrder"), "{r:?}");
        Ok(())
    })
    .await;
    let d = get_json(cp.admin, "/config_dump").await.unwrap();
    assert!(d["source"]["openapi_errors"].as_object().unwrap().is_empty());
}
