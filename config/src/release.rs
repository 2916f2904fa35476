//! `[release]`: what leaves Marsad — the protection of every number the analyst and
//! advertiser interfaces release (reports, the dashboard, analyst SQL over HTTP and
//! Postgres, CSV exports).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result, positive};

/// How analysts' numbers are protected (advertisers always get noise).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AnalystRelease {
    /// Noise drawn per cell from the noise key, a visitor threshold on the noisy count, a
    /// daily budget: the guarantee holds across queries.
    Noise,
    /// Exact numbers for internal use; rows under the visitor threshold are dropped, which
    /// differencing two answers defeats (see the README before choosing this).
    ThresholdOnly,
}

/// The release mechanism.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReleaseConfig {
    /// How analysts' numbers are protected.
    pub analysts: AnalystRelease,
    /// ε spent by each measure an answer releases (noise scale = the measure's sensitivity / ε).
    pub epsilon_per_measure: f64,
    /// ε each key may spend per UTC day; past it, 429 until midnight. Asking again for a
    /// number already released today costs nothing (it gets the same answer).
    pub daily_epsilon: f64,
    /// Rows whose noisy visitor count is below this are not released.
    pub min_visitors: u64,
    /// A file holding the noise key (hex, 32 bytes); else `MARSAD_SECRET_NOISE_KEY`, else one
    /// generated in the data dir (mode 0600).
    pub noise_key_file: Option<PathBuf>,
}

impl Default for ReleaseConfig {
    fn default() -> Self {
        ReleaseConfig {
            analysts: AnalystRelease::Noise,
            epsilon_per_measure: 2.0,
            daily_epsilon: 1000.0,
            min_visitors: 20,
            noise_key_file: None,
        }
    }
}

impl ReleaseConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("release.epsilon_per_measure", self.epsilon_per_measure),
            ("release.daily_epsilon", self.daily_epsilon),
        ] {
            if !(v.is_finite() && v >= 0.001) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{v}: a positive number (at least 0.001)"),
                });
            }
        }
        if self.daily_epsilon < self.epsilon_per_measure {
            return Err(ConfigError::Invalid {
                key: "release.daily_epsilon",
                reason: "smaller than one measure's ε: nothing could be released".into(),
            });
        }
        positive("release.min_visitors", self.min_visitors)
    }
}
