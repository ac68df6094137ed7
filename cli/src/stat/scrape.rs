//! Where `neutrino stat` and `neutrino top` read from: proxies' admin ports given by
//! address (the local demo), or every meshed pod of a cluster, reached through the API
//! server's pod proxy (`/api/v1/namespaces/NS/pods/NAME:15020/proxy/metrics`), the path
//! `kubectl get --raw` takes, so no port-forward and no network route to pods is needed.
//!
//! This is the IO half of the views: it fetches and parses, and must not compute rates
//! (that is `stat.rs`) nor change anything in the cluster (it lists pods and GETs
//! `/metrics`). Which pods carry a proxy is decided by [`meshed`], a pure function.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use neutrino_injector::{PROXY_ADMIN_PORT, PROXY_CONTAINER};
use prometheus_parse::{Sample, Scrape};

/// One scrape per proxy, keyed by the proxy's name (its address, or `namespace/pod`),
/// so rates are computed only over proxies seen in both of two scrapes.
pub type Scrapes = BTreeMap<String, Vec<Sample>>;

/// How long one proxy's `/metrics`, or the pod list, may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Pods scraped at once through the API server.
const CONCURRENCY: usize = 16;
/// The name the injector gives the proxy's admin port (`injector/src/containers.rs`).
const ADMIN_PORT_NAME: &str = "neutrino-admin";

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("scraping {url}: {source}; is a proxy's admin port there (see --proxy)?")]
    Direct { url: String, source: reqwest::Error },
    #[error("{what} is not Prometheus text exposition: {source}")]
    Parse { what: String, source: std::io::Error },
    #[error("no Kubernetes client configuration: {0}; check KUBECONFIG and the current context (kubectl cluster-info)")]
    Client(kube::Error),
    #[error("listing pods{scope}: {reason}; check KUBECONFIG, the namespace and that you may list pods")]
    List { scope: String, reason: String },
    #[error("{ns}/{pod}: {reason} (through the API server's pod proxy; you need get on pods/proxy)")]
    Pod { ns: String, pod: String, reason: String },
}

/// The proxies to read.
pub enum Targets {
    /// Admin addresses (host:port), each one required.
    Direct(Vec<String>),
    /// Every meshed pod in `namespace` (all namespaces when None) matching `selector`;
    /// a pod that cannot be read is skipped with a warning.
    Cluster { client: Client, namespace: Option<String>, selector: Option<String> },
}

impl Targets {
    /// The cluster of KUBECONFIG (or the pod's service account).
    pub async fn cluster(namespace: Option<String>, selector: Option<String>) -> Result<Self, ScrapeError> {
        let client = Client::try_default().await.map_err(ScrapeError::Client)?;
        Ok(Targets::Cluster { client, namespace, selector })
    }
}

/// A meshed pod's proxy, reached through the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTarget {
    pub namespace: String,
    pub name: String,
    pub admin_port: u16,
}

impl PodTarget {
    pub fn metrics_path(&self) -> String {
        format!("/api/v1/namespaces/{}/pods/{}:{}/proxy/metrics", self.namespace, self.name, self.admin_port)
    }
}

