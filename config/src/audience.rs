//! `[audience]`: segment definitions for the ad system.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result, positive};

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
    /// Where changes of membership are pushed to the ad system.
    pub push: SegmentPushConfig,
}

/// `[audience.push]`: after each refresh, the members that joined and left each served
/// segment, and every opt-out at once, pushed to the ad system.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentPushConfig {
    /// Whether this process pushes (where segments are refreshed); turn it off on all but one
    /// processor when several run.
    pub enabled: bool,
    /// The compacted Kafka topic changes go to, keyed by `audience_id`, when the event log is
    /// Kafka; empty: none.
    pub kafka_topic: String,
    /// An `https://` URL changes are POSTed to, signed with HMAC-SHA256 under the key of
    /// `MARSAD_SECRET_SEGMENT_WEBHOOK_KEY` or `webhook_key_file` (hex); none when absent.
    pub webhook_url: Option<String>,
    /// A file holding the webhook's signing key (hex, at least 32 bytes).
    pub webhook_key_file: Option<std::path::PathBuf>,
    /// A PEM file of authorities the webhook's certificate may chain to, besides the system's.
    pub webhook_ca_file: Option<std::path::PathBuf>,
    /// How long one POST may take before it counts as failed and is retried.
    pub webhook_timeout_ms: u64,
    /// The most changes one POST or one Kafka batch carries.
    pub batch_max: usize,
}

impl Default for SegmentPushConfig {
    fn default() -> Self {
        SegmentPushConfig {
            enabled: true,
            kafka_topic: "marsad.segments".into(),
            webhook_url: None,
            webhook_key_file: None,
            webhook_ca_file: None,
            webhook_timeout_ms: 10_000,
            batch_max: 1_000,
        }
    }
}

impl Default for AudienceConfig {
    fn default() -> Self {
        AudienceConfig {
            min_segment_size: 100,
            refresh_interval_secs: 300,
            segments: Vec::new(),
            push: SegmentPushConfig::default(),
        }
    }
}

/// The longest window a segment looks back over: ten years; a longer one is a typo, and one
/// of billions of days would start off the calendar.
pub const MAX_WINDOW_DAYS: u32 = 3_660;

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

impl AudienceConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        positive("audience.min_segment_size", self.min_segment_size as u64)?;
        positive("audience.refresh_interval_secs", self.refresh_interval_secs)?;
        positive("audience.push.webhook_timeout_ms", self.push.webhook_timeout_ms)?;
        positive("audience.push.batch_max", self.push.batch_max as u64)?;
        if let Some(url) = &self.push.webhook_url {
            let https = url.strip_prefix("https://").is_some_and(|rest| !rest.is_empty());
            if !https {
                return Err(ConfigError::Invalid {
                    key: "audience.push.webhook_url",
                    reason: format!(
                        "`{url}` must be an https:// URL: audience ids and the signature cross the network"
                    ),
                });
            }
        }
        let mut ids = std::collections::HashSet::new();
        for seg in &self.segments {
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
            if seg.window_days == 0 || seg.window_days > MAX_WINDOW_DAYS {
                return Err(bad(format!(
                    "segment `{}`: window_days must be from 1 to {MAX_WINDOW_DAYS}, not {}",
                    seg.id, seg.window_days
                )));
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_changes_are_pushed_over_https_only() {
        let with = |url: &str| {
            let mut config = AudienceConfig::default();
            config.push.webhook_url = Some(url.to_owned());
            config.validate()
        };
        // audience ids and the signature would cross the network in the clear
        for plain in ["http://ads.internal/segments", "ads.internal/segments", "https://"] {
            assert!(with(plain).is_err(), "{plain} accepted");
        }
        assert!(with("https://ads.internal/segments").is_ok());
    }
}
