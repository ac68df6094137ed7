//! The injected containers speak the proxy's language: the init flags, the environment,
//! the UID and the admin port are checked against the proxy's own source
//! (`proxy/src/init/mod.rs`, `proxy/src/main.rs`, `proxy/src/lib.rs`), so a rename there
//! fails here instead of in a cluster. (Read as text: linking the proxy crate would tie
//! this crate's build to the proxy's.)

use std::path::Path;

use neutrino_injector::config::InjectConfig;
use neutrino_injector::containers;
use neutrino_injector::overrides::{Overrides, Select};
use neutrino_injector::{PROXY_ADMIN_PORT, PROXY_UID};

fn proxy_source(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy/src").join(file);
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

#[test]
fn the_environment_is_what_the_proxy_reads() {
    let main = proxy_source("main.rs");
    let proxy = containers::proxy_container(&InjectConfig::default(), &Overrides::default()).expect("container");
    let env: Vec<&str> = proxy["env"].as_array().expect("env").iter().filter_map(|e| e["name"].as_str()).collect();
    let unread: Vec<&str> = env.iter().copied().filter(|name| !main.contains(&format!("env = \"{name}\""))).collect();
    // Read by the proxy today: pod, namespace, service account, control plane, log.
    // Provided for what comes next (identity, issue 7; locality): these three.
    assert_eq!(unread, ["NEUTRINO_POD_IP", "NEUTRINO_NODE_NAME", "NEUTRINO_TOKEN_FILE"]);
}

#[test]
fn the_otlp_endpoint_variable_is_the_one_the_proxy_exports_to() {
    let trace = proxy_source("telemetry/trace.rs");
    assert!(trace.contains(&format!("var(\"{}\")", containers::OTLP_ENDPOINT_ENV)), "the proxy no longer reads it");
    assert!(trace.contains("with_service_name(\"neutrino-proxy\")"), "the default service name moved");
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
