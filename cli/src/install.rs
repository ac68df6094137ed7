//! `neutrino install` (issue 6, item 4): prints the mesh's manifests as one multi-document
//! YAML stream, for `neutrino install | kubectl apply -f -`.
//!
//! The manifests are the files of `deploy/`, embedded verbatim, so `kubectl kustomize
//! deploy/...` and this command render the same objects. The rendering is small and
//! pure ([`render`]), and does only what kustomize cannot do offline or what the flags ask:
//!
//! 1. `deploy/base` in its kustomization's order;
//! 2. TLS for the injector: either a Secret `neutrino-injector-tls` with a serving
//!    certificate generated here ([`tls_with_mesh_ca`]) and its CA written into the
//!    webhook's `caBundle`, or (`--cert-manager`) the files of `deploy/cert-manager`;
//!    likewise the mesh CA (issue 7): a Secret `neutrino-ca` generated here (a trust
//!    anchor for 10 years and an issuer it signs for 1 year, the control plane's own
//!    generator; or read from `--mesh-ca-dir`, see [`mesh_ca`]) with its anchors in the
//!    ConfigMap `neutrino-trust-anchors` the injector mounts, or cert-manager's
//!    Certificates and a JSON patch that mounts the anchors from the Secret instead;
//! 3. `--demo`: the files of `deploy/demo` and its JSON patches (the control plane's
//!    `--redis-url`, the injector's `--otlp-endpoint` to the demo's Jaeger);
//!    `--redis-url` alone adds that argument without the demo;
//! 4. images: `--image-registry` and `--tag` rewrite every `neutrino/*` image and the
//!    injector's `--proxy-image`.
//!
//! The namespace is fixed (`neutrino-system`: the injector, the proxies and the webhook
//! all name it). This module must not talk to a cluster; only [`tls_with_mesh_ca`] and
//! [`mesh_ca`] read the clock's value (an argument) and generate keys, and only
//! [`mesh_ca`] touches files.

use std::path::PathBuf;

use base64::Engine as _;
use neutrino_control_plane::identity;
use neutrino_injector::manifest::{self, ManifestError};
use serde_json::{Value as Json, json};
use serde_yaml_ng::Value as Yaml;
use thiserror::Error;

mod tls;
#[cfg(test)]
pub use tls::generate_tls;
pub use tls::{mesh_ca, tls_with_mesh_ca};

