//! Ingest's Prometheus metrics; labels are low-cardinality (never an IP or id).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Counters of what ingest accepted and refused.
pub struct IngestMetrics {
    registry: Registry,
    /// Events made durable.
    pub accepted: Counter,
    /// Events refused, by reason.
    pub rejected: Family<Labels, Counter>,
    /// Events not collected because the visitor refused analytics.
    pub not_collected: Counter,
    /// Requests answered 503 because the log could not take them.
    pub unavailable: Counter,
    /// Events whose `user_id` or demographics came without a valid identity token (kept anonymous).
    pub unsigned_identity: Counter,
    /// Identity tokens that did not verify, by reason.
    pub identity_refused: Family<Labels, Counter>,
}

impl Default for IngestMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl IngestMetrics {
    /// Registers the counters.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("marsad_ingest");
        let accepted = Counter::default();
        let rejected = Family::<Labels, Counter>::default();
        let not_collected = Counter::default();
        let unavailable = Counter::default();
        let unsigned_identity = Counter::default();
        let identity_refused = Family::<Labels, Counter>::default();
        registry.register(
            "identities_unsigned",
            "Events whose user_id or demographics came without a valid identity token",
            unsigned_identity.clone(),
        );
        registry.register(
            "identity_tokens_refused",
            "Identity tokens that did not verify, by reason",
            identity_refused.clone(),
        );
        registry.register(
            "events_accepted",
            "Events made durable in the event log",
            accepted.clone(),
        );
        registry.register(
            "events_rejected",
            "Events refused with a 4xx, by reason",
            rejected.clone(),
        );
        registry.register(
            "events_not_collected",
            "Events dropped because analytics consent was refused",
            not_collected.clone(),
        );
        registry.register(
            "requests_unavailable",
            "Requests answered 503 because the log could not take them",
            unavailable.clone(),
        );
        IngestMetrics {
            registry,
            accepted,
            rejected,
            not_collected,
            unavailable,
            unsigned_identity,
            identity_refused,
        }
    }

    /// Counts a refused event.
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Counts an identity token that did not verify.
    pub fn identity_refused(&self, e: &marsad_privacy::identity::IdentityError) {
        use marsad_privacy::identity::IdentityError;
        let reason = match e {
            IdentityError::Malformed => "malformed",
            IdentityError::BadSignature => "bad_signature",
            IdentityError::Expired => "expired",
        };
        self.identity_refused.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
