//! `[query]`: the query service, its API keys and roles, and the Postgres protocol.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::listener::{HttpLimits, TlsMode, check_transport};
use crate::{ConfigError, Result, positive};

/// A role an API key can hold.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Marketing staff: dashboards, reports, rollup SQL.
    Analyst,
    /// The ad system: audience lookups and segment exports.
    Adserver,
    /// Data engineers: SQL over every table.
    Engineer,
    /// Operators: erasure, user-id opt-outs.
    Admin,
    /// A third party: the campaigns report of the key's own `campaigns`, always noised.
    Advertiser,
}

impl Role {
    /// Every role of the company's own staff and systems, for the generated admin key
    /// (an advertiser is a third party: no admin is one).
    pub const ALL: [Role; 4] = [Role::Analyst, Role::Adserver, Role::Engineer, Role::Admin];
}

/// An API key: its name, roles and where its secret is. Only a hash is ever kept in config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds the key (shown in logs, never the key).
    pub name: String,
    /// What it may do.
    pub roles: Vec<Role>,
    /// SHA-256 of the key, hex; lets the key be checked without storing it.
    #[serde(default)]
    pub sha256: Option<String>,
    /// A file holding the key itself.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// For an `advertiser` key: the campaign ids it may see (and nothing else).
    #[serde(default)]
    pub campaigns: Vec<String>,
    /// This key's privacy budget per day, in ε (default `release.daily_epsilon`).
    #[serde(default)]
    pub daily_epsilon: Option<f64>,
}

/// The query service (`marsad query`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// API keys besides the generated admin key.
    pub keys: Vec<ApiKeyConfig>,
    /// Most rows one SQL answer returns.
    pub max_result_rows: usize,
    /// A query running longer is cancelled.
    pub timeout_secs: u64,
    /// Memory one query may use; a query needing more fails with a clear error instead of spilling.
    pub memory_limit_mb: u64,
    /// Each table is checked for new commits at most this often (ms); queries in between read
    /// the version found last, without touching storage.
    pub table_refresh_ms: u64,
    /// How long `DELETE /v1/subjects` waits for the erasure (which waits for the processor)
    /// before answering 202 with a receipt to poll.
    pub erasure_wait_ms: u64,
    /// Postgres wire protocol address for BI tools and `psql` (user = key name, password = API key).
    pub pg_addr: SocketAddr,
    /// Whether to serve the Postgres wire protocol at all.
    pub pg_enabled: bool,
    /// PEM certificate chain for TLS on the Postgres port (needed off loopback: the password is a key).
    pub pg_tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the Postgres port.
    pub pg_tls_key: Option<PathBuf>,
    /// Postgres connections served at once; more wait for a free one.
    pub pg_max_connections: usize,
    /// A Postgres connection silent this long (between queries) is closed, freeing its slot.
    pub pg_idle_timeout_secs: u64,
    /// Arrow Flight SQL address for data engineers (ADBC, JDBC); off when unset. TLS with the
    /// Postgres port's certificate, needed off loopback (the key travels in a header).
    pub flight_addr: Option<SocketAddr>,
    /// Where TLS of the HTTP API ends: here (with `tls_cert` and `tls_key`) or at a proxy in front.
    pub tls: TlsMode,
    /// PEM certificate chain of the HTTP API (and of Postgres when `pg_tls_cert` is unset).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the HTTP API (and of Postgres when `pg_tls_key` is unset).
    pub tls_key: Option<PathBuf>,
    /// Connections, timeouts and the per-client request rate of the HTTP API.
    pub limits: HttpLimits,
    /// Audience lookups one client address may make per second (the ad system asks often).
    pub audience_rate_per_second: u32,
    /// SQL queries (HTTP and Postgres) running at once; more wait `query_queue_ms`, then get 503.
    /// 0: one less than the cores (at least 1), so a core stays free to accept and refuse.
    pub max_concurrent_queries: usize,
    /// How long a query waits for a free slot before it is refused with 503.
    pub query_queue_ms: u64,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            keys: Vec::new(),
            max_result_rows: 100_000,
            timeout_secs: 60,
            memory_limit_mb: 1024,
            table_refresh_ms: 500,
            erasure_wait_ms: 30_000,
            pg_addr: SocketAddr::from(([127, 0, 0, 1], 5433)),
            pg_enabled: true,
            pg_tls_cert: None,
            pg_tls_key: None,
            pg_max_connections: 64,
            pg_idle_timeout_secs: 900,
            flight_addr: None,
            tls: TlsMode::Builtin,
            tls_cert: None,
            tls_key: None,
            limits: HttpLimits {
                max_connections: 1024,
                header_timeout_ms: 10_000,
                request_timeout_ms: 300_000,
                rate_per_second: 20,
                rate_burst: 100,
            },
            audience_rate_per_second: 5_000,
            max_concurrent_queries: 0,
            query_queue_ms: 10_000,
        }
    }
}

