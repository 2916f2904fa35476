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

impl AudienceConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        positive("audience.min_segment_size", self.min_segment_size as u64)?;
        positive("audience.refresh_interval_secs", self.refresh_interval_secs)?;
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
        Ok(())
    }
}
