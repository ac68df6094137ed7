//! Who is connected and what each proxy has acknowledged, for `/config_dump` and
//! `neutrino check`. Written by stream tasks at push/ACK time (never per request of the
//! data path); read by the admin server.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use neutrino_proto::{ErrorDetail, Node, type_url};
use serde::Serialize;

#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, ProxyEntry>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyEntry {
    pub node_id: String,
    pub pod: String,
    pub namespace: String,
    pub service_account: String,
    pub zone: String,
    pub peer: String,
    pub connected_at_unix_ms: u64,
    /// Per resource kind (short type name).
    pub types: BTreeMap<String, TypeEntry>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeEntry {
    pub last_sent_nonce: String,
    pub last_sent_generation: u64,
    /// Generation of the last response the proxy ACKed.
    pub acked_generation: u64,
    pub resources_held: usize,
    pub last_nack: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Registry {
    fn with<F: FnOnce(&mut BTreeMap<u64, ProxyEntry>)>(&self, f: F) {
        // A panic while holding this lock would be a bug elsewhere; keep serving.
        let mut g = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    pub fn add(&self, node: Node, peer: String) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = ProxyEntry {
            node_id: node.id,
            pod: node.pod,
            namespace: node.namespace,
            service_account: node.service_account,
            zone: node.zone,
            peer,
            connected_at_unix_ms: now_ms(),
            types: BTreeMap::new(),
        };
        self.with(|m| {
            m.insert(id, entry);
        });
        id
    }

    pub fn remove(&self, id: u64) {
        self.with(|m| {
            m.remove(&id);
        });
    }

    fn with_type<F: FnOnce(&mut TypeEntry)>(&self, id: u64, type_url: &str, f: F) {
        self.with(|m| {
            if let Some(e) = m.get_mut(&id) {
                f(e.types.entry(type_url::short(type_url).to_string()).or_default());
            }
        });
    }

    pub fn sent(&self, id: u64, type_url: &str, nonce: &str, generation: u64, held: usize) {
        self.with_type(id, type_url, |t| {
            t.last_sent_nonce = nonce.to_string();
            t.last_sent_generation = generation;
            t.resources_held = held;
        });
    }

    pub fn ack(&self, id: u64, type_url: &str, nonce: &str) {
        self.with_type(id, type_url, |t| {
            if t.last_sent_nonce == nonce {
                t.acked_generation = t.last_sent_generation;
                t.last_nack = None;
            }
        });
    }

    pub fn nack(&self, id: u64, type_url: &str, nonce: &str, err: &ErrorDetail) {
        self.with_type(id, type_url, |t| {
            t.last_nack = Some(format!("nonce {nonce}: {} [{}]", err.message, err.reasons.join("; ")));
        });
    }

    pub fn list(&self) -> Vec<ProxyEntry> {
        let mut out = Vec::new();
        self.with(|m| out = m.values().cloned().collect());
        out
    }
}
