//! `[process]`: the stream processor, and the page categories it assigns.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{Result, positive};

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
    /// The rollups commit at most this often (0: with every `events` commit): each commit adds
    /// a partial row per key, so fewer commits leave reports fewer rows to read. A crash in
    /// between loses nothing: the rollups catch up from `events` at the next start.
    pub rollup_commit_interval_ms: u64,
    /// How often partial rollup rows are merged into one row per key (dates with several
    /// files), and the dates of `events` with many small files rewritten into large ones.
    pub rollup_compaction_interval_secs: u64,
    /// A date of `events` is rewritten into large files once it has this many small ones
    /// (0: never). Safe beside an erasure: whichever commits second fails on a conflict, and
    /// the loser's uncommitted files are removed.
    pub events_compaction_min_files: usize,
    /// Page categories: the first rule with a path segment (any case) among its words wins; else `other`.
    pub page_categories: Vec<PageCategoryRule>,
    /// Events one visitor adds to each rollup table per day, at most (the clamp that bounds
    /// any visitor's influence on a released number); `events` keeps every event.
    pub max_events_per_visitor_day: u32,
    /// How a session's landing event is put in a channel (`sources_hourly`, the sources report).
    pub channels: ChannelRules,
    /// Conversions counted in `goals_hourly` (the goals report).
    pub goals: Vec<GoalDefinition>,
    /// Ordered steps counted per session in `funnels_hourly` (the funnels report).
    pub funnels: Vec<FunnelDefinition>,
}

/// What an event must be to count: every condition given must hold (none given: any event).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    /// The event type (`page_view`, `ad_click`, `ad_post`, `signup`, …).
    #[serde(default)]
    pub event_type: Option<String>,
    /// The page category.
    #[serde(default)]
    pub page_category: Option<String>,
    /// The page path (as stored, scrubbed): exact, or with `*` for any run of characters.
    #[serde(default)]
    pub path: Option<String>,
    /// The ad campaign.
    #[serde(default)]
    pub campaign_id: Option<String>,
}

/// A goal: the events that are its conversions. A visitor converts when one of its events matches.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GoalDefinition {
    /// Its id in `goals_hourly.goal_id` and in reports (a-z, 0-9, - and _).
    pub id: String,
    /// Its name for people.
    #[serde(default)]
    pub description: String,
    /// Converting events' type (`page_view`, `ad_click`, `ad_post`, `signup`, …).
    #[serde(default)]
    pub event_type: Option<String>,
    /// Converting events' page category.
    #[serde(default)]
    pub page_category: Option<String>,
    /// Converting events' page path: exact, or with `*` for any run of characters.
    #[serde(default)]
    pub path: Option<String>,
    /// Converting events' ad campaign.
    #[serde(default)]
    pub campaign_id: Option<String>,
}

impl GoalDefinition {
    /// The events that convert.
    pub fn event(&self) -> EventMatch {
        EventMatch {
            event_type: self.event_type.clone(),
            page_category: self.page_category.clone(),
            path: self.path.clone(),
            campaign_id: self.campaign_id.clone(),
        }
    }
}

/// A funnel: steps a session takes in this order (other events may come between).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FunnelDefinition {
    /// Its id in `funnels_hourly.funnel_id` and in reports (a-z, 0-9, - and _).
    pub id: String,
    /// Its name for people.
    #[serde(default)]
    pub description: String,
    /// The steps, first to last (2 to 8).
    pub steps: Vec<EventMatch>,
}

/// The event types there are (as `marsad_schemas::EventType` names them).
const EVENT_TYPES: [&str; 7] = [
    "page_view",
    "ad_impression",
    "ad_click",
    "search",
    "ad_post",
    "signup",
    "custom",
];

/// The most goals, and funnels, one deployment defines.
pub const MAX_GOALS: usize = 64;
/// See [`MAX_GOALS`].
pub const MAX_FUNNELS: usize = 16;

