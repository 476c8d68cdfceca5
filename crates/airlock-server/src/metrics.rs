//! Prometheus metrics. Counters and histograms live here; the per-state gauge
//! is read from the store at scrape time so it can never drift from the truth.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Debug)]
pub struct Metrics {
    /// Subsystems (logins, egress) register their own metrics here.
    registry: std::sync::Mutex<Registry>,
    creations: Counter,
    failures: Family<ReasonLabel, Counter>,
    ready_seconds: Histogram,
    sandboxes: Family<StateLabel, Gauge>,
    viewers_opened: Counter,
    viewers_closed: Family<CodeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("airlock");
        let creations = Counter::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        let ready_seconds =
            Histogram::new([0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 60.0, 90.0]);
        let sandboxes = Family::<StateLabel, Gauge>::default();
        let viewers_opened = Counter::default();
        let viewers_closed = Family::<CodeLabel, Counter>::default();
        registry.register("sandbox_creations", "Sandboxes created", creations.clone());
        registry.register(
            "sandbox_failures",
            "Sandboxes failed, by reason",
            failures.clone(),
        );
        registry.register(
            "sandbox_create_to_ready_seconds",
            "Time from create to ready",
            ready_seconds.clone(),
        );
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        registry.register(
            "viewer_connections_opened",
            "Viewer connections opened",
            viewers_opened.clone(),
        );
        registry.register(
            "viewer_connections_closed",
            "Viewer connections closed, by close code",
            viewers_closed.clone(),
        );
        Metrics {
            registry: std::sync::Mutex::new(registry),
            creations,
            failures,
            ready_seconds,
            sandboxes,
            viewers_opened,
            viewers_closed,
        }
    }

    /// Register a subsystem's metric (name without the `airlock_` prefix).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.register(name, help, metric);
    }

    pub fn created(&self) {
        self.creations.inc();
    }
    pub fn failed(&self, reason: &str) {
        self.failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }
    pub fn ready(&self, took: Duration) {
        self.ready_seconds.observe(took.as_secs_f64());
    }
    pub fn viewer_opened(&self) {
        self.viewers_opened.inc();
    }
    pub fn viewer_closed(&self, code: u16) {
        self.viewers_closed
            .get_or_create(&CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }

    /// The text exposition, with the per-state gauge set from `counts`.
    pub fn render(&self, counts: &[(crate::app::state::SandboxState, i64)]) -> String {
        for state in crate::app::state::SandboxState::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            self.sandboxes
                .get_or_create(&StateLabel {
                    state: state.as_str().to_owned(),
                })
                .set(n);
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
