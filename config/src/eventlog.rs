//! `[eventlog]`: the local log or Kafka.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result, positive, settings_as_text};

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
    /// Raw events (IPs, cookie ids, full URLs) are deleted this long after they arrive, plus a
    /// quarter of it at most (the local log closes a segment when its first record is a quarter
    /// of this old; Kafka topics get `segment.ms` a quarter of it). Fractions allowed.
    pub retention_hours: f64,
    /// Dead letters (the full raw payload of refused events) likewise [default: retention_hours].
    pub dead_letter_retention_hours: Option<f64>,
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
    /// Kafka: allow brokers off loopback without TLS (`security.protocol` other than `SSL` or
    /// `SASL_SSL`), for a network that encrypts by other means. Events carry IPs and cookies.
    pub kafka_allow_plaintext: bool,
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

fn hours(h: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(h * 3600.0)
}

impl Default for EventLogConfig {
    fn default() -> Self {
        EventLogConfig {
            kind: EventLogKind::Local,
            segment_bytes: 64 * 1024 * 1024,
            max_pending_appends: 4096,
            retention_hours: 72.0,
            dead_letter_retention_hours: None,
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
            kafka_allow_plaintext: false,
        }
    }
}

impl EventLogConfig {
    /// How long raw events are kept.
    pub fn raw_retention(&self) -> std::time::Duration {
        hours(self.retention_hours)
    }

    /// How long dead letters are kept.
    pub fn dead_letter_retention(&self) -> std::time::Duration {
        hours(self.dead_letter_retention_hours.unwrap_or(self.retention_hours))
    }

    /// Refuses brokers off loopback without TLS unless `kafka_allow_plaintext` says so.
    fn check_kafka_transport(&self) -> Result<()> {
        let protocol = self
            .kafka
            .get("security.protocol")
            .map(|p| p.trim().to_ascii_uppercase())
            .unwrap_or_else(|| "PLAINTEXT".into());
        if protocol == "SSL" || protocol == "SASL_SSL" || self.kafka_allow_plaintext {
            return Ok(());
        }
        let off_loopback = self
            .brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .find(|b| {
                let host = b.rsplit_once(':').map_or(*b, |(h, _)| h).trim_matches(['[', ']']);
                !(host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()))
            });
        match off_loopback {
            None => Ok(()),
            Some(broker) => Err(ConfigError::Invalid {
                key: "eventlog.kafka",
                reason: format!(
                    "broker `{broker}` is off this machine and `security.protocol` is {protocol}: events carry \
                     IP addresses and cookies, so set eventlog.kafka.\"security.protocol\" = \"SSL\" or \"SASL_SSL\", \
                     or eventlog.kafka_allow_plaintext = true if the network encrypts by other means"
                ),
            }),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        for (key, value) in [
            ("eventlog.retention_hours", Some(self.retention_hours)),
            ("eventlog.dead_letter_retention_hours", self.dead_letter_retention_hours),
        ] {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0 && v <= 24.0 * 365.0 * 10.0)
            {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{v}: a positive number of hours (fractions allowed)"),
                });
            }
        }
        positive("eventlog.max_pending_appends", self.max_pending_appends as u64)?;
        if self.kind == EventLogKind::Kafka {
            if self.brokers.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    key: "eventlog.brokers",
                    reason: "the Kafka event log needs its brokers (`host:port,…`)".into(),
                });
            }
            positive("eventlog.partitions", u64::from(self.partitions))?;
            positive("eventlog.replication_factor", u64::from(self.replication_factor))?;
            if !["zstd", "lz4", "gzip", "snappy", "none"].contains(&self.compression.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "eventlog.compression",
                    reason: format!("`{}`: one of zstd, lz4, gzip, snappy, none", self.compression),
                });
            }
            self.check_kafka_transport()?;
            if let Some(k) = self
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
        if self.segment_bytes < 4096 {
            return Err(ConfigError::Invalid {
                key: "eventlog.segment_bytes",
                reason: format!("{} is too small; use at least 4096", self.segment_bytes),
            });
        }
        Ok(())
    }
}
