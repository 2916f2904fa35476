//! `[ingest]`: the collection endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::listener::{HttpLimits, TlsMode, check_transport};
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
    /// Where TLS ends: here (with `tls_cert` and `tls_key`) or at a proxy in front.
    pub tls: TlsMode,
    /// PEM certificate chain; re-read when the file changes.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key; re-read when the file changes.
    pub tls_key: Option<PathBuf>,
    /// Connections, timeouts and the per-client rate of events.
    pub limits: HttpLimits,
    /// Opt-outs one client address may record per minute.
    pub opt_out_rate_per_minute: u32,
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
            tls: TlsMode::Builtin,
            tls_cert: None,
            tls_key: None,
            limits: HttpLimits {
                max_connections: 4096,
                header_timeout_ms: 10_000,
                request_timeout_ms: 30_000,
                rate_per_second: 50,
                rate_burst: 500,
            },
            opt_out_rate_per_minute: 10,
        }
    }
}

impl IngestConfig {
    /// The certificate and key, when TLS ends here.
    pub fn tls_files(&self) -> Option<(&PathBuf, &PathBuf)> {
        self.tls_cert.as_ref().zip(self.tls_key.as_ref())
    }

    pub(crate) fn validate(&self) -> Result<()> {
        positive("ingest.body_limit_bytes", self.body_limit_bytes as u64)?;
        positive("ingest.max_batch_events", self.max_batch_events as u64)?;
        positive("ingest.append_timeout_ms", self.append_timeout_ms)?;
        positive(
            "ingest.opt_out_rate_per_minute",
            u64::from(self.opt_out_rate_per_minute),
        )?;
        self.limits.validate([
            "ingest.limits.max_connections",
            "ingest.limits.header_timeout_ms",
            "ingest.limits.request_timeout_ms",
            "ingest.limits.rate_burst",
        ])?;
        if self.tls == TlsMode::TerminatedUpstream && self.trusted_proxies.is_empty() {
            return Err(crate::ConfigError::Invalid {
                key: "ingest.trusted_proxies",
                reason: "ingest.tls = \"terminated_upstream\" needs the proxies in front: without them every \
                         visitor would share the proxy's address (one rate limit, one GeoIP) and no \
                         X-Forwarded-Proto could be believed"
                    .into(),
            });
        }
        check_transport("ingest", &self.addr, self.tls, &self.tls_cert, &self.tls_key)
    }
}
