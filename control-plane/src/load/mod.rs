//! Load: the single writer of the capacity lane.
//!
//! Proxies report their own pod's load on their discovery streams (out of band); with
//! Redis, other replicas' reports arrive through `share`. This task keeps the newest
//! report per pod and, every tick (250 ms by default), translates them into `Capacity`
//! resources. Versions are content hashes, so a snapshot is published only when some
//! service's loads changed, and streams send only those services: pushes are coalesced
//! to the tick and carry deltas. It runs apart from the index, on its own lane, so a
//! flood of reports never delays a config push. It must not talk to proxies or read
//! discovery sources.

pub mod share;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use crate::metrics::{Metrics, OriginLabel};
use crate::model::{LoadReport, MeshState, Reports};
use crate::translate::{self, REPORT_TTL_MS, Snapshot};

#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// How often the capacity lane may publish (coalescing window).
    pub interval: Duration,
    /// Share reports with other replicas through this Redis, if set.
    pub redis: Option<share::ShareSettings>,
}

impl Default for LoadSettings {
    fn default() -> Self {
        LoadSettings { interval: Duration::from_millis(250), redis: None }
    }
}

/// One pod's report, and where it came from.
#[derive(Debug, Clone)]
pub struct PodReport {
    /// "<namespace>/<pod>".
    pub pod: String,
    pub report: LoadReport,
    /// True when a proxy connected to this replica sent it.
    pub local: bool,
}

/// The streams' handle: never blocks; a full queue drops the report (the next one, a
/// quarter second later, replaces it anyway).
#[derive(Debug, Clone)]
pub struct ReportSink {
    tx: mpsc::Sender<PodReport>,
    metrics: Arc<Metrics>,
}

impl ReportSink {
    pub fn report(&self, pod: String, report: LoadReport) {
        let origin = OriginLabel { origin: "stream" };
        if self.tx.try_send(PodReport { pod, report, local: true }).is_err() {
            self.metrics.load_reports_dropped.inc();
        } else {
            self.metrics.load_reports.get_or_create(&origin).inc();
        }
    }
}

/// What `/ready` and `/config_dump` say about load sharing.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ShareStatus {
    /// "off" (no Redis configured), "connected" or "degraded".
    pub state: String,
    pub last_error: Option<String>,
    /// Pods with a report held, from any replica.
    pub pods: usize,
}

/// The capacity lane and the handles into it.
#[derive(Debug)]
pub struct Started {
    pub capacity: watch::Receiver<Arc<Snapshot>>,
    pub sink: ReportSink,
    pub status: Arc<ArcSwap<ShareStatus>>,
}

/// Starts the aggregator (and the Redis sharing, if configured).
pub fn spawn(mesh: watch::Receiver<Option<Arc<MeshState>>>, settings: LoadSettings, metrics: Arc<Metrics>) -> Started {
    let (capacity_tx, capacity) = watch::channel(Arc::new(Snapshot::default()));
    let (tx, rx) = mpsc::channel(4096);
    let state = if settings.redis.is_some() { "degraded" } else { "off" };
    let status = Arc::new(ArcSwap::from_pointee(ShareStatus { state: state.into(), ..Default::default() }));
    let share = settings.redis.map(|s| share::spawn(s, tx.clone(), Arc::clone(&status), Arc::clone(&metrics)));
    let sink = ReportSink { tx, metrics: Arc::clone(&metrics) };
    let task =
        Aggregator { mesh, capacity_tx, rx, share, status: Arc::clone(&status), metrics, reports: Reports::new() };
    tokio::spawn(task.run(settings.interval));
    Started { capacity, sink, status }
}

struct Aggregator {
    mesh: watch::Receiver<Option<Arc<MeshState>>>,
    capacity_tx: watch::Sender<Arc<Snapshot>>,
    rx: mpsc::Receiver<PodReport>,
    share: Option<share::Share>,
    status: Arc<ArcSwap<ShareStatus>>,
    metrics: Arc<Metrics>,
    reports: Reports,
}

/// Keeps `report` unless a report measured later is already held; true when kept.
pub fn merge(reports: &mut Reports, pod: String, report: LoadReport) -> bool {
    match reports.get(&pod) {
        Some(held) if held.measured_at_ms >= report.measured_at_ms => false,
        _ => {
            reports.insert(pod, report);
            true
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Aggregator {
    async fn run(mut self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut generation = 0u64;
        let mut dirty = false;
        loop {
            tokio::select! {
                got = self.rx.recv() => {
                    let Some(r) = got else { return };
                    if r.local && let Some(share) = &self.share {
                        share.publish(&r.pod, r.report);
                    }
                    dirty |= merge(&mut self.reports, r.pod, r.report);
                }
                changed = self.mesh.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    dirty = true;
                    // The first view goes out at once: it is what makes streams ready.
                    if generation == 0 {
                        self.publish(&mut generation);
                        dirty = false;
                    }
                }
                _ = tick.tick() => {
                    // Held reports age even when none arrive: look again while any are held.
                    if dirty || !self.reports.is_empty() {
                        self.publish(&mut generation);
                        dirty = false;
                    }
                }
            }
        }
    }

    fn publish(&mut self, generation: &mut u64) {
        let Some(mesh) = self.mesh.borrow().clone() else { return };
        let now = wall_ms();
        self.reports.retain(|_, r| now.saturating_sub(r.measured_at_ms) < REPORT_TTL_MS);
        let by_type = translate::capacity(&mesh, &self.reports, now);
        let next = *generation + 1;
        let snapshot = Snapshot::succeed(&self.capacity_tx.borrow(), next, by_type.clone())
            .or_else(|| (*generation == 0).then(|| Snapshot { generation: next, by_type, ..Default::default() }));
        if let Some(s) = snapshot {
            *generation = next;
            self.metrics.capacity_published.inc();
            self.capacity_tx.send_replace(Arc::new(s));
        }
        let pods = self.reports.len();
        if self.status.load().pods != pods {
            let mut s = ShareStatus::clone(&self.status.load());
            s.pods = pods;
            self.status.store(Arc::new(s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_measurement_wins() {
        let mut r = Reports::new();
        let at = |t| LoadReport { in_flight: [t, 0, 0], measured_at_ms: t };
        assert!(merge(&mut r, "ns/a".into(), at(10)));
        assert!(!merge(&mut r, "ns/a".into(), at(5)), "an older report from another replica");
        assert!(!merge(&mut r, "ns/a".into(), at(10)), "the same one, echoed");
        assert!(merge(&mut r, "ns/a".into(), at(11)));
        assert_eq!(r["ns/a"].in_flight[0], 11);
    }
}
