//! One run of the discrete-event simulation: Poisson arrivals at the client proxies,
//! each request placed by its proxy's balancer, served by a processor-sharing backend,
//! answered (in-band load report included), retried or timed out; the control plane
//! samples every backend's load every 250 ms and pushes it to every proxy after a
//! delay; faults are injected on schedule. All in virtual time; nothing here sleeps or
//! reads a clock except to report how long the run took.
//!
//! It must not decide where requests go (that is `policies`, and for Neutrino the
//! proxy's own code) nor change what the proxy would do with an answer: it only tells
//! each balancer what its real counterpart would observe.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use neutrino_proxy::select::endpoints::{InFlight, REPORT_TTL};

use crate::events::{MS, Nanos, Queue, SEC, nanos_ceil, secs};
use crate::metrics::{self, RunMetrics};
use crate::model::{self, Backend, CLASSES, COST_ERROR, SERVICE_SIGMA};
use crate::policies::{Answer, Ask, Balancer, Pick, Policy};
use crate::rng::Rng;
use crate::scenarios::{COLD_START_SPEED, COLD_WARM_S, SLOW_FACTOR, Setup};

mod measure;

/// A request fails when it has no response this long after it arrived.
pub const TIMEOUT: Nanos = 2 * SEC;
/// A request that finds no room waits this long at most (the proxy's default
/// `--queue-timeout-ms`), then is refused with a 503.
pub const QUEUE_TIMEOUT: Nanos = 500 * MS;
/// Waiting requests look again at least this often (as the proxy does).
const QUEUE_TICK: Nanos = 50 * MS;
/// On each release of room, waiting requests re-pick until this many found none, and
/// every QUEUE_TICK until TICK_TRIES found none (those past their deadline always make
/// their last pick): bounds the cost of simulating the herd the proxy's
/// `notify_waiters` wakes, where every waiting request picks again.
const WAKE_TRIES: usize = 1;
const TICK_TRIES: usize = 8;
/// The fast-failing node's answer time.
const FAIL_FAST: Nanos = MS / 2;
/// The control plane samples backends' load this often...
const PUSH_EVERY: Nanos = 250 * MS;
/// ...and pushes it after `push_delay_s` plus up to this much jitter.
const PUSH_JITTER_S: f64 = 0.25;
/// Attempts per request, as the proxy (first try + 2 retries), under its retry budget.
const MAX_ATTEMPTS: u8 = 3;
const BUDGET_DEPOSIT: i64 = 200;
const BUDGET_COST: i64 = 1000;
const BUDGET_RESERVE: i64 = 10 * BUDGET_COST;
const BUDGET_CAP: i64 = 100 * BUDGET_COST;
/// Divert time: measured in bins of this length...
const DIVERT_BIN: Nanos = 500 * MS;
/// ...until the slowed nodes get less than this share of their capacity share...
const DIVERT_THRESHOLD: f64 = 0.5;
/// ...over this many bins together (2 s).
const DIVERT_HOLD: usize = 4;

#[derive(Debug)]
enum Ev {
    Arrival,
    Done { b: u32, generation: u64 },
    Reject { slot: u32, serial: u64 },
    Timeout { slot: u32, serial: u64 },
    Tick { client: u32 },
    Sample,
    Deliver { client: u32, measured: Nanos, totals: Arc<[u64]> },
    SlowDown,
    Speed { b: u32, speed: f64 },
    Learn { client: u32 },
}

#[derive(Debug)]
struct Req {
    serial: u64,
    client: u32,
    declared: u64,
    true_cost: f64,
    work: f64,
    arrived: Nanos,
    attempts: u8,
    at: Option<u32>,
    sent: Nanos,
    queue_deadline: Option<Nanos>,
    avoid: Option<usize>,
    hold: Option<InFlight>,
    measured: bool,
    in_inject: bool,
    class: u8,
    /// When it was first sent (0: not yet).
    first_sent: Nanos,
}

