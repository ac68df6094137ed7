//! The proxy's Prometheus metrics (config path for now). Declared and encoded here;
//! updated where things happen.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

impl KindLabel {
    pub fn of(type_url: &str) -> Self {
        KindLabel { kind: neutrino_proto::type_url::short(type_url).to_string() }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub updates_applied: Family<KindLabel, Counter>,
    pub updates_rejected: Family<KindLabel, Counter>,
    pub stream_connects: Counter,
    pub stream_connected: Gauge,
}

impl Metrics {
    pub fn encode(&self, generation: u64, ready: bool) -> String {
        let mut r = Registry::with_prefix("neutrino_proxy");
        r.register(
            "config_updates_applied",
            "Config updates validated and published (ACKed)",
            self.updates_applied.clone(),
        );
        r.register(
            "config_updates_rejected",
            "Config updates rejected by validation (NACKed)",
            self.updates_rejected.clone(),
        );
        r.register("control_plane_connects", "Discovery streams established", self.stream_connects.clone());
        r.register("control_plane_connected", "1 while the discovery stream is open", self.stream_connected.clone());
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(generation).unwrap_or(i64::MAX));
        r.register("config_generation", "Generation of the published config snapshot", g);
        let rd: Gauge = Gauge::default();
        rd.set(i64::from(ready));
        r.register("ready", "1 once a first valid config has been applied", rd);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}