/// A goal or step must say something (one with no condition would match every event), and
/// name an event type there is (a typo would silently never match).
fn check_match(key: &'static str, id: &str, event: &EventMatch) -> Result<()> {
    let bad = |reason: String| crate::ConfigError::Invalid { key, reason };
    if event.event_type.is_none()
        && event.page_category.is_none()
        && event.path.is_none()
        && event.campaign_id.is_none()
    {
        return Err(bad(format!(
            "`{id}`: give at least one of event_type, page_category, path, campaign_id"
        )));
    }
    if let Some(t) = event.event_type.as_deref()
        && !EVENT_TYPES.contains(&t)
    {
        return Err(bad(format!(
            "`{id}`: unknown event_type `{t}`; one of {}",
            EVENT_TYPES.join(", ")
        )));
    }
    Ok(())
}

fn check_id(key: &'static str, id: &str, seen: &mut std::collections::HashSet<String>) -> Result<()> {
    let bad = |reason: String| crate::ConfigError::Invalid { key, reason };
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(bad(format!(
            "id `{id}` must be non-empty and use only a-z, 0-9, - and _"
        )));
    }
    if !seen.insert(id.to_owned()) {
        return Err(bad(format!("id `{id}` is defined twice")));
    }
    Ok(())
}

/// The channel grouping of `sources_hourly`. A session's channel comes from its landing
/// event, by the first rule that holds:
///
/// 1. `email`: its `utm_medium` is one of `email_mediums`;
/// 2. `paid_social`: `utm_medium` is one of `paid_mediums` and the referrer or `utm_source`
///    is a social network, or the medium itself says `social`; `paid_search`: a paid medium
///    with anything else;
/// 3. `display`: `utm_medium` is one of `display_mediums`;
/// 4. `social`: the referrer or `utm_source` is a social network;
/// 5. `organic_search`: the referrer or `utm_source` is a search engine;
/// 6. `referral`: another site referred it, or a `utm_source` names one;
/// 7. `direct`: nothing did (no referrer, or one of `own_domains`).
///
/// A domain entry matches that domain and its subdomains (`facebook.com` matches
/// `m.facebook.com`); an entry without a dot matches any label (`google` matches
/// `google.com.sa` and `news.google.ae`). A `utm_source` matches an entry equal to it or an
/// entry's name before its last label (`facebook` matches `facebook.com`). Mediums and sources
/// are compared lower case.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelRules {
    /// Search engines, Arabic-region ones included.
    pub search_engines: Vec<String>,
    /// Social networks and messengers, those most used in the Arab world included.
    pub social_networks: Vec<String>,
    /// `utm_medium` values of e-mail campaigns.
    pub email_mediums: Vec<String>,
    /// `utm_medium` values of paid clicks.
    pub paid_mediums: Vec<String>,
    /// `utm_medium` values of display (banner) campaigns.
    pub display_mediums: Vec<String>,
    /// The site's own domains: a landing event referred by one of them is `direct`.
    pub own_domains: Vec<String>,
}

/// The most steps a funnel has.
pub const MAX_FUNNEL_STEPS: usize = 8;

fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|w| (*w).to_owned()).collect()
}

impl Default for ChannelRules {
    fn default() -> Self {
        ChannelRules {
            search_engines: words(&[
                "google",
                "bing",
                "yahoo",
                "yandex",
                "duckduckgo",
                "baidu",
                "ecosia",
                "qwant",
                "naver",
                "yamli.com",
                "ask.com",
                "search.brave.com",
                "petalsearch.com",
                "startpage.com",
                "aol.com",
            ]),
            social_networks: words(&[
                "facebook.com",
                "fb.com",
                "fb.me",
                "instagram.com",
                "twitter.com",
                "x.com",
                "t.co",
                "snapchat.com",
                "tiktok.com",
                "youtube.com",
                "youtu.be",
                "linkedin.com",
                "lnkd.in",
                "whatsapp.com",
                "wa.me",
                "t.me",
                "telegram.org",
                "threads.net",
                "pinterest.com",
                "reddit.com",
                "imo.im",
            ]),
            email_mediums: words(&["email", "e-mail", "e_mail", "newsletter", "mail"]),
            paid_mediums: words(&[
                "cpc",
                "ppc",
                "paid",
                "paidsearch",
                "paid_search",
                "paid-search",
                "sem",
                "cpm_search",
                "paidsocial",
                "paid_social",
                "paid-social",
            ]),
            display_mediums: words(&["display", "banner", "cpm", "programmatic"]),
            own_domains: Vec::new(),
        }
    }
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
            // reports see new events within seconds, from a few partial rows per key
            rollup_commit_interval_ms: 5_000,
            // reports read about one row per key and hour soon after it is written
            rollup_compaction_interval_secs: 20,
            events_compaction_min_files: 10,
            page_categories: default_page_categories(),
            max_events_per_visitor_day: 40,
            channels: ChannelRules::default(),
            goals: Vec::new(),
            funnels: Vec::new(),
        }
    }
}

