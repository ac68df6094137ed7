//! Step 3, containers: the JSON of what is added to a pod, from the config and the pod's
//! overrides: the init container (`neutrino-proxy init`), the proxy container and the
//! projected token volume.
//!
//! The flags and environment match what `neutrino-proxy` reads (`proxy/src/main.rs`,
//! `proxy/src/init/mod.rs`); the injector's tests parse the init arguments with the
//! proxy's own flag parser. This module must not decide whether or where to inject, nor
//! read the pod beyond what it is handed: that is [`crate::patch`].

use serde_json::{Value, json};

use crate::config::{InjectConfig, SidecarMode};
use crate::overrides::{self, AnnotationError, Overrides, Select};
use crate::{INIT_CONTAINER, PROXY_ADMIN_PORT, PROXY_CONTAINER, PROXY_UID, TOKEN_MOUNT_PATH, TOKEN_VOLUME};

/// The variable the proxy reads its OTLP collector from (`proxy/src/telemetry/trace.rs`);
/// the service name it then reports defaults to `neutrino-proxy`.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The variable the proxy reads its trust anchors from, as PEM text (`proxy/src/main.rs`).
pub const CA_PEM_ENV: &str = "NEUTRINO_CA_PEM";
/// The variable the proxy reads its SPIFFE trust domain from (`proxy/src/main.rs`).
pub const TRUST_DOMAIN_ENV: &str = "NEUTRINO_TRUST_DOMAIN";

/// The file name of the token inside [`TOKEN_MOUNT_PATH`].
pub const TOKEN_FILE: &str = "token";

/// The arguments of the init container: `init` and its flags (`neutrino-proxy init --help`).
/// The proxy UID is always passed, so the rules exempt exactly the UID the proxy runs as.
pub fn init_args(o: &Overrides) -> Vec<String> {
    let mut args = vec!["init".to_string(), "--proxy-uid".to_string(), PROXY_UID.to_string()];
    let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let mut flag = |name: &str, value: String| {
        args.push(format!("--{name}"));
        args.push(value);
    };
    if let Select::Only(ports) = &o.include_inbound_ports {
        flag("inbound-include-ports", ports.join(","));
    }
    if !o.skip_inbound_ports.is_empty() {
        flag("inbound-exclude-ports", join(&o.skip_inbound_ports));
    }
    if !o.skip_outbound_ports.is_empty() {
        flag("outbound-exclude-ports", join(&o.skip_outbound_ports));
    }
    if let Select::Only(cidrs) = &o.include_outbound_cidrs {
        flag("outbound-include-cidrs", cidrs.join(","));
    }
    if !o.skip_outbound_cidrs.is_empty() {
        flag("outbound-exclude-cidrs", o.skip_outbound_cidrs.join(","));
    }
    args
}

/// The init container: installs the nat rules, as root with only NET_ADMIN and NET_RAW.
/// Its root filesystem stays writable: iptables takes its lock in `/run/xtables.lock`.
pub fn init_container(cfg: &InjectConfig, o: &Overrides) -> Value {
    let mut c = json!({
        "name": INIT_CONTAINER,
        "image": cfg.init_image,
        "args": init_args(o),
        "resources": {
            "requests": {"cpu": "10m", "memory": "10Mi"},
            "limits": {"cpu": "100m", "memory": "50Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": false,
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
    });
    if let Some(policy) = &cfg.image_pull_policy {
        c["imagePullPolicy"] = json!(policy);
    }
    c
}

/// The proxy's requests and limits: the config's, with the pod's overrides; a request
/// above its limit is an error naming the annotation that made it so.
pub fn proxy_resources(cfg: &InjectConfig, o: &Overrides) -> Result<Value, AnnotationError> {
    let r = &cfg.resources;
    let pick = |over: &Option<String>, default: &str| over.clone().unwrap_or_else(|| default.to_string());
    let cpu = (pick(&o.cpu_request, &r.cpu_request), pick(&o.cpu_limit, &r.cpu_limit));
    let memory = (pick(&o.memory_request, &r.memory_request), pick(&o.memory_limit, &r.memory_limit));
    let checks = [
        (&cpu, o.cpu_request.is_some(), overrides::PROXY_CPU_REQUEST, overrides::PROXY_CPU_LIMIT),
        (&memory, o.memory_request.is_some(), overrides::PROXY_MEMORY_REQUEST, overrides::PROXY_MEMORY_LIMIT),
    ];
    for ((request, limit), request_overridden, request_key, limit_key) in checks {
        if overrides::quantity(request).ok() > overrides::quantity(limit).ok() {
            let (annotation, value) = if request_overridden { (request_key, request) } else { (limit_key, limit) };
            return Err(AnnotationError {
                annotation: annotation.to_string(),
                value: value.clone(),
                reason: format!(
                    "leaves the proxy's request {request} above its limit {limit} (Kubernetes refuses that); \
                     set {request_key} and {limit_key} together"
                ),
            });
        }
    }
    Ok(json!({
        "requests": {"cpu": cpu.0, "memory": memory.0},
        "limits": {"cpu": cpu.1, "memory": memory.1},
    }))
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}})
}

