//! What every HTTP listener shares: TLS, and limits on what one client or one
//! connection may take.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result, positive};

/// Where TLS ends for an HTTP listener.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Marsad speaks TLS itself when `tls_cert` and `tls_key` are set; off loopback they must be.
    #[default]
    Builtin,
    /// A proxy in front ends TLS: plain HTTP here, and `X-Forwarded-Proto` from a trusted proxy
    /// tells whether the visitor's connection was secure.
    TerminatedUpstream,
}

/// Limits of one HTTP listener, so one client or a slow one cannot take the service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// A client must send its request headers within this time (also ends idle keep-alives).
    pub header_timeout_ms: u64,
    /// A request (its body read included) taking longer is answered 408.
    pub request_timeout_ms: u64,
    /// Requests per second one client address may make, sustained (0: no limit).
    pub rate_per_second: u32,
    /// Requests one client address may make at once above the sustained rate.
    pub rate_burst: u32,
}

impl Default for HttpLimits {
    /// The figment layers each section's own defaults first; these only fill a table read alone.
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            header_timeout_ms: 10_000,
            request_timeout_ms: 60_000,
            rate_per_second: 20,
            rate_burst: 100,
        }
    }
}

impl HttpLimits {
    /// Checks the limits; `keys` name `max_connections`, `header_timeout_ms`,
    /// `request_timeout_ms` and `rate_burst` of the section, for the error.
    pub(crate) fn validate(&self, keys: [&'static str; 4]) -> Result<()> {
        positive(keys[0], self.max_connections as u64)?;
        positive(keys[1], self.header_timeout_ms)?;
        positive(keys[2], self.request_timeout_ms)?;
        if self.rate_per_second > 0 {
            positive(keys[3], u64::from(self.rate_burst))?;
        }
        Ok(())
    }
}

/// Refuses a listener other machines can reach without TLS, naming the keys that fix it.
pub(crate) fn check_transport(
    section: &'static str,
    addr: &SocketAddr,
    mode: TlsMode,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Result<()> {
    let (cert_key, addr_key) = match section {
        "ingest" => ("ingest.tls_cert", "ingest.addr"),
        _ => ("query.tls_cert", "query.addr"),
    };
    if cert.is_some() != key.is_some() {
        return Err(ConfigError::Invalid {
            key: cert_key,
            reason: format!("TLS needs both {section}.tls_cert and {section}.tls_key"),
        });
    }
    if mode == TlsMode::TerminatedUpstream && cert.is_some() {
        return Err(ConfigError::Invalid {
            key: cert_key,
            reason: format!(
                "{section}.tls = \"terminated_upstream\" says a proxy ends TLS, yet {section}.tls_cert is set: choose one"
            ),
        });
    }
    if mode == TlsMode::Builtin && cert.is_none() && !addr.ip().is_loopback() {
        return Err(ConfigError::Invalid {
            key: addr_key,
            reason: format!(
                "{addr} is reachable from other machines but has no TLS: set {section}.tls_cert and \
                 {section}.tls_key, or {section}.tls = \"terminated_upstream\" if a proxy in front ends TLS, \
                 or listen on loopback"
            ),
        });
    }
    Ok(())
}
