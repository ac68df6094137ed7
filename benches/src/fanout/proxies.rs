//! The in-process proxies: connecting them, waiting until they are synced, timing a change.

use super::*;

pub(crate) fn connect(grpc_addr: &SocketAddr, i: usize) -> Handles {
    neutrino_proxy::start_config(
        ConfigSource::Stream(StreamSettings {
            control_plane: grpc_addr.to_string(),
            node: Node { id: format!("bench-{i}"), namespace: NAMESPACE.into(), ..Default::default() },
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            trust: None,
        }),
        None,
    )
}

/// Ready, and holding every service's resources of every type.
pub(crate) fn synced(s: &Snapshot, services: usize) -> bool {
    s.is_ready()
        && [type_url::SERVICE, type_url::ENDPOINTS, type_url::CAPACITY]
            .iter()
            .all(|t| s.resources(t).map_or(0, |m| m.len()) == services)
}

/// True once the snapshot's `Endpoints` for the changed service carries the new capacity.
pub(crate) fn has_change(s: &Snapshot, c: &Change) -> bool {
    let Some(r) = s.resources(type_url::ENDPOINTS).and_then(|m| m.get(&c.service)) else { return false };
    let Some(Body::Endpoints(eps)) = &r.body else { return false };
    eps.endpoints
        .iter()
        .any(|e| e.address == c.address && e.port == c.port && e.capacity.is_some_and(|v| v.cpu_millis == c.cpu_millis))
}

/// Resolves at the first published snapshot (after `rx` was created) that satisfies
/// `done`, with the instant it was seen.
pub(crate) async fn first_snapshot(
    store: Arc<ConfigStore>,
    mut rx: watch::Receiver<u64>,
    done: impl Fn(&Snapshot) -> bool,
) -> Instant {
    loop {
        if done(&store.load()) {
            return Instant::now();
        }
        if rx.changed().await.is_err() {
            // The store (and its sender) outlives this task; nothing more will come.
            std::future::pending::<()>().await;
        }
    }
}

pub(crate) async fn wait_synced(
    batch: &[Handles],
    first_index: usize,
    services: usize,
    cp: &ControlPlane,
    args: &Args,
    progress: &Progress,
) -> Result<()> {
    let mut set = JoinSet::new();
    for h in batch {
        let rx = h.store.subscribe();
        set.spawn(first_snapshot(Arc::clone(&h.store), rx, move |s| synced(s, services)));
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut last_note = Instant::now();
    while !set.is_empty() {
        match tokio::time::timeout(Duration::from_secs(5), set.join_next()).await {
            Ok(Some(joined)) => {
                joined.context("a sync waiter panicked")?;
            }
            Ok(None) => break,
            Err(_) => {
                cp.check_alive()?;
                if Instant::now() >= deadline {
                    set.abort_all();
                    return Err(stuck(batch, first_index, cp, "the initial sync", args.timeout_secs));
                }
                if last_note.elapsed() >= Duration::from_secs(5) {
                    last_note = Instant::now();
                    progress.say(format!(
                        "    waiting: {} of proxies {}..{} not synced yet",
                        set.len(),
                        first_index,
                        first_index + batch.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Makes `change` and returns, per proxy, the time from the rename until the proxy
/// published a snapshot holding it.
pub(crate) async fn measure_change(
    mesh: &mut MeshFile,
    change: &Change,
    proxies: &[Handles],
    cp: &ControlPlane,
    args: &Args,
) -> Result<Vec<Duration>> {
    let staged = mesh.stage().await?;
    let mut set = JoinSet::new();
    for (i, h) in proxies.iter().enumerate() {
        // Subscribed before the rename, so no publish can be missed.
        let rx = h.store.subscribe();
        let c = change.clone();
        let store = Arc::clone(&h.store);
        set.spawn(async move { (i, first_snapshot(store, rx, move |s| has_change(s, &c)).await) });
    }
    // Let the waiters make their first check (the change is not there yet) before t0.
    // One that has not run by then only reports later than the truth, never earlier.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    staged.commit()?;
    let deadline = tokio::time::Instant::from_std(t0 + Duration::from_secs(args.timeout_secs));
    let mut latencies = Vec::with_capacity(proxies.len());
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(joined)) => {
                let (_, seen) = joined.context("a change waiter panicked")?;
                latencies.push(seen.saturating_duration_since(t0));
            }
            Ok(None) => break,
            Err(_) => {
                set.abort_all();
                cp.check_alive()?;
                let what = format!("change of {} endpoint {}", change.service, change.endpoint);
                return Err(stuck(proxies, 0, cp, &what, args.timeout_secs));
            }
        }
    }
    Ok(latencies)
}

/// The size of what a proxy received on connecting, per type: resources and encoded KiB
/// (the `DiscoveryResponse` that carried them is a few bytes per resource larger).
pub(crate) fn response_sizes(s: &Snapshot) -> String {
    let mut out = Vec::new();
    for t in [type_url::SERVICE, type_url::ENDPOINTS, type_url::CAPACITY] {
        let map = s.resources(t).map(|m| m.values().collect::<Vec<_>>()).unwrap_or_default();
        let bytes: usize = map.iter().map(|r| r.encoded_len()).sum();
        out.push(format!("{} {} ({:.0} KiB)", map.len(), type_url::short(t), bytes as f64 / 1024.0));
    }
    out.join(", ")
}

/// Explains why proxies did not get something in time, naming EMFILE when that is it.
pub(crate) fn stuck(
    proxies: &[Handles],
    first_index: usize,
    cp: &ControlPlane,
    what: &str,
    secs: u64,
) -> anyhow::Error {
    let mut states: HashMap<String, usize> = HashMap::new();
    let mut sample = None;
    for (i, h) in proxies.iter().enumerate() {
        let st = h.stream.load();
        *states.entry(st.state.clone()).or_default() += 1;
        if sample.is_none()
            && let Some(e) = &st.last_error
        {
            sample = Some(format!("bench-{}: {e}", first_index + i));
        }
    }
    let mut msg = format!("{what} did not reach every proxy within {secs} s; stream states {states:?}");
    if let Some(s) = sample {
        let _ = write!(msg, "; e.g. {s}");
    }
    let _ = write!(msg, "; control plane: {}", cp.diagnose());
    for (who, pid) in [("this benchmark", std::process::id()), ("the control plane", cp.pid())] {
        if let (Ok(open), Ok(Some(limit))) = (open_files(pid), open_files_limit_of(pid))
            && open + 16 >= limit
        {
            let _ = write!(
                msg,
                "; {who} has {open} files open of a limit of {limit}: it hit EMFILE (too many open files); \
                 raise the limit with `ulimit -n 65536` (benches/run-fanout.sh does) or use fewer --proxies"
            );
        }
    }
    anyhow!(msg)
}
