//! Watch step for Kubernetes, the IO half: kube-rs watchers (list, then watch with
//! bookmarks; a new list after 410 Gone; reconnects with exponential backoff, 0.8 s
//! doubling to 30 s) keep reflector stores of Services, EndpointSlices, Pods and
//! Namespaces, plus one watch per ConfigMap that a Service's `neutrino.io/openapi`
//! annotation names; documents named by a path are fetched over HTTP from one of the
//! Service's ready endpoints; `AuthorizationPolicy` objects (`kube_policy`) are
//! watched like the four kinds, and the view waits for them too (a mesh published
//! without its policies would be open). On every change the whole view is rebuilt by the pure
//! [`kube_translate::translate`] and sent as [`SourceEvent::Updated`] when it differs.
//! It must not decide what objects mean (that is `kube_translate`), nor translate,
//! version or push anything (index and serve do).
//!
//! Before every watch has listed once, errors are sent as [`SourceEvent::Failed`] (so
//! `/ready` says why); afterwards they are logged and the last view stays published
//! while the watcher recovers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as make_watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::SourceEvent;
use super::kube_policy::AuthorizationPolicy;
use super::kube_translate::{self, ANNOTATION_OPENAPI, ConfigMapRead, Fetch, Objects};
use crate::model::{MeshState, SpecContent};

/// The least the control plane's ServiceAccount needs (a ClusterRole; bind it with a
/// ClusterRoleBinding). Watchers only list and watch; nothing is read with get.
pub const RBAC_RULES: &str = r#"rules:
- apiGroups: [""]
  resources: ["services", "pods", "namespaces", "configmaps"]
  verbs: ["list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
- apiGroups: ["policy.neutrino.io"]
  resources: ["authorizationpolicies"]
  verbs: ["list", "watch"]
"#;

/// Quiet time after a change before the view is rebuilt, so a burst (a rollout, a
/// relist) costs one rebuild.
const SETTLE: Duration = Duration::from_millis(20);
/// How long a view that names a document not read yet (its ConfigMap still being
/// listed, or its first fetch in flight) is held back, so that proxies do not first see
/// the service without its routes. After that it is sent without the document.
const HOLD: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum KubeError {
    #[error(
        "connecting to the Kubernetes API: {0}; set KUBECONFIG to a kubeconfig file, or run in a pod with a service account"
    )]
    Connect(#[source] kube::Error),
    #[error("watching {what}: {source}; {}", watch_hint(source))]
    Watch { what: String, source: watcher::Error },
    #[error(
        "fetching OpenAPI document {origin} from {url}: {why}; check the path in the {ANNOTATION_OPENAPI} annotation and that the service answers it"
    )]
    Fetch { origin: String, url: String, why: String },
}

fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    }
}

fn watch_hint(e: &watcher::Error) -> &'static str {
    match status_code(e) {
        Some(410) => "the watch fell too far behind (410 Gone): listing again",
        Some(404) => {
            "the API server does not know it: is its CustomResourceDefinition installed? (deploy/base, `neutrino install`); retrying with backoff"
        }
        Some(401 | 403) => {
            "the control plane's service account needs list and watch on it: apply the rules in watch::kube::RBAC_RULES"
        }
        _ => {
            "check that the API server is reachable and that the control plane's RBAC allows list and watch on it (watch::kube::RBAC_RULES); retrying with backoff"
        }
    }
}

#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Bound on one OpenAPI fetch, connect to last byte.
    pub fetch_timeout: Duration,
    /// Largest OpenAPI document fetched over HTTP.
    pub fetch_max_bytes: usize,
    /// Wait before fetching again after a failure.
    pub fetch_retry: Duration,
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            fetch_timeout: Duration::from_secs(5),
            fetch_max_bytes: 8 << 20,
            fetch_retry: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
pub struct KubeSource {
    settings: KubeSettings,
}

/// What the watch tasks tell the main loop: which watches have listed, and their
/// current errors. Every change also wakes `notify`.
#[derive(Debug, Default)]
struct Shared {
    notify: Notify,
    status: Mutex<WatchStatus>,
}

