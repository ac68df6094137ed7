//! Helpers shared by the injector's integration tests: where the shared test data is
//! (beside the repository, as `tests/src/llhttp.rs` finds it), and pod lookups.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use clap::Parser;
use neutrino_injector::config::{InjectArgs, InjectConfig};
use serde_json::Value;

/// `../shared/testdata` beside the repository (read-only; never copied into it).
pub fn shared(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata").join(sub)
}

/// Every file in a shared test-data folder, sorted by name.
pub fn shared_files(sub: &str) -> Vec<PathBuf> {
    let dir = shared(sub);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (the shared test data sits beside the repo)", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pods (or pod templates) of one manifest document, as the injector sees them.
pub fn pods(doc: &Value) -> Vec<&Value> {
    match doc["kind"].as_str().unwrap_or_default() {
        "Pod" => vec![doc],
        "CronJob" => vec![&doc["spec"]["jobTemplate"]["spec"]["template"]],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            vec![&doc["spec"]["template"]]
        }
        k if k.ends_with("List") => doc["items"].as_array().into_iter().flatten().flat_map(pods).collect(),
        _ => vec![],
    }
}

/// The names in a list of containers or volumes.
pub fn names(list: &Value) -> Vec<&str> {
    list.as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect()
}

/// The trust anchors the mTLS cases inject (`tests/testdata/anchor-1.pem`, a test root).
pub fn anchors_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/anchor-1.pem")
}

/// The config the injection flags make (as `neutrino-injector` and `neutrino inject` do).
pub fn from_flags(args: &[&str]) -> InjectConfig {
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        inject: InjectArgs,
    }
    let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).expect("flags parse");
    cli.inject.config().expect("valid flags")
}

/// `--trust-anchors-file tests/testdata/anchor-1.pem`, everything else the default.
pub fn mtls() -> InjectConfig {
    from_flags(&["--trust-anchors-file", anchors_file().to_str().expect("utf-8 path")])
}
