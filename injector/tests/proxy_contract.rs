//! The injected containers speak the proxy's language: the init flags, the environment,
//! the UID and the admin port are checked against the proxy's own source
//! (`proxy/src/init/mod.rs`, `proxy/src/main.rs`, `proxy/src/lib.rs`), and the default
//! control-plane ports and token audience against the control plane's
//! (`control-plane/src/lib.rs`, `control-plane/src/identity/token.rs`), so a rename there
//! fails here instead of in a cluster. (Read as text: linking the proxy crate would tie
//! this crate's build to the proxy's.)

use std::path::Path;

use neutrino_injector::config::{self, InjectConfig};
use neutrino_injector::containers;
use neutrino_injector::overrides::{Overrides, Select};
use neutrino_injector::{PROXY_ADMIN_PORT, PROXY_UID};

fn proxy_source(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/src").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn control_plane_source(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../control-plane/src").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_uid_and_admin_port_are_the_proxys() {
    assert!(proxy_source("init/mod.rs").contains(&format!("pub const DEFAULT_PROXY_UID: u32 = {PROXY_UID};")));
    assert!(proxy_source("lib.rs").contains(&format!("pub const ADMIN_PORT: u16 = {PROXY_ADMIN_PORT};")));
}

#[test]
fn every_init_flag_is_one_neutrino_proxy_init_takes() {
    let init = proxy_source("init/mod.rs");
    let args_struct = &init[init.find("pub struct InitArgs").expect("InitArgs")..];
    let args_struct = &args_struct[..args_struct.find("\n}").expect("end of InitArgs")];
    let all = Overrides {
        skip_inbound_ports: vec![22],
        skip_outbound_ports: vec![5432],
        include_inbound_ports: Select::Only(vec!["8080".into()]),
        include_outbound_cidrs: Select::Only(vec!["10.0.0.0/8".into()]),
        skip_outbound_cidrs: vec!["169.254.169.254/32".into()],
        ..Overrides::default()
    };
    let args = containers::init_args(&all);
    assert_eq!(args[0], "init");
    assert!(proxy_source("main.rs").contains("Init(neutrino_proxy::init::InitArgs)"), "the init subcommand moved");
    let flags: Vec<&String> = args.iter().filter(|a| a.starts_with("--")).collect();
    assert_eq!(flags.len(), 6, "{args:?}");
    for flag in flags {
        let field = format!("pub {}:", flag.trim_start_matches("--").replace('-', "_"));
        assert!(args_struct.contains(&field), "neutrino-proxy init has no {flag} (no `{field}` in InitArgs)");
    }
}

/// Set by the injector for what comes next (locality), not read by the proxy yet.
const NOT_READ_YET: [&str; 2] = ["NEUTRINO_POD_IP", "NEUTRINO_NODE_NAME"];

/// Every `NEUTRINO_*` variable of the proxy container under `cfg`.
fn neutrino_env(cfg: &InjectConfig) -> Vec<String> {
    let proxy = containers::proxy_container(cfg, &Overrides::default()).expect("container");
    let env = proxy["env"].as_array().expect("env").iter().filter_map(|e| e["name"].as_str());
    env.filter(|n| n.starts_with("NEUTRINO_")).map(String::from).collect()
}

#[test]
fn every_neutrino_variable_is_one_the_proxy_reads() {
    let main = proxy_source("main.rs");
    let reads = |name: &str| main.contains(&format!("env = \"{name}\""));
    let everything = InjectConfig {
        trust_anchors_pem: Some(include_str!("testdata/anchor-1.pem").into()),
        trust_domain: "mesh.example".into(),
        otlp_endpoint: Some("http://jaeger:4317".into()),
        ..InjectConfig::default()
    };
    let (plain, all) = (neutrino_env(&InjectConfig::default()), neutrino_env(&everything));
    for name in &all {
        assert!(
            reads(name) || NOT_READ_YET.contains(&name.as_str()),
            "the injector sets {name}, which proxy/src/main.rs does not read (no `env = \"{name}\"`)"
        );
    }
    for name in NOT_READ_YET {
        assert!(!reads(name), "the proxy reads {name} now: take it out of NOT_READ_YET");
        assert!(plain.iter().any(|n| n == name), "{name} is no longer set");
    }
    let added: Vec<&String> = all.iter().filter(|n| !plain.contains(n)).collect();
    assert_eq!(added, ["NEUTRINO_CA_PEM", "NEUTRINO_TRUST_DOMAIN"], "what trust anchors add");
    assert_eq!(containers::CA_PEM_ENV, "NEUTRINO_CA_PEM");
    assert_eq!(containers::TRUST_DOMAIN_ENV, "NEUTRINO_TRUST_DOMAIN");
    // The proxy refuses both ways of giving anchors at once: only the PEM text is set.
    assert!(!all.iter().any(|n| n == "NEUTRINO_CA_FILE"));
}

#[test]
fn the_defaults_are_the_proxys_and_the_control_planes() {
    let main = proxy_source("main.rs");
    let default = format!("env = \"NEUTRINO_CONTROL_PLANE\", default_value = \"{}\"", config::DEFAULT_CONTROL_PLANE);
    assert!(main.contains(&default), "the proxy's default control plane is not {}", config::DEFAULT_CONTROL_PLANE);
    let domain = format!("env = \"NEUTRINO_TRUST_DOMAIN\", default_value = \"{}\"", config::DEFAULT_TRUST_DOMAIN);
    assert!(main.contains(&domain), "the proxy's default trust domain is not {}", config::DEFAULT_TRUST_DOMAIN);
    let cp = control_plane_source("lib.rs");
    let port = |addr: &str| addr.rsplit_once(':').map(|(_, p)| p.to_string()).expect("HOST:PORT");
    assert!(cp.contains(&format!("pub const GRPC_PORT: u16 = {};", port(config::DEFAULT_CONTROL_PLANE))));
    assert!(cp.contains(&format!("pub const TLS_GRPC_PORT: u16 = {};", port(config::DEFAULT_TLS_CONTROL_PLANE))));
    let token = control_plane_source("identity/token.rs");
    let audience = format!("pub const DEFAULT_AUDIENCE: &str = \"{}\";", config::DEFAULT_TOKEN_AUDIENCE);
    assert!(
        token.contains(&audience),
        "the mesh CA checks another token audience than {}",
        config::DEFAULT_TOKEN_AUDIENCE
    );
}

#[test]
fn the_otlp_endpoint_variable_is_the_one_the_proxy_exports_to() {
    // The proxy's exporter is the shared OTLP pipeline (`otel/`), which reads the variable.
    let otel = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../otel/src/lib.rs")).expect("otel");
    assert!(otel.contains(&format!("var(\"{}\")", containers::OTLP_ENDPOINT_ENV)), "the proxy no longer reads it");
    let trace = proxy_source("telemetry/trace.rs");
    assert!(
        trace.contains("neutrino_otel::resource(") && trace.contains("\"neutrino-proxy\","),
        "the default service name moved"
    );
    let cfg = InjectConfig {
        otlp_endpoint: Some("http://jaeger.neutrino-system.svc:4317".into()),
        ..InjectConfig::default()
    };
    let proxy = containers::proxy_container(&cfg, &Overrides::default()).expect("container");
    let env = proxy["env"].as_array().expect("env");
    let otlp: Vec<_> = env.iter().filter(|e| e["name"] == containers::OTLP_ENDPOINT_ENV).collect();
    assert_eq!(otlp.len(), 1);
    assert_eq!(otlp[0]["value"], "http://jaeger.neutrino-system.svc:4317");
}
