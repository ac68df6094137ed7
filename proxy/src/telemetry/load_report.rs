//! Load report: the out-of-band half of reporting this pod's load (the in-band half is
//! the `x-neutrino-load` header, in `forward::inbound`).
//!
//! Every 250 ms it samples the cost all callers have in flight on this pod (as the
//! inbound side counts it) and, when that changed by a significant share of the pod's
//! capacity or a second has passed, hands a report to the discovery stream, which sends
//! it to the control plane. The heartbeat matters as much as the changes: a steady
//! load, idle included, must stay known rather than expire. It must not block the data
//! path or send anything itself: it only publishes the latest report.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use neutrino_proto as pb;
use tokio::sync::watch;

use crate::forward::inbound::PodLoad;
use crate::route::Mesh;
use crate::select::DIMS;

/// How often the pod's load is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The longest gap between two reports.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A change of at least this share of capacity (parts per million) is reported at the
/// next sample.
pub const SIGNIFICANT_PPM: u64 = 10_000;

/// The last report sent: what it said and when (ms on any monotonic clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub in_flight: [u64; DIMS],
    pub at_ms: u64,
}

/// Whether a report is due at `now_ms` with `in_flight` on a pod of `capacity`.
pub fn due(last: Option<&Sent>, in_flight: &[u64; DIMS], capacity: &[u64; DIMS], now_ms: u64) -> bool {
    let Some(last) = last else { return true };
    if now_ms.saturating_sub(last.at_ms) >= HEARTBEAT.as_millis() as u64 {
        return true;
    }
    (0..DIMS).any(|d| {
        let change = in_flight[d].abs_diff(last.in_flight[d]);
        match capacity[d] {
            // A resource the pod does not have: any change at all is news.
            0 => change > 0,
            cap => u128::from(change) * 1_000_000 >= u128::from(SIGNIFICANT_PPM) * u128::from(cap),
        }
    })
}

/// Starts sampling. The receiver holds the latest report due (None until the pod's
/// capacity is known from config: until then the control plane could not use it).
pub fn spawn(pod_load: Arc<PodLoad>, mesh: Arc<ArcSwap<Mesh>>, pod: String) -> watch::Receiver<Option<pb::LoadReport>> {
    let (tx, rx) = watch::channel(None);
    if pod.is_empty() {
        // A proxy that does not know its pod cannot be matched to an endpoint.
        return rx;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<Sent> = None;
        let start = std::time::Instant::now();
        loop {
            tick.tick().await;
            let Some(capacity) = mesh.load().capacity_of_pod(&pod) else { continue };
            let in_flight = pod_load.in_flight();
            let now_ms = start.elapsed().as_millis() as u64;
            if !due(last.as_ref(), &in_flight, &capacity, now_ms) {
                continue;
            }
            last = Some(Sent { in_flight, at_ms: now_ms });
            let report = pb::LoadReport {
                in_flight: Some(pb::ResourceVector {
                    cpu_millis: in_flight[0],
                    memory_bytes: in_flight[1],
                    gpu: in_flight[2],
                }),
                measured_at_ms: wall_ms(),
            };
            if tx.send(Some(report)).is_err() {
                return;
            }
        }
    });
    rx
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: [u64; DIMS] = [1000, 1 << 30, 0];

    #[test]
    fn first_report_is_always_due() {
        assert!(due(None, &[0; DIMS], &CAP, 0));
    }

    #[test]
    fn small_changes_wait_for_the_heartbeat() {
        let last = Sent { in_flight: [100, 0, 0], at_ms: 1_000 };
        assert!(!due(Some(&last), &[105, 0, 0], &CAP, 1_250), "0.5 % of capacity");
        assert!(due(Some(&last), &[110, 0, 0], &CAP, 1_250), "1 % of capacity");
        assert!(due(Some(&last), &[90, 0, 0], &CAP, 1_250), "down counts too");
        assert!(due(Some(&last), &[100, 0, 0], &CAP, 2_000), "unchanged, but a second passed");
        assert!(!due(Some(&last), &[100, 0, 0], &CAP, 1_999));
    }

    #[test]
    fn a_resource_without_capacity_reports_any_change() {
        let last = Sent { in_flight: [0, 0, 0], at_ms: 0 };
        assert!(due(Some(&last), &[0, 0, 1], &CAP, 10));
    }
}
