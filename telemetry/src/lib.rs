//! Prometheus `/metrics` for the coordinator and the embedded broker.
//!
//! - [`Registry`]: one Prometheus registry per component instance. The `metrics` crate's global
//!   recorder is never installed: a test binary (or `coevo demo`) runs a broker and several
//!   coordinators in one process, and each must expose only its own numbers.
//! - [`MetricsServer`]: serves a registry's text format over HTTP/1 (`GET /metrics`) on its
//!   own thread and runtime, so it works the same whether the caller is async (the
//!   coordinator) or not (the broker's start-up), and it renders on every scrape, so a scrape
//!   always sees the counters as they are.
//! - [`parse`] / [`Samples`] and [`scrape`]: a reader of the text exposition format and a
//!   plain HTTP/1.0 GET, for `coevo status --metrics` and for tests that check what an
//!   operator's Prometheus would see.

mod exposition;
mod server;

pub use exposition::{parse, ParseError, Sample, Samples};
pub use metrics::{Counter, Gauge};
pub use server::{scrape, MetricsServer};

use metrics::{Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

/// Errors starting the endpoint or reading one.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("cannot serve /metrics on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The HTTP server or its thread could not be started.
    #[error("metrics endpoint: {0}")]
    Start(String),
    /// A scrape failed: connection refused, timeout, or not an HTTP 200 answer.
    #[error("scraping {url}: {reason}")]
    Scrape { url: String, reason: String },
    /// The text was not in the Prometheus exposition format.
    #[error("metrics text: {0}")]
    Parse(#[from] ParseError),
}

/// Every metric registers with the same (unused) metadata: the Prometheus recorder ignores it.
static METADATA: Metadata<'static> = Metadata::new("coevo", metrics::Level::INFO, None);

/// A Prometheus registry for one component: register counters and gauges once, keep their
/// handles (cheap atomic updates), render the text format on demand.
pub struct Registry {
    recorder: PrometheusRecorder,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Registry {
            recorder: PrometheusBuilder::new().build_recorder(),
        }
    }

    /// A counter without labels. Registering a name again returns the same counter.
    pub fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        self.counter_with(name, help, &[])
    }

    /// A counter with labels, e.g. `("reason", "bad-signature")`. It shows in the text format
    /// from registration on, at 0, so `rate()` has a starting point.
    pub fn counter_with(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Counter {
        self.recorder
            .describe_counter(KeyName::from(name), None, SharedString::from(help));
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    /// A gauge without labels.
    pub fn gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        self.gauge_with(name, help, &[])
    }

    /// A gauge with labels.
    pub fn gauge_with(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Gauge {
        self.recorder
            .describe_gauge(KeyName::from(name), None, SharedString::from(help));
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    /// The Prometheus text exposition of every registered metric.
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_renders_what_was_registered_with_help_and_labels() {
        let r = Registry::new();
        let c = r.counter_with("coevo_x_total", "Things.", &[("reason", "bad \"one\"")]);
        c.increment(3);
        let g = r.gauge("coevo_y_ratio", "A ratio.");
        g.set(0.25);
        let idle = r.counter("coevo_idle_total", "Never bumped.");
        drop(idle);
        let text = r.render();
        assert!(text.contains("# HELP coevo_x_total Things."), "{text}");
        assert!(text.contains("# TYPE coevo_x_total counter"), "{text}");
        let s = parse(&text).unwrap();
        assert_eq!(
            s.value("coevo_x_total", &[("reason", "bad \"one\"")]),
            Some(3.0)
        );
        assert_eq!(s.value("coevo_y_ratio", &[]), Some(0.25));
        // Registered but never bumped: present at 0, so rate() has a start.
        assert_eq!(s.value("coevo_idle_total", &[]), Some(0.0));
        // Two registries in one process do not share anything.
        let other = Registry::new();
        assert!(parse(&other.render()).unwrap().is_empty());
    }
}