#[derive(Debug)]
struct Client {
    lb: Balancer,
    rng: Rng,
    waiting: VecDeque<(u32, u64)>,
    ticking: bool,
    budget: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Ok,
    Timeout,
    Refused,
    Upstream,
}

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    ok: u64,
    timeouts: u64,
    refused: u64,
    upstream: u64,
    retries: u64,
    good_work: f64,
    latency: Vec<f32>,
    /// Per operation class, for SIMULATE_DEBUG.
    class_latency: [Vec<f32>; 4],
    /// Time waiting for room at the proxy (ms), successful requests, for SIMULATE_DEBUG.
    waited: Vec<f32>,
    inject_latency: Vec<f32>,
    attempts: Vec<u64>,
    /// Declared cost sent to each backend in the window.
    sent_cost: Vec<u64>,
    /// Per divert bin: declared cost sent to the slowed nodes, and to all.
    divert_bins: Vec<(u64, u64)>,
    events: u64,
}

#[derive(Debug)]
struct Sim<'a> {
    s: &'a Setup,
    now: Nanos,
    end: Nanos,
    q: Queue<Ev>,
    backends: Vec<Backend>,
    clients: Vec<Client>,
    reqs: Vec<Option<Req>>,
    free: Vec<u32>,
    serial: u64,
    workload: Rng,
    infra: Rng,
    lambda: f64,
    window: (Nanos, Nanos),
    inject_window: Option<(Nanos, Nanos)>,
    slowed: Vec<bool>,
    t: Tally,
}

fn ns(s: f64) -> Nanos {
    nanos_ceil(s)
}

/// Runs one simulation to the end and measures it.
pub fn run(s: &Setup) -> RunMetrics {
    let started = Instant::now();
    let mut sim = Sim::new(s);
    sim.schedule_start();
    while let Some((at, ev)) = sim.q.pop() {
        if at > sim.end {
            break;
        }
        sim.now = at;
        sim.t.events += 1;
        sim.handle(ev);
    }
    let mut m = sim.measure();
    m.wall_s = started.elapsed().as_secs_f64();
    m
}

