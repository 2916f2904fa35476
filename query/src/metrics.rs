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
    /// Audience lookups answered with segments, with none, or refused by an opt-out.
    audience_found: Counter,
    audience_none: Counter,
    audience_opted_out: Counter,
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
        let lookups = Family::<Labels, Counter>::default();
        registry.register("audience_lookups", "Audience lookups by outcome", lookups.clone());
        // one statement each: a family's guard must be dropped before the next lookup
        let audience_found = lookups.get_or_create(&vec![("outcome", "found")]).clone();
        let audience_none = lookups.get_or_create(&vec![("outcome", "none")]).clone();
        let audience_opted_out = lookups.get_or_create(&vec![("outcome", "opted_out")]).clone();
        QueryMetrics {
            registry,
            queries,
            audience_found,
            audience_none,
            audience_opted_out,
        }
    }

    /// Counts a query outcome.
    pub fn count(&self, outcome: &'static str) {
        self.queries.get_or_create(&vec![("outcome", outcome)]).inc();
    }

    /// Counts an audience lookup (`found`, `none`, `opted_out`).
    pub fn audience(&self, outcome: &'static str) {
        match outcome {
            "found" => self.audience_found.inc(),
            "opted_out" => self.audience_opted_out.inc(),
            _ => self.audience_none.inc(),
        };
    }

    /// The Prometheus text exposition (without the final `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
