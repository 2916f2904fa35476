//! The processor's Prometheus metrics.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What the processor did.
pub struct ProcessMetrics {
    registry: Registry,
    /// Rows committed to `events`.
    pub events_written: Counter,
    /// Retried duplicates dropped.
    pub duplicates_dropped: Counter,
    /// Events sent to the dead-letter topic.
    pub dead_letters: Counter,
    /// Events not stored: analytics refused or opted out.
    pub not_collected: Counter,
    /// Delta commits.
    pub commits: Counter,
    /// Next raw-log offset to process (partition 0 on the local log).
    pub position: Gauge,
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessMetrics {
    /// Registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("marsad_process");
        let m = ProcessMetrics {
            events_written: Counter::default(),
            duplicates_dropped: Counter::default(),
            dead_letters: Counter::default(),
            not_collected: Counter::default(),
            commits: Counter::default(),
            position: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_written",
            "Rows committed to the events table",
            m.events_written.clone(),
        );
        registry.register(
            "duplicates_dropped",
            "Retried duplicates dropped by event_id",
            m.duplicates_dropped.clone(),
        );
        registry.register(
            "dead_letters",
            "Events sent to the dead-letter topic",
            m.dead_letters.clone(),
        );
        registry.register(
            "events_not_collected",
            "Events not stored: analytics refused or opted out",
            m.not_collected.clone(),
        );
        registry.register("commits", "Delta commits", m.commits.clone());
        registry.register("log_position", "Next raw-log offset to process", m.position.clone());
        ProcessMetrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