impl QueryConfig {
    /// The certificate and key of the HTTP API, when TLS ends here.
    pub fn tls_files(&self) -> Option<(&PathBuf, &PathBuf)> {
        self.tls_cert.as_ref().zip(self.tls_key.as_ref())
    }

    /// The certificate and key of the Postgres port: its own, else the HTTP API's.
    pub fn pg_tls(&self) -> Option<(&PathBuf, &PathBuf)> {
        self.pg_tls_cert
            .as_ref()
            .zip(self.pg_tls_key.as_ref())
            .or_else(|| self.tls_files())
    }

    /// Queries that may run at once: as configured, or one less than the cores.
    pub fn query_slots(&self) -> usize {
        match self.max_concurrent_queries {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
            n => n,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        positive("query.max_result_rows", self.max_result_rows as u64)?;
        positive("query.timeout_secs", self.timeout_secs)?;
        positive("query.memory_limit_mb", self.memory_limit_mb)?;
        positive("query.pg_max_connections", self.pg_max_connections as u64)?;
        positive("query.pg_idle_timeout_secs", self.pg_idle_timeout_secs)?;
        positive(
            "query.audience_rate_per_second",
            u64::from(self.audience_rate_per_second),
        )?;
        self.limits.validate([
            "query.limits.max_connections",
            "query.limits.header_timeout_ms",
            "query.limits.request_timeout_ms",
            "query.limits.rate_burst",
        ])?;
        check_transport("query", &self.addr, self.tls, &self.tls_cert, &self.tls_key)?;
        if self.pg_tls_cert.is_some() != self.pg_tls_key.is_some() {
            return Err(ConfigError::Invalid {
                key: "query.pg_tls_cert",
                reason: "TLS needs both query.pg_tls_cert and query.pg_tls_key".into(),
            });
        }
        if self.pg_enabled && !self.pg_addr.ip().is_loopback() && self.pg_tls().is_none() {
            return Err(ConfigError::Invalid {
                key: "query.pg_addr",
                reason: format!(
                    "{} is reachable from other machines, and Postgres clients send the API key as their \
                     password: set query.pg_tls_cert and query.pg_tls_key, or listen on loopback",
                    self.pg_addr
                ),
            });
        }
        if let Some(addr) = self.flight_addr
            && !addr.ip().is_loopback()
            && self.pg_tls().is_none()
        {
            return Err(ConfigError::Invalid {
                key: "query.flight_addr",
                reason: format!(
                    "{addr} is reachable from other machines, and Flight SQL clients send the API key in a \
                     header: set query.pg_tls_cert and query.pg_tls_key (or query.tls_cert), or listen on loopback"
                ),
            });
        }
        let mut names = std::collections::HashSet::from(["admin"]);
        for key in &self.keys {
            if !names.insert(key.name.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "query.keys.name",
                    reason: format!(
                        "two keys are called `{}` (or one is called `admin`, the generated key's name): \
                         Postgres signs a key in by its name",
                        key.name
                    ),
                });
            }
        }
        for (i, key) in self.keys.iter().enumerate() {
            if key.name.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    key: "query.keys.name",
                    reason: format!("key #{i} has an empty name"),
                });
            }
            if key.sha256.is_none() == key.file.is_none() {
                return Err(ConfigError::Invalid {
                    key: "query.keys",
                    reason: format!("key `{}` needs exactly one of `sha256` or `file`", key.name),
                });
            }
            let advertiser = key.roles.contains(&Role::Advertiser);
            if advertiser && key.campaigns.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "query.keys.campaigns",
                    reason: format!("advertiser key `{}` lists no campaigns", key.name),
                });
            }
            if advertiser && key.roles.len() > 1 {
                return Err(ConfigError::Invalid {
                    key: "query.keys.roles",
                    reason: format!(
                        "key `{}`: an advertiser is a third party and holds no other role; give staff a key of their own",
                        key.name
                    ),
                });
            }
            if !advertiser && !key.campaigns.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "query.keys.campaigns",
                    reason: format!("key `{}` lists campaigns but is no advertiser", key.name),
                });
            }
            if key.daily_epsilon.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
                return Err(ConfigError::Invalid {
                    key: "query.keys.daily_epsilon",
                    reason: format!("key `{}`: a positive number", key.name),
                });
            }
            if let Some(h) = &key.sha256
                && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(ConfigError::Invalid {
                    key: "query.keys.sha256",
                    reason: format!("key `{}`: expected 64 hex characters", key.name),
                });
            }
        }
        Ok(())
    }
}
