//! `[ingest]`: the collection endpoint.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Result, positive};

/// The collection endpoint (`marsad ingest`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Proxies whose `X-Forwarded-For` is believed (CIDR list); everyone else's is ignored.
    pub trusted_proxies: Vec<IpNet>,
    /// Largest request body accepted, after decompression; larger gets 413.
    pub body_limit_bytes: usize,
    /// Most events in one batch request.
    pub max_batch_events: usize,
    /// How long a request waits for the log to make its events durable before answering 503.
    pub append_timeout_ms: u64,
    /// Seconds sent in `Retry-After` with a 503.
    pub retry_after_secs: u64,
    /// Whether events without a stated analytics consent are collected.
    pub default_analytics_consent: bool,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            trusted_proxies: Vec::new(),
            body_limit_bytes: 1024 * 1024,
            max_batch_events: 10_000,
            append_timeout_ms: 5_000,
            retry_after_secs: 1,
            default_analytics_consent: true,
        }
    }
}

impl IngestConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        positive("ingest.body_limit_bytes", self.body_limit_bytes as u64)?;
        positive("ingest.max_batch_events", self.max_batch_events as u64)?;
        positive("ingest.append_timeout_ms", self.append_timeout_ms)
    }
}