/// The running pods that carry the proxy (a native sidecar in `initContainers`, or a
/// plain container), with its admin port: the port named `neutrino-admin`, else 15020.
pub fn meshed(pods: &[Pod]) -> Vec<PodTarget> {
    let mut out: Vec<PodTarget> = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| {
            let spec = p.spec.as_ref()?;
            let proxy = spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .find(|c| c.name == PROXY_CONTAINER)?;
            let named = proxy.ports.iter().flatten().find(|port| port.name.as_deref() == Some(ADMIN_PORT_NAME));
            Some(PodTarget {
                namespace: p.metadata.namespace.clone()?,
                name: p.metadata.name.clone()?,
                admin_port: named.and_then(|port| u16::try_from(port.container_port).ok()).unwrap_or(PROXY_ADMIN_PORT),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

fn parse(what: &str, text: &str) -> Result<Vec<Sample>, ScrapeError> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map(|s| s.samples)
        .map_err(|source| ScrapeError::Parse { what: what.to_string(), source })
}

/// Reads one proxy's `/metrics` at its admin address (host:port).
pub async fn direct(admin: &str) -> Result<Vec<Sample>, ScrapeError> {
    let url = format!("http://{admin}/metrics");
    let fetch =
        async { reqwest::Client::new().get(&url).timeout(TIMEOUT).send().await?.error_for_status()?.text().await };
    let text = fetch.await.map_err(|source| ScrapeError::Direct { url: url.clone(), source })?;
    parse(&url, &text)
}

async fn through_api(client: &Client, pod: &PodTarget) -> Result<Vec<Sample>, ScrapeError> {
    let failed = |reason: String| ScrapeError::Pod { ns: pod.namespace.clone(), pod: pod.name.clone(), reason };
    let request = http::Request::get(pod.metrics_path()).body(Vec::new()).map_err(|e| failed(e.to_string()))?;
    let text = match tokio::time::timeout(TIMEOUT, client.request_text(request)).await {
        Ok(r) => r.map_err(|e| failed(e.to_string()))?,
        Err(_) => return Err(failed(format!("no answer within {} s", TIMEOUT.as_secs()))),
    };
    parse(&format!("{}/{}", pod.namespace, pod.name), &text).map_err(|e| failed(e.to_string()))
}

/// What one round of scraping got: the scrapes, and what was skipped (cluster only).
#[derive(Default)]
pub struct Round {
    pub scrapes: Scrapes,
    pub skipped: Vec<ScrapeError>,
    /// Meshed pods found (cluster only).
    pub pods: usize,
}

/// Scrapes every target once. Direct targets must all answer; in a cluster the pods are
/// listed again each round (pods come and go), and a pod that does not answer is
/// skipped and reported, because one terminating pod must not hide the others.
pub async fn round(targets: &Targets) -> Result<Round, ScrapeError> {
    match targets {
        Targets::Direct(admins) => {
            let mut out = Round::default();
            for admin in admins {
                out.scrapes.insert(admin.clone(), direct(admin).await?);
            }
            Ok(out)
        }
        Targets::Cluster { client, namespace, selector } => {
            let api: Api<Pod> = match namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let params = selector.as_deref().map_or_else(ListParams::default, |s| ListParams::default().labels(s));
            let scope = namespace.as_deref().map_or_else(|| " in all namespaces".into(), |ns| format!(" in {ns}"));
            let pods = match tokio::time::timeout(TIMEOUT, api.list(&params)).await {
                Ok(Ok(list)) => list.items,
                Ok(Err(e)) => return Err(ScrapeError::List { scope, reason: e.to_string() }),
                Err(_) => return Err(ScrapeError::List { scope, reason: "no answer within 5 s".into() }),
            };
            let targets = meshed(&pods);
            let mut out = Round { pods: targets.len(), ..Round::default() };
            let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
            let mut tasks = tokio::task::JoinSet::new();
            for pod in targets {
                let (client, permits) = (client.clone(), Arc::clone(&permits));
                tasks.spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    let got = through_api(&client, &pod).await;
                    (format!("{}/{}", pod.namespace, pod.name), got)
                });
            }
            while let Some(done) = tasks.join_next().await {
                let Ok((name, got)) = done else { continue };
                match got {
                    Ok(samples) => {
                        out.scrapes.insert(name, samples);
                    }
                    Err(e) => out.skipped.push(e),
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, phase: &str, init: serde_json::Value, containers: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"initContainers": init, "containers": containers},
            "status": {"phase": phase},
        }))
        .expect("a pod")
    }

    #[test]
    fn only_running_pods_with_the_proxy_are_read_on_its_admin_port() {
        let app = json!([{"name": "app", "image": "app:1"}]);
        let sidecar = json!([{"name": "neutrino-init", "image": "i"}, {"name": "neutrino-proxy", "image": "p",
            "restartPolicy": "Always", "ports": [{"name": "neutrino-admin", "containerPort": 15999}]}]);
        let plain = json!([{"name": "app", "image": "app:1"}, {"name": "neutrino-proxy", "image": "p"}]);
        let pods = [
            pod("shop", "web-1", "Running", sidecar.clone(), app.clone()),
            pod("shop", "plain-0", "Running", json!([]), app.clone()),
            pod("shop", "pending-0", "Pending", sidecar, app),
            pod("bank", "old-0", "Running", json!([]), plain),
        ];
        let got = meshed(&pods);
        assert_eq!(
            got,
            vec![
                PodTarget { namespace: "bank".into(), name: "old-0".into(), admin_port: 15020 },
                PodTarget { namespace: "shop".into(), name: "web-1".into(), admin_port: 15999 },
            ]
        );
        assert_eq!(got[1].metrics_path(), "/api/v1/namespaces/shop/pods/web-1:15999/proxy/metrics");
    }
}