/// The tag of the `neutrino/*` images in `deploy/` (a test keeps them equal).
pub const DEFAULT_TAG: &str = env!("CARGO_PKG_VERSION");
/// The registry (repository prefix) of the images in `deploy/`.
pub const DEFAULT_REGISTRY: &str = "neutrino";
pub const NAMESPACE: &str = "neutrino-system";
pub const WEBHOOK_CONFIG: &str = "neutrino-sidecar-injector";
pub const INJECTOR_SERVICE: &str = "neutrino-injector";
pub const INJECTOR_TLS_SECRET: &str = "neutrino-injector-tls";
pub const CONTROL_PLANE: &str = "neutrino-control-plane";
/// The mesh CA the control plane mounts: ca.crt (anchors), tls.crt (issuer), tls.key.
pub const MESH_CA_SECRET: &str = "neutrino-ca";
/// The mesh's trust anchors the injector mounts (key [`TRUST_ANCHORS_KEY`]).
pub const TRUST_ANCHORS_CONFIGMAP: &str = "neutrino-trust-anchors";
pub const TRUST_ANCHORS_KEY: &str = "anchors.pem";
/// The trust domain of the generated mesh CA (the control plane's default).
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The files of `--mesh-ca-dir` (the control plane's `--ca-dir` names).
pub const MESH_CA_FILES: [&str; 3] = [identity::ANCHORS_FILE, identity::ISSUER_FILE, identity::ISSUER_KEY_FILE];
/// What the generated serving certificate is valid for (the webhook's Service).
pub const INJECTOR_DNS_NAMES: [&str; 2] =
    ["neutrino-injector.neutrino-system.svc", "neutrino-injector.neutrino-system.svc.cluster.local"];
/// Lifetime of the generated CA and serving certificate; `neutrino check` warns 30 days
/// before the end, and running `neutrino install | kubectl apply -f -` again renews both.
pub const TLS_VALIDITY_DAYS: i64 = 3650;

/// A file of `deploy/`: its path (for messages) and content.
type File = (&'static str, &'static str);

macro_rules! deploy {
    ($path:literal) => {
        ($path, include_str!(concat!("../../deploy/", $path)))
    };
}

/// `deploy/base/kustomization.yaml`'s resources, in its order.
const BASE: [File; 6] = [
    deploy!("base/namespace.yaml"),
    deploy!("base/authorization-policy-crd.yaml"),
    deploy!("base/rbac.yaml"),
    deploy!("base/control-plane.yaml"),
    deploy!("base/injector.yaml"),
    deploy!("base/webhook.yaml"),
];
const CERT_MANAGER: [File; 1] = [deploy!("cert-manager/certificates.yaml")];
/// A merge patch on the webhook configuration (`deploy/cert-manager/kustomization.yaml`).
const CERT_MANAGER_PATCH: File = deploy!("cert-manager/webhook-ca.yaml");
/// A JSON patch on the injector's Deployment (`deploy/cert-manager/kustomization.yaml`):
/// its trust anchors from the Secret neutrino-ca's ca.crt instead of the ConfigMap.
const CERT_MANAGER_INJECTOR_PATCH: File = deploy!("cert-manager/injector-anchors.yaml");
const DEMO: [File; 3] = [deploy!("demo/redis.yaml"), deploy!("demo/jaeger.yaml"), deploy!("demo/sample-app.yaml")];
/// A JSON patch on the control plane's Deployment (`deploy/demo/kustomization.yaml`).
const DEMO_PATCH: File = deploy!("demo/control-plane-redis.yaml");
/// A JSON patch on the injector's Deployment (`deploy/demo/kustomization.yaml`): traces to Jaeger.
const DEMO_INJECTOR_PATCH: File = deploy!("demo/injector-otlp.yaml");

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("reading the embedded {file}: {source}")]
    Embedded { file: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("applying {file}: {reason}")]
    Patch { file: &'static str, reason: String },
    #[error("no TLS material for the injector: pass --cert-manager, or let `neutrino install` generate it")]
    NoTls,
    #[error("--{flag} {value:?} {reason}")]
    Flag { flag: &'static str, value: String, reason: &'static str },
    #[error("generating the injector's certificate: {0}")]
    Generate(String),
    #[error(
        "--mesh-ca-dir {dir}: holds {present} but not {missing}; refusing to guess: restore the missing \
         files (the mesh CA the cluster runs on), or empty the directory to generate a NEW mesh CA (applying \
         that replaces the CA of a running mesh)"
    )]
    PartialMeshCaDir { dir: PathBuf, present: String, missing: String },
    #[error("--mesh-ca-dir {dir}: {reason}")]
    MeshCaDir { dir: PathBuf, reason: String },
    #[error("writing the manifests: {0}")]
    Write(#[from] ManifestError),
}

/// What to render.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub demo: bool,
    pub cert_manager: bool,
    pub image_registry: Option<String>,
    pub tag: Option<String>,
    pub redis_url: Option<String>,
}

/// The TLS material generated when cert-manager is not used (PEM): the injector's
/// serving certificate and the mesh CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CA certificate: the webhook's caBundle.
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The mesh CA: trust anchor, issuer certificate, issuer key.
    pub mesh_anchors_pem: String,
    pub mesh_issuer_pem: String,
    pub mesh_issuer_key_pem: String,
}

type Doc = (Yaml, Json);

fn read(file: File) -> Result<Vec<Doc>, InstallError> {
    manifest::read_documents(file.1).map_err(|e| InstallError::Embedded { file: file.0, source: Box::new(e) })
}

fn find<'a>(docs: &'a mut [Doc], kind: &str, name: &str) -> Option<&'a mut Json> {
    docs.iter_mut().map(|(_, j)| j).find(|j| j["kind"] == kind && j["metadata"]["name"] == name)
}