impl ProcessConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        positive("process.batch_max_events", self.batch_max_events as u64)?;
        positive("process.batch_max_interval_ms", self.batch_max_interval_ms)?;
        positive(
            "process.max_events_per_visitor_day",
            u64::from(self.max_events_per_visitor_day),
        )?;
        positive(
            "process.rollup_compaction_interval_secs",
            self.rollup_compaction_interval_secs,
        )?;
        if self.goals.len() > MAX_GOALS || self.funnels.len() > MAX_FUNNELS {
            return Err(crate::ConfigError::Invalid {
                key: "process.goals",
                reason: format!("at most {MAX_GOALS} goals and {MAX_FUNNELS} funnels"),
            });
        }
        let mut ids = std::collections::HashSet::new();
        for goal in &self.goals {
            check_id("process.goals", &goal.id, &mut ids)?;
            check_match("process.goals", &goal.id, &goal.event())?;
        }
        let mut ids = std::collections::HashSet::new();
        for funnel in &self.funnels {
            check_id("process.funnels", &funnel.id, &mut ids)?;
            if !(2..=MAX_FUNNEL_STEPS).contains(&funnel.steps.len()) {
                return Err(crate::ConfigError::Invalid {
                    key: "process.funnels",
                    reason: format!(
                        "funnel `{}` has {} steps: 2 to {MAX_FUNNEL_STEPS}",
                        funnel.id,
                        funnel.steps.len()
                    ),
                });
            }
            for step in &funnel.steps {
                check_match("process.funnels", &funnel.id, step)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn goal(id: &str) -> GoalDefinition {
        GoalDefinition {
            id: id.into(),
            description: String::new(),
            event_type: Some("signup".into()),
            page_category: None,
            path: None,
            campaign_id: None,
        }
    }

    #[test]
    fn goals_and_funnels_are_checked_with_the_key_named() {
        let mut config = ProcessConfig {
            goals: vec![goal("signed-up"), goal("signed-up")],
            ..ProcessConfig::default()
        };
        let err = config.validate().map(|_| ()).map_err(|e| e.to_string());
        assert!(
            err.as_ref()
                .is_err_and(|e| e.contains("process.goals") && e.contains("twice")),
            "{err:?}"
        );
        config.goals = vec![goal("Signed Up")];
        assert!(config.validate().is_err(), "an id with capitals and a space");
        config.goals = vec![goal("signed-up")];
        config.funnels = vec![FunnelDefinition {
            id: "one-step".into(),
            description: String::new(),
            steps: vec![EventMatch::default()],
        }];
        let err = config.validate().map(|_| ()).map_err(|e| e.to_string());
        assert!(err.as_ref().is_err_and(|e| e.contains("2 to 8")), "{err:?}");
        config.funnels[0].steps.push(EventMatch::default());
        let err = config.validate().map(|_| ()).map_err(|e| e.to_string());
        assert!(
            err.as_ref().is_err_and(|e| e.contains("at least one")),
            "a step matching everything: {err:?}"
        );
        let signup = EventMatch {
            event_type: Some("signup".into()),
            ..EventMatch::default()
        };
        config.funnels[0].steps = vec![signup.clone(), signup];
        assert!(config.validate().is_ok());
        config.goals[0].event_type = Some("sign_up".into());
        let err = config.validate().map(|_| ()).map_err(|e| e.to_string());
        assert!(
            err.as_ref().is_err_and(|e| e.contains("unknown event_type `sign_up`")),
            "{err:?}"
        );
    }
}
