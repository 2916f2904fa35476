//! `[privacy]` and `[geoip]`: anonymization settings.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result};

/// Anonymization settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Query parameters kept in stored page paths (`*` at the end matches a prefix).
    pub query_allowlist: Vec<String>,
    /// A file holding the long-lived targeting key (hex, 32 bytes); else `MARSAD_SECRET_TARGETING_KEY`, else (local log only) one generated in the data dir.
    pub targeting_key_file: Option<PathBuf>,
    /// A file holding the opt-out key (hex, 32 bytes), never rotated; else `MARSAD_SECRET_OPTOUT_KEY`, else (local log only) one generated in the data dir.
    pub optout_key_file: Option<PathBuf>,
    /// A file holding the key the site's backend signs identity tokens with (hex, 32 bytes);
    /// else `MARSAD_SECRET_IDENTITY_KEY`. Without one, every `user_id` counts as anonymous.
    pub identity_key_file: Option<PathBuf>,
    /// Hours after its day ends that a daily visitor key is kept, then destroyed (at most
    /// [`MAX_DAILY_KEY_GRACE_HOURS`]).
    pub daily_key_grace_hours: u64,
    /// How often every stage holding daily keys destroys the expired ones, traffic or not.
    pub key_destruction_interval_ms: u64,
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
            optout_key_file: None,
            identity_key_file: None,
            daily_key_grace_hours: 48,
            key_destruction_interval_ms: 60_000,
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

/// The longest a daily visitor key outlives its day: a year, room for a backfill of old days
/// (which needs their keys); a typo of billions of hours would put its destruction off the
/// calendar.
pub const MAX_DAILY_KEY_GRACE_HOURS: u64 = 24 * 366;

impl PrivacyConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        crate::positive("privacy.key_destruction_interval_ms", self.key_destruction_interval_ms)?;
        if self.daily_key_grace_hours > MAX_DAILY_KEY_GRACE_HOURS {
            return Err(ConfigError::Invalid {
                key: "privacy.daily_key_grace_hours",
                reason: format!(
                    "at most {MAX_DAILY_KEY_GRACE_HOURS} (a year), not {}",
                    self.daily_key_grace_hours
                ),
            });
        }
        for p in &self.query_allowlist {
            if p.is_empty() || p[..p.len() - 1].contains('*') {
                return Err(ConfigError::Invalid {
                    key: "privacy.query_allowlist",
                    reason: format!("`{p}`: a parameter name, optionally ending in `*`"),
                });
            }
        }
        Ok(())
    }
}