fn ready_probe(period: u32, failures: u32) -> Value {
    json!({
        "httpGet": {"path": "/ready", "port": PROXY_ADMIN_PORT},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    })
}

/// The proxy container. Native mode: an init container with `restartPolicy: Always` and a
/// startup probe on `/ready` (kubelet starts the next container only once it passes).
/// Legacy mode: a regular container whose `postStart` hook waits for `/ready`.
pub fn proxy_container(cfg: &InjectConfig, o: &Overrides) -> Result<Value, AnnotationError> {
    let log = o.log_level.clone().unwrap_or_else(|| cfg.log_level.clone());
    let mut c = json!({
        "name": PROXY_CONTAINER,
        "image": cfg.proxy_image,
        "env": [
            field_env("NEUTRINO_POD_NAME", "metadata.name"),
            field_env("NEUTRINO_POD_NAMESPACE", "metadata.namespace"),
            field_env("NEUTRINO_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field_env("NEUTRINO_POD_IP", "status.podIP"),
            field_env("NEUTRINO_NODE_NAME", "spec.nodeName"),
            {"name": "NEUTRINO_CONTROL_PLANE", "value": cfg.control_plane},
            {"name": "NEUTRINO_LOG", "value": log},
            {"name": "NEUTRINO_TOKEN_FILE", "value": format!("{TOKEN_MOUNT_PATH}/{TOKEN_FILE}")},
        ],
        "ports": [{"name": "neutrino-admin", "containerPort": PROXY_ADMIN_PORT, "protocol": "TCP"}],
        "readinessProbe": ready_probe(2, 3),
        "resources": proxy_resources(cfg, o)?,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": true}],
    });
    match cfg.sidecar_mode {
        SidecarMode::Native => {
            c["restartPolicy"] = json!("Always");
            // Up to 10 minutes to first config, checked every second.
            c["startupProbe"] = ready_probe(1, 600);
        }
        SidecarMode::Legacy => {
            let timeout = cfg.ready_timeout_secs.to_string();
            c["lifecycle"] = json!({"postStart": {"exec": {"command": [
                "neutrino-proxy", "wait-ready", "--admin-addr", format!("127.0.0.1:{PROXY_ADMIN_PORT}"),
                "--timeout-secs", timeout,
            ]}}});
        }
    }
    // Appended only when set, so pods without mesh identity or traces get the same
    // container as before.
    if let (Some(pem), Some(env)) = (&cfg.trust_anchors_pem, c["env"].as_array_mut()) {
        env.push(json!({"name": CA_PEM_ENV, "value": pem}));
        env.push(json!({"name": TRUST_DOMAIN_ENV, "value": cfg.trust_domain}));
    }
    let otlp = o.otlp_endpoint.as_ref().or(cfg.otlp_endpoint.as_ref()).filter(|u| !u.is_empty());
    if let (Some(url), Some(env)) = (otlp, c["env"].as_array_mut()) {
        env.push(json!({"name": OTLP_ENDPOINT_ENV, "value": url}));
    }
    if let Some(policy) = &cfg.image_pull_policy {
        c["imagePullPolicy"] = json!(policy);
    }
    Ok(c)
}

/// The projected service-account token the proxy will present to the mesh CA (issue 7).
pub fn token_volume(cfg: &InjectConfig) -> Value {
    json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": cfg.token_audience,
            "expirationSeconds": cfg.token_expiration_seconds,
            "path": TOKEN_FILE,
        }}]},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_args_carry_every_override() {
        assert_eq!(init_args(&Overrides::default()), ["init", "--proxy-uid", "1337"]);
        let o = Overrides {
            skip_inbound_ports: vec![22, 9090],
            skip_outbound_ports: vec![5432],
            include_inbound_ports: Select::Only(vec![]),
            include_outbound_cidrs: Select::Only(vec!["10.0.0.0/8".into()]),
            skip_outbound_cidrs: vec!["169.254.169.254/32".into()],
            ..Overrides::default()
        };
        assert_eq!(
            init_args(&o).join(" "),
            "init --proxy-uid 1337 --inbound-include-ports  --inbound-exclude-ports 22,9090 \
             --outbound-exclude-ports 5432 --outbound-include-cidrs 10.0.0.0/8 \
             --outbound-exclude-cidrs 169.254.169.254/32"
        );
    }

    #[test]
    fn resources_take_overrides_and_refuse_request_above_limit() {
        let cfg = InjectConfig::default();
        let r = proxy_resources(&cfg, &Overrides::default()).expect("defaults");
        assert_eq!(r["requests"]["cpu"], "10m");
        assert_eq!(r["limits"]["memory"], "128Mi");
        let o = Overrides { memory_request: Some("256Mi".into()), ..Overrides::default() };
        let e = proxy_resources(&cfg, &o).expect_err("request above default limit");
        assert_eq!(e.annotation, overrides::PROXY_MEMORY_REQUEST);
        assert!(e.to_string().contains("above its limit 128Mi"), "{e}");
        let o = Overrides { cpu_limit: Some("5m".into()), ..Overrides::default() };
        assert_eq!(proxy_resources(&cfg, &o).expect_err("limit below request").annotation, overrides::PROXY_CPU_LIMIT);
        let o = Overrides {
            memory_request: Some("256Mi".into()),
            memory_limit: Some("1Gi".into()),
            ..Overrides::default()
        };
        assert_eq!(proxy_resources(&cfg, &o).expect("both")["limits"]["memory"], "1Gi");
    }

    #[test]
    fn the_proxy_runs_as_the_exempt_uid_locked_down() {
        let c = proxy_container(&InjectConfig::default(), &Overrides::default()).expect("container");
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsUser"], PROXY_UID);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(c["restartPolicy"], "Always");
        assert_eq!(c["startupProbe"]["httpGet"]["port"], 15020);
        let legacy = InjectConfig { sidecar_mode: SidecarMode::Legacy, ..InjectConfig::default() };
        let c = proxy_container(&legacy, &Overrides::default()).expect("container");
        assert!(c.get("restartPolicy").is_none() && c.get("startupProbe").is_none());
        assert_eq!(c["lifecycle"]["postStart"]["exec"]["command"][1], "wait-ready");
    }

    #[test]
    fn the_otlp_endpoint_comes_from_the_config_unless_the_pod_overrides_it() {
        let otlp = |c: &Value| {
            c["env"]
                .as_array()
                .expect("env")
                .iter()
                .find(|e| e["name"] == OTLP_ENDPOINT_ENV)
                .map(|e| e["value"].clone())
        };
        let none = proxy_container(&InjectConfig::default(), &Overrides::default()).expect("container");
        assert_eq!(otlp(&none), None);
        let cfg = InjectConfig { otlp_endpoint: Some("http://jaeger:4317".into()), ..InjectConfig::default() };
        let c = proxy_container(&cfg, &Overrides::default()).expect("container");
        assert_eq!(otlp(&c), Some(json!("http://jaeger:4317")));
        assert_eq!(c["env"].as_array().map(Vec::len), none["env"].as_array().map(|e| e.len() + 1), "only appended");
        let o = Overrides { otlp_endpoint: Some("https://otel:4317".into()), ..Overrides::default() };
        assert_eq!(otlp(&proxy_container(&cfg, &o).expect("container")), Some(json!("https://otel:4317")));
        assert_eq!(
            otlp(&proxy_container(&InjectConfig::default(), &o).expect("container")),
            Some(json!("https://otel:4317"))
        );
        let off = Overrides { otlp_endpoint: Some(String::new()), ..Overrides::default() };
        assert_eq!(otlp(&proxy_container(&cfg, &off).expect("container")), None);
    }

    #[test]
    fn trust_anchors_add_the_pem_and_the_trust_domain_and_nothing_else() {
        let env = |c: &Value| c["env"].as_array().expect("env").clone();
        let plain = proxy_container(&InjectConfig::default(), &Overrides::default()).expect("container");
        assert!(!env(&plain).iter().any(|e| e["name"] == CA_PEM_ENV || e["name"] == TRUST_DOMAIN_ENV));
        let cfg = InjectConfig {
            trust_anchors_pem: Some("PEM".into()),
            trust_domain: "mesh.example".into(),
            otlp_endpoint: Some("http://jaeger:4317".into()),
            ..InjectConfig::default()
        };
        let c = proxy_container(&cfg, &Overrides::default()).expect("container");
        let mut expected = env(&plain);
        expected.push(json!({"name": "NEUTRINO_CA_PEM", "value": "PEM"}));
        expected.push(json!({"name": "NEUTRINO_TRUST_DOMAIN", "value": "mesh.example"}));
        expected.push(json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://jaeger:4317"}));
        assert_eq!(env(&c), expected);
        let (mut a, mut b) = (c.clone(), plain.clone());
        a["env"] = json!([]);
        b["env"] = json!([]);
        assert_eq!(a, b, "only the environment differs");
    }

    #[test]
    fn the_init_container_has_only_the_two_network_capabilities() {
        let c = init_container(&InjectConfig::default(), &Overrides::default());
        let sc = &c["securityContext"];
        assert_eq!(sc["capabilities"], json!({"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}));
        assert_eq!((sc["runAsUser"].clone(), sc["runAsNonRoot"].clone()), (json!(0), json!(false)));
    }
}
