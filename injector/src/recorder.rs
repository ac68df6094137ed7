//! Step 8c, the event recorder (feature `server`): sends the [`Event`]s reviews ask for to
//! the Kubernetes API, off the admission path.
//!
//! [`Recorder::record`] never waits: it puts the Event on a bounded queue with
//! `try_send`; when the queue is full the Event is dropped and counted. One task takes
//! Events from the queue and creates them (`events.k8s.io/v1`, `POST
//! /apis/events.k8s.io/v1/namespaces/NS/events`) one at a time, each within
//! [`POST_TIMEOUT`]. A failure is counted and logged once (a warning), then only counted
//! until an Event is created again; it never touches a review. On shutdown the queue is
//! closed and what is in it is sent, for up to the deadline given to [`Task::finish`].
//!
//! This module must not decide what to record (that is [`crate::review`] and
//! [`crate::event`]) and must never be awaited by a review.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::event::Event;

/// Events waiting to be sent; past this, new ones are dropped (and counted).
pub const DEFAULT_QUEUE: usize = 256;
/// One create call's deadline.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the recorder did, since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events the API server accepted.
    pub recorded: AtomicU64,
    /// Events whose create call failed or timed out.
    pub failed: AtomicU64,
    /// Events dropped because the queue was full (or closed).
    pub dropped: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub recorded: u64,
    pub failed: u64,
    pub dropped: u64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} recorded, {} failed, {} dropped", self.recorded, self.failed, self.dropped)
    }
}

/// The handle reviews use: cheap to clone; disabled, it records nothing.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: Option<mpsc::Sender<Event>>,
    stats: Arc<Stats>,
    /// Set at the first drop of an overflow, so it is logged once per overflow.
    overflowing: Arc<AtomicBool>,
}