/// Renders the manifests; `tls` is required unless `opts.cert_manager`.
pub fn render(opts: &Options, tls: Option<&Tls>) -> Result<String, InstallError> {
    for (flag, value) in [("image-registry", &opts.image_registry), ("tag", &opts.tag), ("redis-url", &opts.redis_url)]
    {
        if let Some(v) = value
            && (v.trim().is_empty() || v.chars().any(char::is_whitespace))
        {
            return Err(InstallError::Flag { flag, value: v.clone(), reason: "must be non-empty, without spaces" });
        }
    }
    let mut docs = Vec::new();
    for file in BASE {
        docs.extend(read(file)?);
    }
    if opts.cert_manager {
        for file in CERT_MANAGER {
            docs.extend(read(file)?);
        }
        let patch = read(CERT_MANAGER_PATCH)?.pop().map(|(_, j)| j).unwrap_or_default();
        let webhook = find(&mut docs, "MutatingWebhookConfiguration", WEBHOOK_CONFIG)
            .ok_or(InstallError::Patch { file: CERT_MANAGER_PATCH.0, reason: "no webhook configuration".into() })?;
        json_patch::merge(webhook, &patch);
        json_patch_file(&mut docs, CERT_MANAGER_INJECTOR_PATCH, INJECTOR_SERVICE)?;
    } else {
        let tls = tls.ok_or(InstallError::NoTls)?;
        add_tls(&mut docs, tls)?;
    }
    if opts.demo {
        for file in DEMO {
            docs.extend(read(file)?);
        }
        json_patch_file(&mut docs, DEMO_INJECTOR_PATCH, INJECTOR_SERVICE)?;
    }
    redis_url(&mut docs, opts)?;
    images(&mut docs, opts.image_registry.as_deref().unwrap_or(DEFAULT_REGISTRY), opts.tag.as_deref());
    let mut out = format!(
        "# Neutrino {DEFAULT_TAG}, rendered by `neutrino install{}`: apply with kubectl apply -f -\n",
        flags(opts)
    );
    out.push_str(&manifest::write_documents(&docs)?);
    Ok(out)
}

fn flags(opts: &Options) -> String {
    let mut s = String::new();
    for (on, flag) in [(opts.demo, " --demo"), (opts.cert_manager, " --cert-manager")] {
        if on {
            s.push_str(flag);
        }
    }
    for (flag, value) in [("image-registry", &opts.image_registry), ("tag", &opts.tag), ("redis-url", &opts.redis_url)]
    {
        if let Some(v) = value {
            s.push_str(&format!(" --{flag} {v}"));
        }
    }
    s
}

/// The Secret and the ConfigMap the injector mounts, before its Deployment; the mesh CA
/// Secret before the control plane; the CA into every webhook.
fn add_tls(docs: &mut Vec<Doc>, tls: &Tls) -> Result<(), InstallError> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": INJECTOR_TLS_SECRET,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "neutrino-injector", "app.kubernetes.io/part-of": "neutrino"},
        },
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(&tls.cert_pem), "tls.key": b64(&tls.key_pem), "ca.crt": b64(&tls.ca_pem)},
    });
    let anchors = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": TRUST_ANCHORS_CONFIGMAP,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": "neutrino-injector", "app.kubernetes.io/part-of": "neutrino"},
        },
        "data": {TRUST_ANCHORS_KEY: tls.mesh_anchors_pem},
    });
    let at = docs.iter().position(|(_, j)| j["kind"] == "Deployment" && j["metadata"]["name"] == INJECTOR_SERVICE);
    let at = at.unwrap_or(docs.len());
    docs.splice(at..at, [(Yaml::Null, secret), (Yaml::Null, anchors)]);
    let mesh_ca = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": MESH_CA_SECRET,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": CONTROL_PLANE, "app.kubernetes.io/part-of": "neutrino"},
        },
        "type": "kubernetes.io/tls",
        "data": {
            "ca.crt": b64(&tls.mesh_anchors_pem),
            "tls.crt": b64(&tls.mesh_issuer_pem),
            "tls.key": b64(&tls.mesh_issuer_key_pem),
        },
    });
    let at = docs.iter().position(|(_, j)| j["kind"] == "Deployment" && j["metadata"]["name"] == CONTROL_PLANE);
    docs.insert(at.unwrap_or(docs.len()), (Yaml::Null, mesh_ca));
    let file = "deploy/base/webhook.yaml";
    let webhook = find(docs, "MutatingWebhookConfiguration", WEBHOOK_CONFIG)
        .ok_or(InstallError::Patch { file, reason: "no webhook configuration".into() })?;
    let hooks = webhook["webhooks"].as_array_mut().ok_or(InstallError::Patch { file, reason: "no webhooks".into() })?;
    for hook in hooks {
        hook["clientConfig"]["caBundle"] = json!(b64(&tls.ca_pem));
    }
    Ok(())
}

