//! Zero trust end to end: two pods as network namespaces behind real iptables rules, a
//! control plane with its own CA (identities from bootstrap tokens), and proxies that
//! get certificates over the control plane's TLS port and call each other over mTLS.
//! Real clients: curl (plaintext, and TLS with client certificates minted here), the
//! sample app's TCP client, and each proxy's own admin endpoints.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use neutrino_tests::netns::{IP_B, PodProc, Pods, curl_in, poll_until};
use neutrino_tests::{bin, metric};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType};

const VIP: &str = "10.96.0.10";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
/// The server name mesh clients send to reach pod B's proxy (identity default/echo).
const B_NAME: &str = "echo.default.id.neutrino.mesh";

struct Mesh {
    pods: Pods,
    procs: Vec<PodProc>,
    dir: tempfile::TempDir,
    mesh_file: PathBuf,
}

/// Status code and body of a request made with curl in pod A.
fn status_in(ns: &str, args: &[&str]) -> Result<(u16, String), String> {
    let out = curl_in(ns, &[&["-w", "\n%{http_code}"], args].concat())?;
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok((code.trim().parse().map_err(|_| format!("no status in {out:?}"))?, body.to_string()))
}

fn proxy_metric(ns: &str, name: &str, labels: &str) -> f64 {
    let text = curl_in(ns, &["http://127.0.0.1:15020/metrics"]).unwrap_or_default();
    metric(&text, name, labels).unwrap_or(0.0)
}

fn dump(ns: &str) -> serde_json::Value {
    serde_json::from_str(&curl_in(ns, &["http://127.0.0.1:15020/config_dump"]).unwrap_or_default()).unwrap_or_default()
}

