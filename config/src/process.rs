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
        )
    }
}