impl<'a> Sim<'a> {
    fn new(s: &'a Setup) -> Sim<'a> {
        let n = s.capacities.len();
        let window_s = s.window;
        let mut backends: Vec<Backend> = s.capacities.iter().map(|&c| Backend::new(c as f64, window_s)).collect();
        for &b in &s.slow_from_start {
            backends[b].set_speed(0.0, 1.0 / SLOW_FACTOR);
        }
        if let Some(f) = s.failing {
            backends[f].failing = true;
        }
        if s.join_at.is_some() {
            for b in &mut backends[s.initial..] {
                b.set_speed(0.0, COLD_START_SPEED);
            }
        }
        let clients = (0..s.clients)
            .map(|c| {
                let mut rng = Rng::new(s.seed, 1_000 + c as u64);
                let mut lb = Balancer::new(s.policy, &s.capacities, s.initial, &mut rng);
                if let Some(ttl) = s.report_ttl_ms {
                    lb.backdate_ms = (REPORT_TTL.as_millis() as u64).saturating_sub(ttl);
                }
                Client { lb, rng, waiting: VecDeque::new(), ticking: false, budget: BUDGET_RESERVE }
            })
            .collect();
        let mut slowed = vec![false; n];
        if let Some((_, which)) = &s.slow_mid {
            for &b in which {
                slowed[b] = true;
            }
        }
        let total: f64 = s.capacities.iter().map(|&c| c as f64).sum();
        Sim {
            s,
            now: 0,
            end: ns(s.duration_s),
            q: Queue::default(),
            backends,
            clients,
            reqs: Vec::new(),
            free: Vec::new(),
            serial: 0,
            workload: Rng::new(s.seed, 1),
            infra: Rng::new(s.seed, 2),
            lambda: model::arrival_rate(s.load, total),
            window: (ns(window_s.0), ns(window_s.1)),
            inject_window: s.inject_window.map(|(a, b)| (ns(a), ns(b))),
            slowed,
            t: Tally { attempts: vec![0; n], sent_cost: vec![0; n], ..Tally::default() },
        }
    }

    fn schedule_start(&mut self) {
        let first = ns(self.workload.exp(self.lambda));
        self.q.push(first, Ev::Arrival);
        if self.s.policy == Policy::Neutrino {
            self.q.push(0, Ev::Sample);
        }
        if let Some((at, _)) = &self.s.slow_mid {
            self.q.push(ns(*at), Ev::SlowDown);
        }
        if let Some(at) = self.s.join_at {
            for c in 0..self.clients.len() {
                let learn = at + self.infra.uniform(0.1, 0.6);
                self.q.push(ns(learn), Ev::Learn { client: c as u32 });
            }
            let steps = COLD_WARM_S as u64;
            for b in self.s.initial..self.backends.len() {
                for k in 1..=steps {
                    let speed = COLD_START_SPEED + (1.0 - COLD_START_SPEED) * k as f64 / steps as f64;
                    self.q.push(ns(at + k as f64), Ev::Speed { b: b as u32, speed });
                }
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrival => self.arrival(),
            Ev::Done { b, generation } => self.done(b as usize, generation),
            Ev::Reject { slot, serial } => self.rejected(slot, serial),
            Ev::Timeout { slot, serial } => self.timed_out(slot, serial),
            Ev::Tick { client } => {
                let c = client as usize;
                self.clients[c].ticking = false;
                self.try_waiters(c, TICK_TRIES, true);
                self.ensure_tick(c);
            }
            Ev::Sample => self.sample(),
            Ev::Deliver { client, measured, totals } => self.clients[client as usize].lb.pushed(&totals, measured),
            Ev::SlowDown => {
                let which = self.s.slow_mid.as_ref().map(|(_, w)| w.clone()).unwrap_or_default();
                for b in which {
                    self.backends[b].set_speed(secs(self.now), 1.0 / SLOW_FACTOR);
                    self.schedule_done(b);
                }
            }
            Ev::Speed { b, speed } => {
                self.backends[b as usize].set_speed(secs(self.now), speed);
                self.schedule_done(b as usize);
            }
            Ev::Learn { client } => self.clients[client as usize].lb.learn(self.s.capacities.len(), self.now),
        }
    }

    fn in_window(&self, t: Nanos) -> bool {
        t >= self.window.0 && t < self.window.1
    }

    fn alive(&self, slot: u32, serial: u64) -> bool {
        self.reqs.get(slot as usize).and_then(Option::as_ref).is_some_and(|r| r.serial == serial)
    }

    fn req(&mut self, slot: u32) -> &mut Req {
        self.reqs[slot as usize].as_mut().expect("a live request")
    }

    fn arrival(&mut self) {
        let gap = ns(self.workload.exp(self.lambda)).max(1);
        self.q.push(self.now + gap, Ev::Arrival);
        let client = self.workload.below(self.clients.len());
        let class_index = model::class_of(self.workload.unit());
        let class = CLASSES[class_index];
        let true_cost = class.declared as f64 * self.workload.uniform(1.0 - COST_ERROR, 1.0 + COST_ERROR);
        let work = self.workload.lognormal_mean(class.mean_s, SERVICE_SIGMA);
        self.serial += 1;
        let measured = self.in_window(self.now);
        let in_inject = self.inject_window.is_some_and(|(a, b)| self.now >= a && self.now < b);
        let req = Req {
            serial: self.serial,
            client: client as u32,
            declared: class.declared,
            true_cost,
            work,
            arrived: self.now,
            attempts: 0,
            at: None,
            sent: 0,
            queue_deadline: None,
            avoid: None,
            hold: None,
            measured,
            in_inject,
            class: class_index as u8,
            first_sent: 0,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.reqs[s as usize] = Some(req);
                s
            }
            None => {
                self.reqs.push(Some(req));
                (self.reqs.len() - 1) as u32
            }
        };
        self.q.push(self.now + TIMEOUT, Ev::Timeout { slot, serial: self.serial });
        let cl = &mut self.clients[client];
        cl.budget = (cl.budget + BUDGET_DEPOSIT).min(BUDGET_CAP);
        if measured {
            self.t.requests += 1;
        }
        self.place_or_wait(slot);
    }

    /// Places the request now, or queues it at its proxy to wait for room.
    fn place_or_wait(&mut self, slot: u32) {
        if !self.place(slot) {
            let (c, serial) = {
                let r = self.req(slot);
                (r.client as usize, r.serial)
            };
            self.clients[c].waiting.push_back((slot, serial));
            self.ensure_tick(c);
        }
    }

    /// Picks and sends; false when it must wait for room. A request refused for lack of
    /// room counts as placed (it is finished).
    fn place(&mut self, slot: u32) -> bool {
        let now = self.now;
        let r = self.reqs[slot as usize].as_ref().expect("a live request");
        let ask = Ask { declared: r.declared, true_cost: r.true_cost, avoid: r.avoid };
        let c = r.client as usize;
        let cl = &mut self.clients[c];
        if self.s.policy == Policy::NeutrinoExact {
            let totals: Vec<u64> = self.backends.iter().map(|b| b.declared_load).collect();
            cl.lb.pushed(&totals, now);
        }
        match cl.lb.pick(&ask, now, &self.backends, &mut cl.rng) {
            Pick::To(b) => {
                self.send(slot, b);
                true
            }
            Pick::NoRoom(nofit) => {
                let deadline = *self.req(slot).queue_deadline.get_or_insert(now + QUEUE_TIMEOUT);
                if nofit.too_big || nofit.eligible == 0 || now >= deadline {
                    self.finish(slot, End::Refused);
                    return true;
                }
                false
            }
        }
    }

    fn send(&mut self, slot: u32, b: usize) {
        let now = self.now;
        let r = self.reqs[slot as usize].as_mut().expect("a live request");
        r.attempts += 1;
        if r.first_sent == 0 {
            r.first_sent = now;
        }
        r.at = Some(b as u32);
        r.sent = now;
        r.queue_deadline = None;
        let (c, serial, work, true_cost, declared) = (r.client as usize, r.serial, r.work, r.true_cost, r.declared);
        r.hold = self.clients[c].lb.sent(b, declared);
        if self.in_window(now) {
            self.t.attempts[b] += 1;
            self.t.sent_cost[b] += declared;
        }
        if let Some((at, _)) = &self.s.slow_mid {
            let at = ns(*at);
            if now >= at && now < self.window.1 {
                let bin = ((now - at) / DIVERT_BIN) as usize;
                if self.t.divert_bins.len() <= bin {
                    self.t.divert_bins.resize(bin + 1, (0, 0));
                }
                self.t.divert_bins[bin].1 += declared;
                if self.slowed[b] {
                    self.t.divert_bins[bin].0 += declared;
                }
            }
        }
        if self.backends[b].failing {
            self.q.push(now + FAIL_FAST, Ev::Reject { slot, serial });
        } else {
            self.backends[b].start(secs(now), slot, serial, work, true_cost, declared);
            self.schedule_done(b);
        }
    }

    fn schedule_done(&mut self, b: usize) {
        if let Some(t) = self.backends[b].next_done() {
            let at = ns(t).max(self.now + 1);
            self.q.push(at, Ev::Done { b: b as u32, generation: self.backends[b].generation });
        }
    }

    fn done(&mut self, b: usize, generation: u64) {
        if self.backends[b].generation != generation {
            return;
        }
        self.backends[b].advance(secs(self.now));
        while let Some(job) = self.backends[b].pop_due() {
            let here = self.alive(job.slot, job.serial) && self.req(job.slot).at == Some(b as u32);
            if here {
                self.complete(job.slot, b);
            }
        }
        self.schedule_done(b);
    }

    /// A successful response from `b`.
    fn complete(&mut self, slot: u32, b: usize) {
        let now = self.now;
        let (c, true_cost, declared, sent) = {
            let r = self.req(slot);
            (r.client as usize, r.true_cost, r.declared, r.sent)
        };
        self.backends[b].stop(secs(now), true_cost, declared);
        let total = self.backends[b].declared_load;
        self.clients[c].lb.answered(b, Answer::Ok, now - sent, now, Some(total), declared);
        self.finish(slot, End::Ok);
        self.wake(c);
    }

    /// The fast-failing node's 503.
    fn rejected(&mut self, slot: u32, serial: u64) {
        if !self.alive(slot, serial) {
            return;
        }
        let now = self.now;
        let (c, b, declared, sent) = {
            let r = self.req(slot);
            let Some(b) = r.at else { return };
            (r.client as usize, b as usize, r.declared, r.sent)
        };
        let total = self.backends[b].declared_load;
        self.clients[c].lb.answered(b, Answer::Unavailable, now - sent, now, Some(total), declared);
        let attempts = {
            let r = self.req(slot);
            r.hold = None;
            r.at = None;
            r.avoid = Some(b);
            r.attempts
        };
        let cl = &mut self.clients[c];
        if attempts < MAX_ATTEMPTS && cl.budget >= BUDGET_COST {
            cl.budget -= BUDGET_COST;
            if self.req(slot).measured {
                self.t.retries += 1;
            }
            self.place_or_wait(slot);
        } else {
            self.finish(slot, End::Upstream);
        }
        self.wake(c);
    }

    fn timed_out(&mut self, slot: u32, serial: u64) {
        if !self.alive(slot, serial) {
            return;
        }
        let now = self.now;
        let (c, at, true_cost, declared, sent) = {
            let r = self.req(slot);
            (r.client as usize, r.at, r.true_cost, r.declared, r.sent)
        };
        if let Some(b) = at.map(|b| b as usize) {
            // The client gives up; the backend stops working on it (cancellation).
            if !self.backends[b].failing {
                self.backends[b].stop(secs(now), true_cost, declared);
                self.schedule_done(b);
            }
            self.clients[c].lb.answered(b, Answer::Timeout, now - sent, now, None, declared);
        }
        self.finish(slot, End::Timeout);
        if at.is_some() {
            self.wake(c);
        }
    }

    fn finish(&mut self, slot: u32, end: End) {
        let r = self.reqs[slot as usize].take().expect("a live request");
        self.free.push(slot);
        if !r.measured {
            return;
        }
        let latency_ms = (self.now - r.arrived) as f64 / MS as f64;
        match end {
            End::Ok => {
                self.t.ok += 1;
                self.t.latency.push(latency_ms as f32);
                self.t.class_latency[usize::from(r.class)].push(latency_ms as f32);
                self.t.waited.push(((r.first_sent - r.arrived) as f64 / MS as f64) as f32);
                self.t.good_work += r.true_cost * r.work;
                if r.in_inject {
                    self.t.inject_latency.push(latency_ms as f32);
                }
            }
            End::Timeout => self.t.timeouts += 1,
            End::Refused => self.t.refused += 1,
            End::Upstream => self.t.upstream += 1,
        }
    }

    /// Room was released at proxy `c`: its waiting requests look again.
    fn wake(&mut self, c: usize) {
        if !self.clients[c].waiting.is_empty() {
            self.try_waiters(c, WAKE_TRIES, false);
        }
    }

    /// Waiting requests of proxy `c` pick again, in arrival order, until `max_misses` of
    /// them found no room; with `expire`, every one whose queue deadline has passed
    /// also makes its last pick (and is refused if that finds no room).
    fn try_waiters(&mut self, c: usize, max_misses: usize, expire: bool) {
        let mut misses = 0;
        let mut i = 0;
        while i < self.clients[c].waiting.len() {
            let (slot, serial) = self.clients[c].waiting[i];
            if !self.alive(slot, serial) || self.req(slot).at.is_some() {
                self.clients[c].waiting.remove(i);
                continue;
            }
            let expired = self.req(slot).queue_deadline.is_some_and(|d| self.now >= d);
            if misses >= max_misses && !(expire && expired) {
                if !expire {
                    break;
                }
                i += 1;
                continue;
            }
            if self.place(slot) {
                self.clients[c].waiting.remove(i);
            } else {
                misses += 1;
                i += 1;
            }
        }
    }

    fn ensure_tick(&mut self, c: usize) {
        let cl = &mut self.clients[c];
        if !cl.ticking && !cl.waiting.is_empty() {
            cl.ticking = true;
            self.q.push(self.now + QUEUE_TICK, Ev::Tick { client: c as u32 });
        }
    }

    /// The control plane samples every backend's reported load and pushes it.
    fn sample(&mut self) {
        if self.now + PUSH_EVERY < self.end {
            self.q.push(self.now + PUSH_EVERY, Ev::Sample);
        }
        if self.s.stall.is_some_and(|(a, b)| self.now >= ns(a) && self.now < ns(b)) {
            return;
        }
        let totals: Arc<[u64]> = self.backends.iter().map(|b| b.declared_load).collect();
        for c in 0..self.clients.len() {
            let delay = self.s.push_delay_s + self.infra.uniform(0.0, PUSH_JITTER_S);
            let ev = Ev::Deliver { client: c as u32, measured: self.now, totals: Arc::clone(&totals) };
            self.q.push(self.now + ns(delay), ev);
        }
    }
}

#[cfg(test)]
mod tests;