fn tcp_echo(ns: &str, target: &str, msg: &str) -> Result<String, String> {
    let out = Pods::exec(ns, &bin("neutrino-sample-app"), &["tcp-client", target, msg])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == msg {
        Ok(msg.to_string())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

fn mesh_yaml(service_policy: &str) -> String {
    format!(
        "services:\n  - name: echo\n    virtualIP: {VIP}\n    serviceAccount: echo\n    ports:\n      - {{port: 80, targetPort: 8080}}\n      - {{port: 9000, protocol: tcp}}\n    endpoints:\n      - {{address: {IP_B}, name: echo-b, capacity: {{cpu: 2, memory: 2Gi}}}}\n    policy: {service_policy}\n"
    )
}

/// Writes `content` to `path` atomically (a reader never sees half a file).
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A CA made here: an anchor, or an issuer under one.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

impl Ca {
    fn root(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let key_pem = key.serialize_pem();
        Ca { issuer: CertifiedIssuer::self_signed(Ca::params(name), key).unwrap(), key_pem }
    }

    fn under(&self, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let key_pem = key.serialize_pem();
        Ca { issuer: CertifiedIssuer::signed_by(Ca::params(name), key, &self.issuer).unwrap(), key_pem }
    }

    fn params(name: &str) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        p
    }

    /// A client certificate (chain PEM: leaf, issuer) and key naming `id`.
    fn client(&self, id: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = p.signed_by(&key, &self.issuer).unwrap();
        (format!("{}{}", leaf.pem(), self.issuer.pem()), key.serialize_pem())
    }
}

/// Pod B: the control plane (CA files in `ca/`, tokens for default/web and
/// default/echo), the sample app (HTTP 8080, TCP echo 9000) and its proxy as
/// default/echo. Pod A: a proxy as default/web. `cp_flags` are added to the control
/// plane's; the CA files are written by the caller.
fn mesh(service_policy: &str, cp_flags: &[&str], ca: &Ca, anchors: &[&Ca]) -> Option<Mesh> {
    if let Some(why) = neutrino_tests::netns::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    // The proxies run as uid 1337 and read the anchors and their token from here.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, mesh_yaml(service_policy)).unwrap();
    std::fs::write(p("tokens"), "tok-web-0123456789 default/web\ntok-echo-0123456789 default/echo\n").unwrap();
    std::fs::write(p("tok-web"), "tok-web-0123456789\n").unwrap();
    std::fs::write(p("tok-echo"), "tok-echo-0123456789\n").unwrap();
    write_anchors(dir.path(), anchors);
    std::fs::write(p("issuer.pem"), ca.issuer.pem()).unwrap();
    std::fs::write(p("issuer-key.pem"), &ca.key_pem).unwrap();

    let pods = Pods::create();
    let proxy = bin("neutrino-proxy");
    for ns in [&pods.a, &pods.b] {
        let out = Pods::exec(ns, &proxy, &["init"]).output().unwrap();
        assert!(out.status.success(), "init in {ns}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut procs = Vec::new();
    let (mesh_path, tokens) = (mesh_file.to_str().unwrap().to_string(), p("tokens"));
    let (anchors_file, issuer, issuer_key) = (p("anchors.pem"), p("issuer.pem"), p("issuer-key.pem"));
    let names = format!("{IP_B},127.0.0.1,localhost");
    let mut cp_args = vec![
        "--mesh-file",
        &mesh_path,
        "--trust-anchors",
        &anchors_file,
        "--issuer-cert",
        &issuer,
        "--issuer-key",
        &issuer_key,
        "--bootstrap-tokens",
        &tokens,
        "--tls-names",
        &names,
        "--debounce-quiet-ms",
        "20",
    ];
    cp_args.extend_from_slice(cp_flags);
    procs.push(PodProc::spawn(
        "control-plane",
        Pods::exec(&pods.b, &bin("neutrino-control-plane"), &cp_args),
        dir.path(),
    ));
    procs.push(PodProc::spawn(
        "app-b",
        Pods::exec(
            &pods.b,
            &bin("neutrino-sample-app"),
            &["serve", "--http", "0.0.0.0:8080", "--tcp", "0.0.0.0:9000", "--name", "echo-b"],
        ),
        dir.path(),
    ));
    for (ns, cp, pod, sa) in
        [(&pods.a, format!("{IP_B}:15012"), "web-a", "web"), (&pods.b, "127.0.0.1:15012".to_string(), "echo-b", "echo")]
    {
        let token = p(&format!("tok-{sa}"));
        let args = [
            "--control-plane",
            &cp,
            "--admin-addr",
            "0.0.0.0:15020",
            "--pod",
            pod,
            "--namespace",
            "default",
            "--service-account",
            sa,
            "--ca-file",
            &anchors_file,
            "--token-file",
            &token,
        ];
        procs.push(PodProc::spawn(&format!("proxy-{sa}"), Pods::exec_as_proxy(ns, &proxy, &args), dir.path()));
    }
    for ns in [&pods.a, &pods.b] {
        poll_until(&format!("the proxy in {ns} to be ready (config and certificate)"), Duration::from_secs(30), || {
            curl_in(ns, &["-f", "http://127.0.0.1:15020/ready"]).map(|_| ())
        });
    }
    poll_until("the app in pod B", Duration::from_secs(20), || {
        curl_in(&pods.b, &["-f", "http://127.0.0.1:8080/"]).map(|_| ())
    });
    Some(Mesh { pods, procs, dir, mesh_file })
}

fn write_anchors(dir: &Path, anchors: &[&Ca]) {
    let pem: String = anchors.iter().map(|a| a.issuer.pem()).collect();
    replace_file(&dir.join("anchors.pem"), &pem);
}

impl Mesh {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// curl in pod A straight to pod B's app port over TLS with a client certificate,
    /// sending B's mesh server name (its proxy terminates it as mesh mTLS). `-k`: this
    /// caller does not check B's certificate; what is tested is B's check of the caller.
    fn call_with_cert(&self, tag: &str, chain_and_key: (String, String)) -> Result<(u16, String), String> {
        let (cert, key) = (self.path(&format!("{tag}.pem")), self.path(&format!("{tag}.key")));
        std::fs::write(&cert, chain_and_key.0).unwrap();
        std::fs::write(&key, chain_and_key.1).unwrap();
        let resolve = format!("{B_NAME}:8080:{IP_B}");
        let url = format!("https://{B_NAME}:8080/who");
        status_in(&self.pods.a, &["-k", "--cert", &cert, "--key", &key, "--resolve", &resolve, &url])
    }

    fn assert_no_proxy_errors(&self) {
        for p in &self.procs {
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            assert!(!log.contains("panicked"), "{}: {log}", p.log.display());
        }
    }
}

#[test]
fn strict_mode_refuses_plaintext_and_permissive_mode_counts_it() {
    let anchor = Ca::root("anchor");
    let issuer = anchor.under("issuer");
    let Some(m) = mesh("{tls: strict}", &[], &issuer, &[&anchor]) else { return };
    let (a, b) = (&m.pods.a, &m.pods.b);

    // Through both proxies: mTLS, verified both ways.
    let before = proxy_metric(b, "neutrino_proxy_tls_handshakes_total", "direction=\"inbound\",result=\"ok\"");
    let (code, body) = status_in(a, &[&format!("http://{VIP}/hello")]).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(proxy_metric(b, "neutrino_proxy_tls_handshakes_total", "direction=\"inbound\",result=\"ok\"") > before);
    assert_eq!(tcp_echo(a, &format!("{VIP}:9000"), "opaque bytes over mTLS"), Ok("opaque bytes over mTLS".into()));
    assert_eq!(dump(a)["identity"]["id"], WEB);
    let by_caller = format!("caller=\"{WEB}\"");
    assert!(
        proxy_metric(b, "neutrino_proxy_inbound_mtls_connections_total", &by_caller) >= 1.0,
        "the verified caller is counted"
    );

    // Plaintext straight to the pod (A's proxy passes it through: not a mesh address).
    let refused = |what| proxy_metric(b, &format!("neutrino_proxy_plaintext_{what}_total"), "service=\"default/echo\"");
    let (code, body) = status_in(a, &[&format!("http://{IP_B}:8080/plain")]).unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("strict mode"), "{body}");
    assert!(tcp_echo(a, &format!("{IP_B}:9000"), "plain tcp").is_err(), "plaintext TCP is reset in strict mode");
    assert_eq!(refused("refused"), 2.0);
    assert_eq!(refused("accepted"), 0.0);

    // The same caller in permissive mode: served, and counted.
    replace_file(&m.mesh_file, &mesh_yaml("{tls: permissive}"));
    poll_until("permissive mode to reach pod B's proxy", Duration::from_secs(10), || {
        match status_in(a, &[&format!("http://{IP_B}:8080/plain")]) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(tcp_echo(a, &format!("{IP_B}:9000"), "plain tcp"), Ok("plain tcp".into()));
    assert_eq!(refused("accepted"), 2.0);
    m.assert_no_proxy_errors();
}

#[test]
fn callers_are_authorized_by_their_verified_spiffe_id() {
    let anchor = Ca::root("anchor");
    let issuer = anchor.under("issuer");
    let policy = format!("{{tls: strict, allow: [{{from: [\"{WEB}\"]}}]}}");
    let Some(m) = mesh(&policy, &[], &issuer, &[&anchor]) else { return };
    let (a, b) = (&m.pods.a, &m.pods.b);
    let denials = || proxy_metric(b, "neutrino_proxy_policy_denials_total", "service=\"default/echo\"");

    // Pod A's proxy is default/web: allowed.
    assert_eq!(status_in(a, &[&format!("http://{VIP}/ok")]).unwrap().0, 200);
    // A caller with a valid mesh certificate for another identity: authenticated, denied.
    let (code, body) =
        m.call_with_cert("intruder", issuer.client("spiffe://cluster.local/ns/default/sa/intruder")).unwrap();
    assert_eq!(code, 403, "{body}");
    assert_eq!(denials(), 1.0);
    // The right identity, presented the same way: allowed.
    let (code, body) = m.call_with_cert("web", issuer.client(WEB)).unwrap();
    assert_eq!(code, 200, "{body}");
    // The right identity from another CA: the handshake fails, nothing reaches the app.
    let stranger = Ca::root("stranger");
    let failed = proxy_metric(b, "neutrino_proxy_tls_handshakes_total", "direction=\"inbound\",result=\"error\"");
    let err = m.call_with_cert("stranger", stranger.client(WEB)).expect_err("a certificate from another CA");
    assert!(err.contains("SSL") || err.contains("TLS") || err.contains("alert"), "{err}");
    assert_eq!(
        proxy_metric(b, "neutrino_proxy_tls_handshakes_total", "direction=\"inbound\",result=\"error\"") - failed,
        1.0
    );
    assert_eq!(denials(), 1.0);

    // Policy narrowed to another caller: pod A is now denied, by identity.
    let other = "{tls: strict, allow: [{from: [\"spiffe://cluster.local/ns/default/sa/payments\"]}]}";
    replace_file(&m.mesh_file, &mesh_yaml(other));
    poll_until("the narrower policy to deny pod A", Duration::from_secs(10), || {
        match status_in(a, &[&format!("http://{VIP}/now-denied")]) {
            Ok((403, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    m.assert_no_proxy_errors();
}

/// Requests from pod A, HTTP over pooled mTLS and TCP over a new handshake each, until
/// `stop`; counts successes, and records failures.
fn load(ns: String, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut failures = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            match status_in(&ns, &[&format!("http://{VIP}/load/{i}")]) {
                Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                other => {
                    failures.push(format!("http {i}: {other:?}"));
                    0
                }
            };
            match tcp_echo(&ns, &format!("{VIP}:9000"), &format!("tcp-{i}")) {
                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    failures.push(format!("tcp {i}: {e}"));
                    0
                }
            };
        }
        failures
    })
}

#[test]
fn short_lived_certificates_rotate_under_load_without_a_failed_request() {
    let anchor = Ca::root("anchor");
    let issuer = anchor.under("issuer");
    let Some(m) = mesh("{tls: strict}", &["--cert-ttl", "3s"], &issuer, &[&anchor]) else { return };
    let renewals = |ns: &str| proxy_metric(ns, "neutrino_proxy_certificate_renewals_total", "result=\"ok\"");
    let start = [renewals(&m.pods.a), renewals(&m.pods.b)];
    let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let worker = load(m.pods.a.clone(), Arc::clone(&stop), Arc::clone(&ok));
    // Three renewals each (every ~2 s at a 3 s life) while the load runs.
    poll_until("three certificate renewals on both proxies", Duration::from_secs(30), || {
        let now = [renewals(&m.pods.a), renewals(&m.pods.b)];
        if now[0] - start[0] >= 3.0 && now[1] - start[1] >= 3.0 { Ok(()) } else { Err(format!("{now:?}")) }
    });
    stop.store(true, Ordering::Relaxed);
    let failures = worker.join().unwrap();
    assert!(failures.is_empty(), "{} failed of {}: {failures:#?}", failures.len(), ok.load(Ordering::Relaxed));
    assert!(ok.load(Ordering::Relaxed) > 50, "only {} requests", ok.load(Ordering::Relaxed));
    let errors =
        proxy_metric(&m.pods.b, "neutrino_proxy_tls_handshakes_total", "direction=\"inbound\",result=\"error\"");
    assert_eq!(errors, 0.0);
    m.assert_no_proxy_errors();
}

#[test]
fn trust_anchor_rotation_with_an_overlap_fails_no_request() {
    let old = Ca::root("old anchor");
    let old_issuer = old.under("old issuer");
    let Some(m) = mesh("{tls: strict}", &["--cert-ttl", "4s", "--ca-reload-secs", "1"], &old_issuer, &[&old]) else {
        return;
    };
    let (a, b) = (m.pods.a.clone(), m.pods.b.clone());
    let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let worker = load(a.clone(), Arc::clone(&stop), Arc::clone(&ok));
    let both = |what: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
        poll_until(what, Duration::from_secs(30), || {
            let (da, db) = (dump(&a), dump(&b));
            if check(&da["identity"]) && check(&db["identity"]) {
                Ok(())
            } else {
                Err(format!("{} / {}", da["identity"], db["identity"]))
            }
        })
    };
    let new = Ca::root("new anchor");
    let new_issuer = new.under("new issuer");
    let dir = m.dir.path();
    // 1. Trust both anchors everywhere.
    write_anchors(dir, &[&old, &new]);
    both("both proxies to trust two anchors", &|i| i["trust_anchors"] == 2);
    // 2. Issue from the new issuer; certificates from the old one keep working.
    replace_file(&dir.join("issuer-key.pem"), &new_issuer.key_pem);
    replace_file(&dir.join("issuer.pem"), &new_issuer.issuer.pem());
    both("both proxies to hold certificates from the new issuer", &|i| {
        i["certificate_issuer"].as_str().is_some_and(|s| s.contains("new issuer"))
    });
    // 3. Retire the old anchor.
    write_anchors(dir, &[&new]);
    both("both proxies to trust only the new anchor", &|i| i["trust_anchors"] == 1);
    let after = ok.load(Ordering::Relaxed);
    poll_until("more requests after the rotation", Duration::from_secs(20), || {
        if ok.load(Ordering::Relaxed) > after + 20 { Ok(()) } else { Err("waiting".into()) }
    });
    stop.store(true, Ordering::Relaxed);
    let failures = worker.join().unwrap();
    assert!(failures.is_empty(), "{} failed of {}: {failures:#?}", failures.len(), ok.load(Ordering::Relaxed));
    m.assert_no_proxy_errors();
}