#[derive(Debug, Default, Clone)]
struct WatchStatus {
    synced: BTreeSet<String>,
    errors: BTreeMap<String, String>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut WatchStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
        self.notify.notify_one();
    }

    fn status(&self) -> WatchStatus {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Aborts the tasks it holds when dropped.
#[derive(Debug, Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

const SERVICES: &str = "services";
const SLICES: &str = "endpointslices";
const PODS: &str = "pods";
const NAMESPACES: &str = "namespaces";
const POLICIES: &str = "authorizationpolicies";
/// Every watch that must have listed before a view is published.
const REQUIRED: [&str; 5] = [SERVICES, SLICES, PODS, NAMESPACES, POLICIES];

impl KubeSource {
    pub fn new(settings: KubeSettings) -> Self {
        KubeSource { settings }
    }

    /// Runs until the receiver is gone. The client comes from KUBECONFIG (or
    /// ~/.kube/config), else from the pod's service account.
    pub async fn run(self, events: mpsc::Sender<SourceEvent>) {
        // kube's TLS uses the process-wide rustls provider: ring, as everywhere in the
        // workspace (an error means one is installed already, which is fine).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut delay = Duration::from_millis(500);
        let client = loop {
            match Client::try_default().await {
                Ok(c) => break c,
                Err(e) => {
                    let why = KubeError::Connect(e).to_string();
                    tracing::warn!("{why}");
                    if events.send(SourceEvent::Failed(why)).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = events.closed() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        };
        self.run_with(client, events).await;
    }

    /// Runs with a given client until the receiver is gone.
    pub async fn run_with(self, client: Client, events: mpsc::Sender<SourceEvent>) {
        let shared = Arc::new(Shared::default());
        let mut tasks = Tasks::default();
        let (services, t) =
            spawn_watch(Api::<Service>::all(client.clone()), None, SERVICES.into(), &shared, strip_service);
        tasks.0.push(t);
        let (slices, t) =
            spawn_watch(Api::<EndpointSlice>::all(client.clone()), None, SLICES.into(), &shared, strip_meta);
        tasks.0.push(t);
        let (pods, t) = spawn_watch(Api::<Pod>::all(client.clone()), None, PODS.into(), &shared, strip_pod);
        tasks.0.push(t);
        let (namespaces, t) =
            spawn_watch(Api::<Namespace>::all(client.clone()), None, NAMESPACES.into(), &shared, strip_namespace);
        tasks.0.push(t);
        let (policies, t) =
            spawn_watch(Api::<AuthorizationPolicy>::all(client.clone()), None, POLICIES.into(), &shared, strip_meta);
        tasks.0.push(t);
        let mut configmaps: BTreeMap<String, (Store<ConfigMap>, Tasks)> = BTreeMap::new();
        let mut fetcher = Fetcher::new(self.settings, Arc::clone(&shared));

        let mut last_sent: Option<MeshState> = None;
        let mut last_failed: Option<String> = None;
        let mut logged: BTreeSet<String> = BTreeSet::new();
        let mut hold_until: Option<Instant> = None;
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                () = shared.notify.notified() => {}
                () = tokio::time::sleep_until(fetcher.next_retry()) => {}
                () = tokio::time::sleep_until(hold_until.unwrap_or(far)) => {}
                () = events.closed() => return,
            }
            tokio::time::sleep(SETTLE).await;
            let status = shared.status();
            let synced = REQUIRED.iter().all(|k| status.synced.contains(*k));
            if !synced {
                let why = status.errors.values().next().cloned();
                if let Some(why) = why.filter(|w| last_failed.as_ref() != Some(w)) {
                    last_failed = Some(why.clone());
                    if events.send(SourceEvent::Failed(why)).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            // Log each distinct error and problem once while it lasts.
            let mut now_logged = BTreeSet::new();
            for why in status.errors.values() {
                if !logged.contains(why) {
                    tracing::warn!("{why} (retrying; the last view stays published)");
                }
                now_logged.insert(why.clone());
            }

            let cm_reads: BTreeMap<String, ConfigMapRead> = configmaps
                .iter()
                .map(|(key, (store, _))| {
                    let read = match status.synced.contains(&cm_watch_name(key)) {
                        true => ConfigMapRead::Read(store.state().into_iter().next()),
                        false => ConfigMapRead::Pending,
                    };
                    (key.clone(), read)
                })
                .collect();
            let fetched = fetcher.documents();
            let (svc, sl, po, ns) = (services.state(), slices.state(), pods.state(), namespaces.state());
            let pol = policies.state();
            let t = kube_translate::translate(Objects {
                services: &svc,
                slices: &sl,
                pods: &po,
                namespaces: &ns,
                configmaps: Some(&cm_reads),
                fetched: Some(&fetched),
                policies: &pol,
            });

            let wanted: BTreeSet<String> = t.configmaps.iter().map(|(ns, name)| format!("{ns}/{name}")).collect();
            configmaps.retain(|key, _| {
                let keep = wanted.contains(key);
                if !keep {
                    let name = cm_watch_name(key);
                    shared.update(|s| {
                        s.synced.remove(&name);
                        s.errors.remove(&name);
                    });
                }
                keep
            });
            for (ns, name) in &t.configmaps {
                let key = format!("{ns}/{name}");
                let watch_name = cm_watch_name(&key);
                configmaps.entry(key).or_insert_with(|| {
                    let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
                    let fields = format!("metadata.name={name}");
                    let (store, task) = spawn_watch(api, Some(fields), watch_name, &shared, strip_meta);
                    (store, Tasks(vec![task]))
                });
            }
            fetcher.reconcile(&t.fetches);

            for p in &t.problems {
                let p = p.to_string();
                if !logged.contains(&p) {
                    tracing::warn!("{p}");
                }
                now_logged.insert(p);
            }
            logged = now_logged;

            let unread_configmap = t.configmaps.iter().any(|(ns, name)| {
                let w = cm_watch_name(&format!("{ns}/{name}"));
                !status.synced.contains(&w) && !status.errors.contains_key(&w)
            });
            if unread_configmap || fetcher.first_fetch_in_flight() {
                let until = *hold_until.get_or_insert_with(|| Instant::now() + HOLD);
                if Instant::now() < until {
                    continue;
                }
            }
            hold_until = None;

            if last_sent.as_ref() != Some(&t.mesh) {
                tracing::debug!(services = t.mesh.services.len(), "kubernetes view changed");
                last_sent = Some(t.mesh.clone());
                last_failed = None;
                if events.send(SourceEvent::Updated(t.mesh)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn cm_watch_name(key: &str) -> String {
    format!("configmap {key}")
}

/// Starts a watcher feeding a reflector store; the task reports to `shared`.
fn spawn_watch<K>(
    api: Api<K>,
    fields: Option<String>,
    name: String,
    shared: &Arc<Shared>,
    strip: fn(&mut K),
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let mut config = watcher::Config::default().any_semantic();
    if let Some(f) = &fields {
        config = config.fields(f);
    }
    let stream = make_watcher(api, config).map_ok(move |e| e.modify(strip)).default_backoff().reflect(writer);
    let shared = Arc::clone(shared);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(Event::Init | Event::InitApply(_)) => {}
                Ok(Event::InitDone) => {
                    tracing::debug!("{name}: listed");
                    shared.update(|s| {
                        s.synced.insert(name.clone());
                        s.errors.remove(&name);
                    });
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => shared.update(|s| {
                    s.errors.remove(&name);
                }),
                Err(source) if status_code(&source) == Some(410) => {
                    // Routine: the watcher lists again by itself.
                    tracing::info!("{}", KubeError::Watch { what: name.clone(), source });
                }
                Err(source) => {
                    let why = KubeError::Watch { what: name.clone(), source }.to_string();
                    tracing::debug!("{why}");
                    shared.update(|s| {
                        s.errors.insert(name.clone(), why);
                    });
                }
            }
        }
    });
    (store, task)
}

/// Keeps only what translation reads: large fields (managed fields, last-applied
/// annotations, pod specs) would otherwise fill the stores.
fn strip_meta<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

fn strip_service(s: &mut Service) {
    s.metadata.managed_fields = None;
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.retain(|k, _| k.starts_with("neutrino.io/"));
    }
    s.status = None;
}

fn strip_namespace(n: &mut Namespace) {
    strip_meta(n);
    n.spec = None;
    n.status = None;
}

fn strip_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    if let Some(a) = p.metadata.annotations.as_mut() {
        a.retain(|k, _| k.starts_with("neutrino.io/"));
    }
    p.status = None;
    // Containers keep their names (the proxy's marks a meshed pod) and resources; init
    // containers only their names (the native sidecar is one).
    p.spec = p.spec.take().map(|spec| PodSpec {
        containers: spec
            .containers
            .into_iter()
            .map(|c| Container { name: c.name, resources: c.resources, ..Default::default() })
            .collect(),
        init_containers: spec
            .init_containers
            .map(|cs| cs.into_iter().map(|c| Container { name: c.name, ..Default::default() }).collect()),
        resources: spec.resources,
        service_account_name: spec.service_account_name,
        ..Default::default()
    });
}

/// OpenAPI documents served by the services themselves, fetched in the background.
#[derive(Debug)]
struct Fetcher {
    settings: KubeSettings,
    shared: Arc<Shared>,
    http: reqwest::Client,
    entries: Arc<Mutex<BTreeMap<String, FetchEntry>>>,
    tasks: BTreeMap<String, JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct FetchEntry {
    /// Where the current content came from.
    from: Option<SocketAddr>,
    content: Option<SpecContent>,
    in_flight: bool,
    attempts: usize,
    retry_at: Option<Instant>,
}

impl Fetcher {
    fn new(settings: KubeSettings, shared: Arc<Shared>) -> Self {
        // Building a plain-HTTP client cannot fail short of a broken system; fall back
        // to the defaults, which differ only in the timeout (enforced below as well).
        let http = reqwest::Client::builder()
            .timeout(settings.fetch_timeout)
            .no_proxy()
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Fetcher { settings, shared, http, entries: Arc::default(), tasks: BTreeMap::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FetchEntry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn documents(&self) -> BTreeMap<String, SpecContent> {
        self.lock().iter().filter_map(|(k, e)| e.content.clone().map(|c| (k.clone(), c))).collect()
    }

    fn first_fetch_in_flight(&self) -> bool {
        self.lock().values().any(|e| e.in_flight && e.content.is_none())
    }

    fn next_retry(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        self.lock().values().filter(|e| !e.in_flight).filter_map(|e| e.retry_at).min().unwrap_or(far)
    }

    /// Starts the fetches that are due: never fetched, the endpoint it came from is no
    /// longer ready, or a failure's retry time has come. Forgets documents no longer named.
    fn reconcile(&mut self, fetches: &[Fetch]) {
        let wanted: BTreeSet<&str> = fetches.iter().map(|f| f.origin.as_str()).collect();
        self.tasks.retain(|origin, task| {
            let keep = wanted.contains(origin.as_str()) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        let now = Instant::now();
        let mut start = Vec::new();
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.retain(|origin, _| wanted.contains(origin.as_str()));
            for f in fetches {
                let e = entries.entry(f.origin.clone()).or_default();
                if e.in_flight {
                    continue;
                }
                if f.candidates.is_empty() {
                    // Nothing to ask; retried as soon as an endpoint is ready again.
                    e.retry_at = None;
                    continue;
                }
                let moved = e.from.is_some_and(|a| !f.candidates.contains(&a));
                let failed = e.content.as_ref().is_some_and(Result::is_err);
                let due = e.content.is_none() || moved || (failed && e.retry_at.is_none_or(|t| t <= now));
                if !due {
                    continue;
                }
                let addr = f.candidates[e.attempts % f.candidates.len()];
                e.in_flight = true;
                e.retry_at = None;
                start.push((f.origin.clone(), f.path.clone(), addr));
            }
        }
        for (origin, path, addr) in start {
            let url = format!("http://{addr}{path}");
            let (http, settings, entries, shared) =
                (self.http.clone(), self.settings.clone(), Arc::clone(&self.entries), Arc::clone(&self.shared));
            let key = origin.clone();
            let task = tokio::spawn(async move {
                let got = fetch(&http, &url, &settings).await;
                let mut entries = entries.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(e) = entries.get_mut(&origin) {
                    e.in_flight = false;
                    e.from = Some(addr);
                    match got {
                        Ok(bytes) => {
                            e.attempts = 0;
                            e.content = Some(Ok(Arc::from(bytes)));
                        }
                        Err(why) => {
                            e.attempts += 1;
                            e.retry_at = Some(Instant::now() + settings.fetch_retry);
                            e.content = Some(Err(KubeError::Fetch { origin: origin.clone(), url, why }.to_string()));
                        }
                    }
                }
                drop(entries);
                shared.notify.notify_one();
            });
            self.tasks.insert(key, task);
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.tasks.values().for_each(JoinHandle::abort);
    }
}

async fn fetch(http: &reqwest::Client, url: &str, settings: &KubeSettings) -> Result<Vec<u8>, String> {
    let max = settings.fetch_max_bytes;
    let read = async {
        let mut resp = http.get(url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP status {}", resp.status()));
        }
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(format!("larger than {max} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > max {
                return Err(format!("larger than {max} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(settings.fetch_timeout, read)
        .await
        .unwrap_or_else(|_| Err(format!("no complete answer within {:?}", settings.fetch_timeout)))
}
