//! Marsad's privacy mechanisms: everything that turns what a visitor sent
//! into what may be stored.
//!
//! - [`keys`]: the random daily visitor keys (destroyed after a grace period)
//!   and the long-lived targeting key;
//! - [`pseudonym`]: keyed hashes that replace cookie and user ids;
//! - [`geoip`]: location from the full IP, after which the IP is dropped;
//! - [`client_ip`]: which address is the visitor's, behind trusted proxies;
//! - [`scrub`]: page paths and referrers without personal data;
//! - [`user_agent`]: device, OS and browser, with a cache;
//! - [`consent`]: what each purpose is allowed;
//! - [`optout`]: the opt-out registry every service consults;
//! - [`access`]: API keys and roles.
//!
//! This crate owns the mechanisms, not the pipeline: it must not read the log,
//! write tables, or log an IP address or identifier.

#![deny(missing_docs)]

pub mod access;
pub mod client_ip;
pub mod consent;
pub mod geoip;
pub mod identity;
pub mod kafka_keys;
pub mod keys;
#[cfg(any(test, feature = "test-support"))]
pub mod mmdb_writer;
pub mod noise;
pub mod optout;
pub mod pseudonym;
pub mod scrub;
pub mod user_agent;

use std::path::PathBuf;

/// Why a privacy mechanism could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key file or the GeoIP database could not be read or written.
    #[error("{what} at {path}: {source}")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key is malformed.
    #[error("{what}: {reason}")]
    BadKey {
        /// Which key.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A key every stage must share was neither in the environment nor in a file, on an event
    /// log (Kafka) whose stages run on several machines: a key generated here would disagree.
    #[error(
        "no key given: set {env} (64 hex characters, the same on every machine) or {file_key}; \
         on Kafka a stage never generates its own"
    )]
    KeyNotGiven {
        /// The environment variable.
        env: &'static str,
        /// The config key naming a file.
        file_key: &'static str,
    },
    /// A stage's key is not the one the other stages recorded in the opt-out log.
    #[error(
        "this stage's {what} (fingerprint {ours}) is not the one recorded in the opt-out log \
         ({recorded}); every stage must use the same key. {advice}"
    )]
    KeyMismatch {
        /// Which key.
        what: &'static str,
        /// Fingerprint of this stage's key.
        ours: String,
        /// Fingerprint recorded.
        recorded: String,
        /// What to do.
        advice: &'static str,
    },
    /// The daily key of a day past its grace period was asked for: it is destroyed for good.
    #[error("the visitor key of {day} has been destroyed")]
    KeyDestroyed {
        /// The day.
        day: chrono::NaiveDate,
    },
    /// The shared key store (a Kafka topic) could not be read or written.
    #[error("key store: {what}: {reason}")]
    KeyStore {
        /// What was being done.
        what: &'static str,
        /// What failed.
        reason: String,
    },
    /// The GeoIP database does not open.
    #[error("GeoIP database {path}: {reason}")]
    GeoIp {
        /// Which database.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
