//! `--trust-anchors-file` end to end, on the real binary: the injected proxy gets the
//! anchors as `NEUTRINO_CA_PEM` and dials the control plane's TLS port; when the file
//! changes, pods injected afterwards get the new anchors without a restart; a bad new file
//! is logged as an error and the last good anchors stay; a bad file at start is refused
//! with the flag's name.

mod common;
#[path = "common/server.rs"]
mod server;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use server::{Injector, listening, tls};

const ANCHOR_1: &str = include_str!("testdata/anchor-1.pem");
const ANCHOR_2: &str = include_str!("testdata/anchor-2.pem");

fn command(anchors: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_neutrino-injector"));
    c.args(["--addr", "127.0.0.1:0", "--log", "info", "--events=false", "--trust-anchors-reload-secs", "1"])
        .arg("--trust-anchors-file")
        .arg(anchors)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn start(dir: tempfile::TempDir, anchors: &Path) -> Injector {
    let ca = dir.path().join("ca.pem");
    let mut child = command(anchors)
        .args(["--self-signed-dns", "localhost", "--ca-bundle-out"])
        .arg(&ca)
        .spawn()
        .expect("spawn neutrino-injector");
    let addr = listening(&mut child);
    let ca_pem = std::fs::read_to_string(&ca).expect("the CA bundle is written before listening");
    Injector { child, addr, ca_pem, _dir: dir }
}

/// The proxy container's environment for a pod injected now, by name.
async fn proxy_env(inj: &Injector) -> serde_json::Map<String, Value> {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "a"}]}});
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE", "namespace": "default", "object": pod}});
    let stream = tls(inj.addr, &inj.ca_pem, false).await.expect("TLS");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::post("/mutate")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("json"))))
        .expect("request");
    let reply = sender.send_request(req).await.expect("reply").into_body().collect().await.expect("body").to_bytes();
    let answer: Value = serde_json::from_slice(&reply).expect("json");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().expect("a patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("JSON Patch");
    let mut pod = pod;
    json_patch::patch(&mut pod, &patch).expect("applies");
    let proxy = pod["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .find(|c| c["name"] == neutrino_injector::PROXY_CONTAINER)
        .expect("the proxy")
        .clone();
    proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].clone())))
        .collect()
}

/// Replaces the file at once, as a ConfigMap volume does (a reader never sees half of it).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Waits until pods are injected with `pem` (the file is checked every second).
async fn wait_for(inj: &Injector, pem: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while proxy_env(inj).await["NEUTRINO_CA_PEM"] != pem {
        assert!(Instant::now() < deadline, "the new anchors were not picked up within 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_anchors_reach_the_proxy_and_follow_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, ANCHOR_1).expect("write");
    let mut inj = start(dir, &anchors);

    let env = proxy_env(&inj).await;
    assert_eq!(env["NEUTRINO_CA_PEM"], ANCHOR_1);
    assert_eq!(env["NEUTRINO_TRUST_DOMAIN"], "cluster.local");
    assert_eq!(env["NEUTRINO_CONTROL_PLANE"], "neutrino-control-plane.neutrino-system.svc:15012");

    // A rotation: the bundle with both anchors, then the new one alone.
    let both = format!("{ANCHOR_1}{ANCHOR_2}");
    replace(&anchors, &both);
    wait_for(&inj, &both).await;
    // A bad file: logged, and the last good anchors stay.
    replace(&anchors, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(proxy_env(&inj).await["NEUTRINO_CA_PEM"], both.as_str());
    replace(&anchors, ANCHOR_2);
    wait_for(&inj, ANCHOR_2).await;

    inj.child.kill().expect("kill");
    let mut stderr = String::new();
    inj.child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "the bad file is logged once:\n{stderr}");
    assert!(
        errors[0].contains("--trust-anchors-file") && errors[0].contains("keeping the last good trust anchors"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("reloaded the trust anchors").count(), 2, "{stderr}");
}

#[test]
fn a_bad_anchors_file_stops_the_start_with_the_flag_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, include_str!("testdata/leaf.pem")).expect("write");
    let out = command(&anchors).args(["--self-signed-dns", "localhost"]).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("--trust-anchors-file {}: certificate 1", anchors.display())), "{stderr}");
    assert!(stderr.contains("is not a CA certificate"), "{stderr}");
}
