//! The query service's Prometheus metrics.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Queries by outcome.
pub struct QueryMetrics {
    registry: Registry,
    /// SQL queries by outcome (`ok`, `refused`, `error`).
    pub queries: Family<Labels, Counter>,
}

impl Default for QueryMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl QueryMetrics {
    /// Registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("marsad_query");
        let queries = Family::<Labels, Counter>::default();
        registry.register("sql_queries", "SQL queries by outcome", queries.clone());
        QueryMetrics { registry, queries }
    }

    /// Counts a query outcome.
    pub fn count(&self, outcome: &'static str) {
        self.queries.get_or_create(&vec![("outcome", outcome)]).inc();
    }

    /// The Prometheus text exposition (without the final `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
