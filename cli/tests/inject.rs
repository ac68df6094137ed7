//! `neutrino inject` / `neutrino uninject` as a user runs them: the real binary, a shared
//! manifest from a file and from stdin, `-o`, stderr reports and failures.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn shared(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/k8s").join(file).display().to_string()
}

fn neutrino(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_neutrino"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn neutrino");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or_default()).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("neutrino runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn inject_then_uninject_through_files_and_pipes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("injected.yaml");
    let out_path = out_file.to_str().expect("path");
    let manifest = shared("microservices-demo-kubernetes-manifests.yaml");
    let out = neutrino(&["inject", "-f", &manifest, "-o", out_path, "--proxy-image", "registry.local/proxy:dev"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().filter(|l| l.ends_with(": injected")).count(), 12, "{stderr}");
    let injected = std::fs::read(&out_file).expect("output file");
    assert_eq!(text(&injected).matches("image: registry.local/proxy:dev").count(), 24, "12 pods, 2 containers each");

    let out = neutrino(&["uninject", "-f", "-"], Some(&injected));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = text(&out.stdout);
    assert!(!back.contains("neutrino"), "{back}");
    // Same documents as the original (comments and empty documents aside).
    let reinjected =
        neutrino(&["inject", "-f", "-", "--proxy-image", "registry.local/proxy:dev"], Some(back.as_bytes()));
    assert_eq!(text(&reinjected.stdout), text(&injected));
}

#[test]
fn skipped_workloads_are_reported_and_errors_fail_the_command() {
    let out = neutrino(&["inject", "-f", &shared("istio-inject-hello-host-network.yaml")], None);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("Deployment hello-host-network: not injected: the pod uses hostNetwork"));
    assert!(text(&out.stdout).contains("neutrino.io/inject-skipped: host-network"));

    let bad = b"apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    \
                config.neutrino.io/proxy-memory-limit: lots\nspec:\n  containers: [{name: a, image: a}]\n";
    let out = neutrino(&["inject", "-f", "-"], Some(bad));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("document 1 (Pod p)") && stderr.contains("config.neutrino.io/proxy-memory-limit"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing half-written");

    let out = neutrino(&["inject", "-f", "/nonexistent.yaml"], None);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("reading /nonexistent.yaml"));
}