/// Applies a JSON patch file of `deploy/` to the Deployment `name`.
fn json_patch_file(docs: &mut [Doc], file: File, name: &str) -> Result<(), InstallError> {
    let ops = serde_yaml_ng::from_str::<Json>(file.1)
        .map_err(|e| InstallError::Embedded { file: file.0, source: Box::new(e) })?;
    let patch: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| InstallError::Patch { file: file.0, reason: e.to_string() })?;
    let deployment = find(docs, "Deployment", name)
        .ok_or_else(|| InstallError::Patch { file: file.0, reason: format!("no Deployment {name}") })?;
    json_patch::patch(deployment, &patch).map_err(|e| InstallError::Patch { file: file.0, reason: e.to_string() })
}

/// The demo's JSON patch (with `--redis-url`'s value, when given), or `--redis-url` alone.
fn redis_url(docs: &mut [Doc], opts: &Options) -> Result<(), InstallError> {
    let mut ops = match (opts.demo, &opts.redis_url) {
        (false, None) => return Ok(()),
        (true, _) => serde_yaml_ng::from_str::<Json>(DEMO_PATCH.1)
            .map_err(|e| InstallError::Embedded { file: DEMO_PATCH.0, source: Box::new(e) })?,
        (false, Some(_)) => json!([{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": ""}]),
    };
    if let (Some(url), Some(op)) = (&opts.redis_url, ops.get_mut(0)) {
        op["value"] = json!(format!("--redis-url={url}"));
    }
    let patch: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| InstallError::Patch { file: DEMO_PATCH.0, reason: e.to_string() })?;
    let deployment = find(docs, "Deployment", CONTROL_PLANE)
        .ok_or(InstallError::Patch { file: DEMO_PATCH.0, reason: "no control-plane Deployment".into() })?;
    json_patch::patch(deployment, &patch).map_err(|e| InstallError::Patch { file: DEMO_PATCH.0, reason: e.to_string() })
}

/// `neutrino/<name>:<tag>` -> `<registry>/<name>:<tag or the new tag>`; other images as they are.
fn image(reference: &str, registry: &str, tag: Option<&str>) -> Option<String> {
    let rest = reference.strip_prefix(&format!("{DEFAULT_REGISTRY}/"))?;
    let (name, old_tag) = rest.split_once(':').unwrap_or((rest, DEFAULT_TAG));
    Some(format!("{registry}/{name}:{}", tag.unwrap_or(old_tag)))
}

/// Rewrites the images of every pod template, and the injector's `--proxy-image=`.
fn images(docs: &mut [Doc], registry: &str, tag: Option<&str>) {
    for (_, doc) in docs {
        let Some(spec) = doc.pointer_mut("/spec/template/spec") else { continue };
        for list in ["initContainers", "containers"] {
            for c in spec.get_mut(list).and_then(Json::as_array_mut).into_iter().flatten() {
                if let Some(new) = c["image"].as_str().and_then(|i| image(i, registry, tag)) {
                    c["image"] = json!(new);
                }
                for arg in c.get_mut("args").and_then(Json::as_array_mut).into_iter().flatten() {
                    let new = arg
                        .as_str()
                        .and_then(|a| a.strip_prefix("--proxy-image="))
                        .and_then(|i| image(i, registry, tag));
                    if let Some(new) = new {
                        *arg = json!(format!("--proxy-image={new}"));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tls::{MeshCaOrigin, generate_mesh_ca};
    use super::*;

    fn tls() -> Tls {
        Tls {
            ca_pem: "CA".into(),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
            mesh_anchors_pem: "ANCHORS".into(),
            mesh_issuer_pem: "ISSUER".into(),
            mesh_issuer_key_pem: "ISSUERKEY".into(),
        }
    }

    /// The control plane's arguments in deploy/base.
    const CP_ARGS: [&str; 4] = [
        "--kubernetes",
        "--trust-anchors=/etc/neutrino/ca/anchors.pem",
        "--issuer-cert=/etc/neutrino/ca/issuer.pem",
        "--issuer-key=/etc/neutrino/ca/issuer-key.pem",
    ];

    fn objects(text: &str) -> Vec<Json> {
        manifest::read_documents(text).expect("output parses").into_iter().map(|(_, j)| j).collect()
    }

    fn get<'a>(docs: &'a [Json], kind: &str, name: &str) -> &'a Json {
        docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).expect(name)
    }

    #[test]
    fn default_install_has_the_secret_before_the_injector_and_the_ca_in_the_webhook() {
        let docs = objects(&render(&Options::default(), Some(&tls())).expect("render"));
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert_eq!(kinds[0], "Namespace");
        let mesh_ca = docs.iter().position(|d| d["metadata"]["name"] == MESH_CA_SECRET).expect("mesh CA");
        let cp_at = docs.iter().position(|d| d["metadata"]["name"] == CONTROL_PLANE && d["kind"] == "Deployment");
        assert!(Some(mesh_ca) < cp_at, "the CA Secret before the control plane: {kinds:?}");
        let data = &get(&docs, "Secret", MESH_CA_SECRET)["data"];
        assert_eq!(
            (&data["ca.crt"], &data["tls.crt"], &data["tls.key"]),
            (&json!("QU5DSE9SUw=="), &json!("SVNTVUVS"), &json!("SVNTVUVSS0VZ"))
        );
        let secret = kinds.iter().position(|k| *k == "Secret").expect("secret");
        let injector =
            docs.iter().position(|d| d["metadata"]["name"] == "neutrino-injector" && d["kind"] == "Deployment");
        assert!(Some(secret) < injector, "{kinds:?}");
        let webhook = get(&docs, "MutatingWebhookConfiguration", WEBHOOK_CONFIG);
        assert_eq!(webhook["webhooks"][0]["clientConfig"]["caBundle"], "Q0E=");
        assert_eq!(get(&docs, "Secret", INJECTOR_TLS_SECRET)["data"]["tls.key"], "S0VZ");
        let anchors =
            docs.iter().position(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == TRUST_ANCHORS_CONFIGMAP);
        assert!(anchors.is_some() && anchors < injector, "the anchors before the injector: {kinds:?}");
        let cm = get(&docs, "ConfigMap", TRUST_ANCHORS_CONFIGMAP);
        assert_eq!(
            (&cm["metadata"]["namespace"], &cm["data"]),
            (&json!(NAMESPACE), &json!({"anchors.pem": "ANCHORS"}))
        );
        assert_eq!(
            cm["metadata"]["labels"],
            json!({"app.kubernetes.io/name": "neutrino-injector", "app.kubernetes.io/part-of": "neutrino"})
        );
        let volumes = &get(&docs, "Deployment", INJECTOR_SERVICE)["spec"]["template"]["spec"]["volumes"];
        assert_eq!(volumes[1]["configMap"]["name"], TRUST_ANCHORS_CONFIGMAP, "the injector mounts it: {volumes}");
        assert_eq!(volumes[1]["configMap"]["items"][0]["key"], TRUST_ANCHORS_KEY);
        assert_eq!(kinds.iter().filter(|k| **k == "ConfigMap").count(), 1, "{kinds:?}");
        assert!(!kinds.contains(&"Certificate"), "{kinds:?}");
        let cp = get(&docs, "Deployment", CONTROL_PLANE);
        assert_eq!(cp["spec"]["template"]["spec"]["containers"][0]["args"], json!(CP_ARGS));
        assert_eq!(cp["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"], MESH_CA_SECRET);
        assert!(matches!(render(&Options::default(), None), Err(InstallError::NoTls)));
    }

    #[test]
    fn cert_manager_adds_certificates_and_the_ca_injection_annotation() {
        let opts = Options { cert_manager: true, ..Options::default() };
        let docs = objects(&render(&opts, None).expect("render"));
        let webhook = get(&docs, "MutatingWebhookConfiguration", WEBHOOK_CONFIG);
        assert_eq!(
            webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "neutrino-system/neutrino-injector"
        );
        assert!(webhook["webhooks"][0]["clientConfig"].get("caBundle").is_none());
        assert_eq!(get(&docs, "Certificate", "neutrino-injector")["spec"]["secretName"], INJECTOR_TLS_SECRET);
        assert_eq!(get(&docs, "Certificate", MESH_CA_SECRET)["spec"]["secretName"], MESH_CA_SECRET);
        assert!(!docs.iter().any(|d| d["kind"] == "Secret" || d["kind"] == "ConfigMap"));
        // cert-manager cannot write the ConfigMap: the injector mounts the Secret's ca.crt.
        let volumes = &get(&docs, "Deployment", INJECTOR_SERVICE)["spec"]["template"]["spec"]["volumes"];
        assert_eq!(
            volumes[1],
            json!({"name": "trust-anchors", "secret": {"secretName": MESH_CA_SECRET, "items": [{"key": "ca.crt", "path": TRUST_ANCHORS_KEY}]}})
        );
        assert_eq!(volumes[0]["secret"]["secretName"], INJECTOR_TLS_SECRET, "the other volume stays: {volumes}");
    }

    /// deploy/cert-manager/injector-anchors.yaml addresses the volume by index (JSON
    /// patches cannot select by name); its `test` op refuses to patch a moved volume.
    #[test]
    fn the_cert_manager_anchors_patch_finds_the_trust_anchors_volume_or_fails() {
        let mut docs = read(BASE[4]).expect("injector.yaml");
        let volumes =
            &find(&mut docs, "Deployment", INJECTOR_SERVICE).expect("injector")["spec"]["template"]["spec"]["volumes"];
        assert_eq!(
            (&volumes[1]["name"], &volumes[1]["configMap"]["name"]),
            (&json!("trust-anchors"), &json!(TRUST_ANCHORS_CONFIGMAP)),
            "deploy/base/injector.yaml moved the trust-anchors volume: update deploy/cert-manager/injector-anchors.yaml"
        );
        json_patch_file(&mut docs, CERT_MANAGER_INJECTOR_PATCH, INJECTOR_SERVICE).expect("patch applies");
        let mut docs = read(BASE[4]).expect("injector.yaml");
        let spec = &mut find(&mut docs, "Deployment", INJECTOR_SERVICE).expect("injector")["spec"]["template"]["spec"];
        spec["volumes"].as_array_mut().expect("volumes").swap(0, 1);
        let moved = json_patch_file(&mut docs, CERT_MANAGER_INJECTOR_PATCH, INJECTOR_SERVICE);
        assert!(matches!(moved, Err(InstallError::Patch { .. })), "{moved:?}");
    }

    fn mesh_secret_and_anchors(tls: &Tls) -> (Json, Json) {
        let docs = objects(&render(&Options::default(), Some(tls)).expect("render"));
        (
            get(&docs, "Secret", MESH_CA_SECRET)["data"].clone(),
            get(&docs, "ConfigMap", TRUST_ANCHORS_CONFIGMAP)["data"].clone(),
        )
    }

    #[test]
    fn mesh_ca_dir_is_written_on_the_first_run_and_reused_after() {
        use std::os::unix::fs::PermissionsExt as _;
        let now = 1_700_000_000;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mesh-ca");
        let (first, origin) = mesh_ca(Some(&dir), now).expect("generate into a missing dir");
        assert_eq!(origin, MeshCaOrigin::Written(dir.clone()));
        assert!(origin.notice().is_some_and(|n| n.contains("mesh-ca")));
        for file in MESH_CA_FILES {
            assert!(dir.join(file).is_file(), "{file} written");
        }
        assert_eq!(std::fs::read_to_string(dir.join("issuer-key.pem")).expect("key"), first.issuer_key_pem);
        let mode = std::fs::metadata(dir.join("issuer-key.pem")).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, origin) = mesh_ca(Some(&dir), now + 86_400).expect("reuse");
        assert_eq!((origin, &second), (MeshCaOrigin::Reused(dir.clone()), &first));
        let a = mesh_secret_and_anchors(&tls_with_mesh_ca(now, first).expect("tls"));
        let b = mesh_secret_and_anchors(&tls_with_mesh_ca(now + 86_400, second).expect("tls"));
        assert_eq!(a, b, "two renders from one --mesh-ca-dir carry the same mesh CA");
        let b64 = base64::engine::general_purpose::STANDARD.encode(a.1["anchors.pem"].as_str().expect("pem"));
        assert_eq!(a.0["ca.crt"], json!(b64), "the ConfigMap's anchors are the Secret's ca.crt");
        // An empty directory is generated into as well.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).expect("mkdir");
        assert_eq!(mesh_ca(Some(&empty), now).expect("generate").1, MeshCaOrigin::Written(empty.clone()));
    }

    #[test]
    fn mesh_ca_dir_refuses_a_partial_or_invalid_set() {
        let now = 1_700_000_000;
        let tmp = tempfile::tempdir().expect("tempdir");
        let (full, _) = mesh_ca(Some(tmp.path()), now).expect("generate");
        std::fs::remove_file(tmp.path().join("issuer-key.pem")).expect("rm");
        let err = mesh_ca(Some(tmp.path()), now).expect_err("partial");
        assert!(matches!(err, InstallError::PartialMeshCaDir { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("anchors.pem, issuer.pem") && text.contains("not issuer-key.pem"), "{text}");
        assert!(!tmp.path().join("issuer-key.pem").exists(), "nothing regenerated");
        // Every file there, but the key is not the issuer's.
        let other = generate_mesh_ca(now).expect("generate");
        std::fs::write(tmp.path().join("issuer-key.pem"), other.issuer_key_pem).expect("write");
        let err = mesh_ca(Some(tmp.path()), now).expect_err("mismatched key").to_string();
        assert!(err.starts_with("--mesh-ca-dir") && err.contains("does not belong"), "{err}");
        std::fs::write(tmp.path().join("anchors.pem"), "not PEM").expect("write");
        std::fs::write(tmp.path().join("issuer-key.pem"), full.issuer_key_pem).expect("write");
        let err = mesh_ca(Some(tmp.path()), now).expect_err("no anchors").to_string();
        assert!(err.contains("trust anchors"), "{err}");
    }

    #[test]
    fn without_mesh_ca_dir_a_new_ca_comes_with_a_warning() {
        let (a, origin) = mesh_ca(None, 1_700_000_000).expect("generate");
        let notice = origin.notice().expect("a warning");
        assert!(notice.starts_with("warning: generated a NEW mesh CA") && notice.contains("--mesh-ca-dir"), "{notice}");
        let (b, _) = mesh_ca(None, 1_700_000_000).expect("generate");
        assert_ne!(a.anchors_pem, b.anchors_pem);
    }

    #[test]
    fn demo_adds_redis_jaeger_the_sample_app_and_the_redis_url() {
        let opts = Options { demo: true, ..Options::default() };
        let docs = objects(&render(&opts, Some(&tls())).expect("render"));
        for (kind, name) in [("Deployment", "redis"), ("Deployment", "jaeger"), ("Service", "sample-app")] {
            get(&docs, kind, name);
        }
        let args = &get(&docs, "Deployment", CONTROL_PLANE)["spec"]["template"]["spec"]["containers"][0]["args"];
        let mut expected = CP_ARGS.to_vec();
        expected.push("--redis-url=redis://redis.neutrino-system:6379");
        assert_eq!(args, &json!(expected));
        let injector = &get(&docs, "Deployment", INJECTOR_SERVICE)["spec"]["template"]["spec"]["containers"][0];
        let otlp = json!("--otlp-endpoint=http://jaeger.neutrino-system.svc:4317");
        assert!(injector["args"].as_array().is_some_and(|a| a.last() == Some(&otlp)), "{injector}");
        let jaeger = get(&docs, "Service", "jaeger");
        assert_eq!(
            (&jaeger["metadata"]["namespace"], &jaeger["spec"]["ports"][0]["port"]),
            (&json!(NAMESPACE), &json!(4317))
        );
        let svc = get(&docs, "Service", "sample-app");
        assert_eq!(svc["metadata"]["annotations"]["neutrino.io/openapi"], "configmap:sample-app-openapi/openapi.yaml");
        let cm = get(&docs, "ConfigMap", "sample-app-openapi");
        assert!(cm["data"]["openapi.yaml"].as_str().expect("doc").contains("x-neutrino-resources"));

        let opts = Options { redis_url: Some("redis://r:6379".into()), ..Options::default() };
        let docs = objects(&render(&opts, Some(&tls())).expect("render"));
        let args = &get(&docs, "Deployment", CONTROL_PLANE)["spec"]["template"]["spec"]["containers"][0]["args"];
        assert_eq!(args.as_array().and_then(|a| a.last()), Some(&json!("--redis-url=redis://r:6379")));
        assert!(!docs.iter().any(|d| d["metadata"]["name"] == "redis"));
        let injector = &get(&docs, "Deployment", INJECTOR_SERVICE)["spec"]["template"]["spec"]["containers"][0];
        assert!(!injector["args"].to_string().contains("otlp"), "no traces outside the demo: {injector}");
    }

    #[test]
    fn images_follow_registry_and_tag_and_only_ours_change() {
        let opts = Options {
            demo: true,
            image_registry: Some("reg.example/mesh".into()),
            tag: Some("dev".into()),
            ..Options::default()
        };
        let out = render(&opts, Some(&tls())).expect("render");
        let docs = objects(&out);
        let injector = &get(&docs, "Deployment", "neutrino-injector")["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(injector["image"], "reg.example/mesh/neutrino-injector:dev");
        assert!(
            injector["args"]
                .as_array()
                .expect("args")
                .contains(&json!("--proxy-image=reg.example/mesh/neutrino-proxy:dev"))
        );
        assert!(out.contains("image: redis:7.4-alpine"), "third-party images stay");
        assert!(!out.contains("image: neutrino/"), "{out}");
        let bad = Options { tag: Some(" ".into()), ..Options::default() };
        assert!(render(&bad, Some(&tls())).expect_err("empty tag").to_string().starts_with("--tag"));
    }

    #[test]
    fn the_embedded_images_carry_this_version() {
        let out = render(&Options { demo: true, ..Options::default() }, Some(&tls())).expect("render");
        for line in out.lines().filter(|l| l.contains("neutrino/neutrino-")) {
            assert!(
                line.ends_with(&format!(":{DEFAULT_TAG}")),
                "{line}: deploy/ must use the crate version {DEFAULT_TAG}"
            );
        }
    }

    #[test]
    fn generated_tls_is_a_ca_and_a_serving_cert_for_the_service() {
        let now = 1_700_000_000;
        let tls = generate_tls(now).expect("generate");
        let pem = x509_parser::pem::Pem::iter_from_buffer(tls.cert_pem.as_bytes()).next().expect("pem").expect("pem");
        let cert = pem.parse_x509().expect("x509");
        assert_eq!(cert.validity().not_after.timestamp(), now + TLS_VALIDITY_DAYS * 86_400);
        let san = cert.subject_alternative_name().expect("ext").expect("san");
        assert_eq!(san.value.general_names.len(), 2);
        assert!(tls.ca_pem.starts_with("-----BEGIN CERTIFICATE-----") && tls.key_pem.contains("PRIVATE KEY"));
        let mesh = neutrino_control_plane::identity::ca::Material {
            anchors_pem: tls.mesh_anchors_pem.clone(),
            issuer_pem: tls.mesh_issuer_pem.clone(),
            issuer_key_pem: tls.mesh_issuer_key_pem.clone(),
        };
        let ca = neutrino_control_plane::identity::ca::Ca::load(&mesh, std::time::Duration::from_secs(3600), now)
            .expect("the generated mesh CA loads in the control plane");
        assert_eq!(ca.issuer_not_after(), now + 365 * 86_400);
    }
}