/// The sending task, for a clean shutdown.
#[derive(Debug)]
pub struct Task {
    handle: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Recorder {
    /// A recorder that records nothing (`--events=false`, or no Kubernetes config).
    pub fn disabled() -> Recorder {
        Recorder { tx: None, stats: Arc::default(), overflowing: Arc::default() }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Starts the task that sends Events with `post(namespace, event_json)`, with a queue
    /// of `capacity` (at least 1). `instance` is the Events' `reportingInstance`.
    pub fn spawn<F, Fut>(capacity: usize, instance: String, post: F) -> (Recorder, Task)
    where
        F: FnMut(String, Value) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let handle = tokio::spawn(run(rx, stopped, instance, post, stats.clone()));
        (Recorder { tx: Some(tx), stats, overflowing: Arc::default() }, Task { handle, stop })
    }

    /// [`Recorder::spawn`] creating the Events with `client`.
    pub fn kube(client: kube::Client, instance: String, capacity: usize) -> (Recorder, Task) {
        Recorder::spawn(capacity, instance, move |namespace: String, event: Value| {
            let client = client.clone();
            async move {
                let event: K8sEvent = serde_json::from_value(event).map_err(|e| format!("encoding the Event: {e}"))?;
                let api: Api<K8sEvent> = Api::namespaced(client, &namespace);
                api.create(&PostParams::default(), &event).await.map(drop).map_err(|e| match &e {
                    kube::Error::Api(s) if s.code == 403 => format!(
                        "{e}; the injector's ServiceAccount needs create on events.k8s.io events \
                         (the ClusterRole neutrino-injector in deploy/base/rbac.yaml)"
                    ),
                    _ => e.to_string(),
                })
            }
        })
    }

    /// Queues an Event without waiting; a full queue drops it (counted, logged once per
    /// overflow).
    pub fn record(&self, event: Event) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(event) {
            Ok(()) => self.overflowing.store(false, Ordering::Relaxed),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                if !self.overflowing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the Event queue is full ({} waiting): dropping Events, counted, until it drains \
                         (the Kubernetes API is slow or down)",
                        tx.max_capacity()
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            recorded: self.stats.recorded.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
            dropped: self.stats.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Task {
    /// Stops taking Events, sends those queued for up to `deadline`, and ends the task;
    /// false if the deadline passed first (the rest is abandoned).
    pub async fn finish(self, deadline: Duration) -> bool {
        let _ = self.stop.send(true);
        let mut handle = self.handle;
        match tokio::time::timeout(deadline, &mut handle).await {
            Ok(_) => true,
            Err(_) => {
                handle.abort();
                false
            }
        }
    }
}

/// Now as a MicroTime string and a unique hex suffix for the Event's name.
fn now() -> (String, String) {
    let now = Timestamp::now();
    let time = serde_json::to_value(MicroTime(now)).ok().and_then(|v| v.as_str().map(str::to_string));
    (time.unwrap_or_else(|| now.to_string()), format!("{:x}", now.as_nanosecond()))
}

async fn run<F, Fut>(
    mut rx: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
    instance: String,
    mut post: F,
    stats: Arc<Stats>,
) where
    F: FnMut(String, Value) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut failing = false;
    let mut stopping = false;
    loop {
        let event = tokio::select! {
            event = rx.recv() => match event {
                Some(e) => e,
                None => break,
            },
            _ = stop.changed(), if !stopping => {
                // Take no more; what is queued is still sent, then recv ends.
                stopping = true;
                rx.close();
                continue;
            }
        };
        let (time, suffix) = now();
        let json = event.to_json(&instance, &time, &suffix);
        let result = match tokio::time::timeout(POST_TIMEOUT, post(event.namespace.clone(), json)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {POST_TIMEOUT:?}")),
        };
        match result {
            Ok(()) => {
                stats.recorded.fetch_add(1, Ordering::Relaxed);
                if failing {
                    tracing::info!("recording Events works again");
                    failing = false;
                }
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let what = format!("recording the Event {} in {}: {e}", event.reason, event.namespace);
                if failing {
                    tracing::debug!("{what}");
                } else {
                    tracing::warn!(
                        "{what}; reviews are answered as before; further failures are counted, not logged, until \
                         an Event is recorded again"
                    );
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::patch::SkipReason;

    fn event(name: &str) -> Event {
        Event::skipped(&json!({"metadata": {"name": name}}), "default", &SkipReason::HostNetwork)
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (entered_tx, mut entered) = mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        let gate = release.clone();
        let (recorder, task) = Recorder::spawn(1, "i".into(), move |_ns: String, body: Value| {
            let (entered_tx, gate) = (entered_tx.clone(), gate.clone());
            async move {
                let _ = entered_tx.send(body);
                gate.notified().await;
                Ok(())
            }
        });
        recorder.record(event("a"));
        let first = entered.recv().await.expect("the task takes the first Event");
        assert_eq!(first["regarding"]["name"], "a");
        assert_eq!(first["reportingInstance"], "i");
        recorder.record(event("b")); // queued: the task is busy with "a"
        recorder.record(event("c"));
        recorder.record(event("d"));
        assert_eq!(recorder.counts(), Counts { recorded: 0, failed: 0, dropped: 2 });
        release.notify_one();
        assert_eq!(entered.recv().await.expect("b")["regarding"]["name"], "b");
        release.notify_one();
        assert!(task.finish(Duration::from_secs(5)).await, "b is sent before the task ends");
        assert_eq!(recorder.counts(), Counts { recorded: 2, failed: 0, dropped: 2 });
        recorder.record(event("e"));
        assert_eq!(recorder.counts().dropped, 3, "closed: dropped, never waited on");
    }

    #[tokio::test]
    async fn failures_are_counted_and_the_queue_drained_on_finish() {
        let (recorder, task) =
            Recorder::spawn(8, "i".into(), |_ns: String, _body: Value| async { Err("connection refused".to_string()) });
        for name in ["a", "b", "c"] {
            recorder.record(event(name));
        }
        assert!(task.finish(Duration::from_secs(5)).await);
        assert_eq!(recorder.counts(), Counts { recorded: 0, failed: 3, dropped: 0 });
        let off = Recorder::disabled();
        off.record(event("x"));
        assert!(!off.is_enabled());
        assert_eq!(off.counts(), Counts::default());
    }

    #[test]
    fn the_event_json_is_a_k8s_openapi_event() {
        let (time, suffix) = now();
        let e: K8sEvent =
            serde_json::from_value(event("p").to_json("i", &time, &suffix)).expect("an events.k8s.io/v1 Event");
        assert_eq!(e.reason.as_deref(), Some("NeutrinoInjectionSkipped"));
        assert_eq!(e.regarding.and_then(|r| r.name).as_deref(), Some("p"));
        assert!(e.event_time.is_some() && time.ends_with('Z') && time.len() == 27, "{time}");
    }
}
