//! The endpoints of one service as selection sees them: addresses, capacities,
//! sampling weights, and each endpoint's live load (this proxy's in-flight cost plus
//! the last pushed report).
//!
//! Load counters are atomics owned by one `EndpointLoad` per endpoint that outlives
//! config snapshots, so a config push never resets what is in flight. Requests add
//! their cost when chosen and take it back when their response ends (`InFlight` drop).
//! Nothing here blocks or locks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Candidate, Choice, DIMS, NoFit, Weights};

/// Live load of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    in_flight: [AtomicU64; DIMS],
    /// Load the backend last reported, in capacity units (Capacity lane; 0 = none).
    reported: [AtomicU64; DIMS],
    requests_in_flight: AtomicU64,
}

impl EndpointLoad {
    pub fn used(&self) -> [u64; DIMS] {
        std::array::from_fn(|d| {
            self.in_flight[d].load(Ordering::Relaxed).saturating_add(self.reported[d].load(Ordering::Relaxed))
        })
    }

    pub fn in_flight(&self) -> [u64; DIMS] {
        std::array::from_fn(|d| self.in_flight[d].load(Ordering::Relaxed))
    }

    pub fn requests_in_flight(&self) -> u64 {
        self.requests_in_flight.load(Ordering::Relaxed)
    }

    pub fn set_reported(&self, used: [u64; DIMS]) {
        for (slot, v) in self.reported.iter().zip(used) {
            slot.store(v, Ordering::Relaxed);
        }
    }
}

/// Holds a request's cost on its endpoint until dropped (when the response ends or
/// the request fails).
#[derive(Debug)]
pub struct InFlight {
    load: Arc<EndpointLoad>,
    cost: [u64; DIMS],
}

impl InFlight {
    pub fn new(load: Arc<EndpointLoad>, cost: [u64; DIMS]) -> Self {
        for (slot, c) in load.in_flight.iter().zip(cost) {
            slot.fetch_add(c, Ordering::Relaxed);
        }
        load.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { load, cost }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for (slot, c) in self.load.in_flight.iter().zip(self.cost) {
            slot.fetch_sub(c, Ordering::Relaxed);
        }
        self.load.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub capacity: [u64; DIMS],
    pub ready: bool,
    pub pod: Arc<str>,
    pub zone: Arc<str>,
    pub load: Arc<EndpointLoad>,
}

/// A service's endpoints, compiled once per `Endpoints` version.
#[derive(Debug, Clone, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    weights: Weights,
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        let weights = Weights::new(endpoints.iter().map(|e| e.capacity));
        EndpointSet { endpoints, weights }
    }

    /// Chooses an endpoint for a request costing `cost`, with the thread's fast RNG.
    pub fn pick(&self, cost: &[u64; DIMS]) -> Result<Choice, NoFit> {
        super::pick(
            &self.weights,
            cost,
            |i| {
                let e = &self.endpoints[i];
                Candidate { capacity: e.capacity, used: e.load.used(), eligible: e.ready }
            },
            rand::random::<u64>,
        )
    }
}
