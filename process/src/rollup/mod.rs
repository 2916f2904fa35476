//! The rollup tables (`traffic_hourly`, `ad_performance_hourly`,
//! `demographics_daily`, `sources_hourly`, `pages_hourly`, `goals_hourly`,
//! `funnels_hourly`), written by the processor after the `events` commits
//! they count (at most every `process.rollup_commit_interval_ms`), with the
//! log positions of those commits recorded in the same transaction.
//!
//! Each commit appends *partial* aggregates of the events it covers; rows with
//! the same key add up (`SUM` the counts, `hll_merge` the visitor sketches).
//! A table that lags `events` after a crash is caught up from the `events`
//! commits it has not seen, so every stored event is counted exactly once.
//! Bots are left out: reports are about people.

mod ad;
mod catch_up;
mod clamp;
mod compaction;
mod demographics;
mod goals;
mod live;
mod pages;
mod rows;
mod sources;
mod traffic;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use marsad_schemas::{
    DATE_COLUMN, TableName, ad_performance_hourly_schema, demographics_daily_schema, funnels_hourly_schema,
    goals_hourly_schema, pages_hourly_schema, sources_hourly_schema, traffic_hourly_schema,
};

use crate::table::{DeltaSink, TableSpec};
use crate::{Error, Result};
use ad::AdRollup;
use demographics::DemographicsRollup;
use goals::{EventMatcher, FunnelsRollup, GoalsRollup};
use pages::PagesRollup;
use sources::SourcesRollup;
use traffic::TrafficRollup;

pub use catch_up::CatchUp;
pub(crate) use catch_up::oldest_version_to_keep;
pub use compaction::{CompactedDate, PartialRowMerger, compact};
pub use live::{LiveWindow, OTHER_PAGES};
pub use rows::EventRows;
#[cfg(test)]
pub(crate) use rows::test_batch;

/// One rollup: what it aggregates from `events` rows and how it becomes a batch.
pub(crate) trait Rollup: Send + Sync {
    /// Adds rows (already filtered to those this table has not counted).
    fn add(&mut self, rows: &EventRows, which: &[usize]);
    /// The partial aggregates since the last call, as a batch (possibly empty).
    fn take(&mut self) -> Result<RecordBatch>;
    /// Forgets the cells dated outside `first..=last` (days since 1970): a rebuild of those
    /// days needs no others, and keeps memory to the keys of its range.
    fn retain_days(&mut self, first: i32, last: i32);
    /// Starts the clamp of `visitor` on `day` (days since 1970) from what `events` holds of it
    /// (`events` of any type, `ad_events` impressions and clicks), after a restart.
    fn preload_clamp(&mut self, day: i32, visitor: &str, events: u64, ad_events: u64);
    /// Follows the sessions of stored rows without counting them (but those in `skip`).
    fn replay_sessions(&mut self, _batch: &RecordBatch, _skip: &crate::dedup::IdFingerprints) -> Result<()> {
        Ok(())
    }
}

/// What the rollups are configured with: how many events of one visitor a day count, and how
/// sessions are put in channels.
#[derive(Clone)]
pub struct RollupRules {
    /// Events of one visitor a day counted at most, in each table (the clamp).
    pub max_per_visitor_day: u32,
    /// The channel grouping of `sources_hourly`.
    pub channels: Arc<crate::channel::ChannelGrouping>,
    /// The goals of `goals_hourly`, by id.
    goals: Arc<Vec<(String, EventMatcher)>>,
    /// The funnels of `funnels_hourly`, by id, with their steps.
    funnels: Arc<Vec<(String, Vec<EventMatcher>)>>,
}

impl RollupRules {
    /// The rules of `config`.
    pub fn of(config: &marsad_config::ProcessConfig) -> Self {
        RollupRules {
            max_per_visitor_day: config.max_events_per_visitor_day,
            channels: Arc::new(crate::channel::ChannelGrouping::new(&config.channels)),
            goals: Arc::new(goals::goal_matchers(&config.goals)),
            funnels: Arc::new(goals::funnel_matchers(&config.funnels)),
        }
    }

    /// The default channel grouping, no goal and no funnel, with a clamp of `max_per_visitor_day`.
    pub fn with_clamp(max_per_visitor_day: u32) -> Self {
        RollupRules {
            max_per_visitor_day,
            channels: Arc::default(),
            goals: Arc::default(),
            funnels: Arc::default(),
        }
    }
}

/// An empty aggregator of rollup `table` under `rules`.
pub(crate) fn new_rollup(table: TableName, rules: &RollupRules) -> Box<dyn Rollup> {
    let clamp = clamp::VisitorDayClamp::new(rules.max_per_visitor_day);
    match table {
        TableName::TrafficHourly => Box::new(TrafficRollup::new(clamp)),
        TableName::AdPerformanceHourly => Box::new(AdRollup::new(clamp)),
        TableName::SourcesHourly => Box::new(SourcesRollup::new(clamp, rules.channels.clone())),
        TableName::PagesHourly => Box::new(PagesRollup::new(clamp)),
        TableName::GoalsHourly => Box::new(GoalsRollup::new(clamp, rules.goals.clone())),
        TableName::FunnelsHourly => Box::new(FunnelsRollup::new(clamp, rules.funnels.clone())),
        _ => Box::new(DemographicsRollup::new(clamp)),
    }
}

/// The specs of the rollup tables, in the order they commit (that of `TableName::ALL`: the
/// query catalog reads them in reverse so no rollup is newer than one committed before it).
pub fn rollup_specs() -> [TableSpec; 7] {
    [
        TableSpec {
            name: TableName::TrafficHourly,
            schema: traffic_hourly_schema(),
            partitions: &[DATE_COLUMN],
            comment: "Hourly traffic partial aggregates: SUM the counts, hll_merge the visitors",
        },
        TableSpec {
            name: TableName::AdPerformanceHourly,
            schema: ad_performance_hourly_schema(),
            partitions: &[DATE_COLUMN],
            comment: "Hourly ad partial aggregates: SUM the counts, hll_merge the visitors",
        },
        TableSpec {
            name: TableName::DemographicsDaily,
            schema: demographics_daily_schema(),
            partitions: &[DATE_COLUMN],
            comment: "Daily demographics partial aggregates: SUM the events, hll_merge the visitors",
        },
        TableSpec {
            name: TableName::SourcesHourly,
            schema: sources_hourly_schema(),
            partitions: &[DATE_COLUMN],
            comment: "Hourly sessions by landing source partial aggregates: SUM the counts, hll_merge the visitors",
        },
        TableSpec {
            name: TableName::PagesHourly,
            schema: pages_hourly_schema(),
            partitions: &[DATE_COLUMN],
            comment: "Hourly page views, entries and exits partial aggregates: SUM the counts, hll_merge the visitors",
        },
        TableSpec {
            name: TableName::GoalsHourly,
            schema: goals_hourly_schema(),
            partitions: &[DATE_COLUMN],
            comment: "Hourly goal conversions partial aggregates: SUM the counts, hll_merge the visitors",
        },
        TableSpec {
            name: TableName::FunnelsHourly,
            schema: funnels_hourly_schema(),
            partitions: &[DATE_COLUMN],
            comment: "Hourly funnel steps reached per session partial aggregates: SUM the counts, hll_merge the visitors",
        },
    ]
}

struct RollupTable {
    name: TableName,
    sink: DeltaSink,
    rollup: Box<dyn Rollup>,
    /// Last offset counted per log-position app id.
    covered: HashMap<String, i64>,
    /// A batch whose commit failed, retried before anything newer.
    pending: Option<RecordBatch>,
}

impl RollupTable {
    /// Whether this table has not counted some of `positions`.
    fn behind(&self, positions: &[(String, i64)]) -> bool {
        positions
            .iter()
            .any(|(app, p)| self.covered.get(app).is_none_or(|c| c < p))
    }
}

/// Where a simulated crash stops a commit, for the crash tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the `events` commit, before any rollup commit.
    AfterEvents,
    /// After this many rollup tables have committed.
    AfterRollups(usize),
}

/// The rollup tables and what they have counted.
pub struct Rollups {
    tables: Vec<RollupTable>,
    /// What a new aggregator is made with.
    rules: RollupRules,
}

impl Rollups {
    /// Opens (or creates) the rollup tables and reads the positions they cover for `app_ids`;
    /// each aggregates under `rules`.
    pub async fn open(
        location: &marsad_config::TablesLocation,
        app_ids: &[String],
        rules: RollupRules,
    ) -> Result<Self> {
        let mut tables = Vec::new();
        for spec in rollup_specs() {
            let mut sink = DeltaSink::open_or_create(location, &spec).await?;
            let covered = sink.committed(app_ids).await?;
            let rollup = new_rollup(spec.name, &rules);
            tables.push(RollupTable {
                name: spec.name,
                sink,
                rollup,
                covered,
                pending: None,
            });
        }
        Ok(Rollups { tables, rules })
    }

    /// Adds the rows of an `events` commit covering `positions` to every table that has not
    /// counted them.
    pub fn add(&mut self, batch: &RecordBatch, positions: &[(String, i64)]) -> Result<()> {
        self.add_to(batch, |t| t.behind(positions))
    }

    /// [`add`](Rollups::add) for rows already read, with the rows the rollups count.
    pub(crate) fn add_rows(&mut self, rows: &EventRows, counted: &[usize], positions: &[(String, i64)]) {
        self.add_rows_to(rows, counted, |t| t.behind(positions));
    }

    /// Adds the rows of `batch` to every table `which` picks.
    fn add_to(&mut self, batch: &RecordBatch, which: impl Fn(&RollupTable) -> bool) -> Result<()> {
        let rows = EventRows::new(batch)?;
        let counted: Vec<usize> = (0..rows.len()).filter(|&i| rows.counted(i)).collect();
        self.add_rows_to(&rows, &counted, which);
        Ok(())
    }

    fn add_rows_to(&mut self, rows: &EventRows, counted: &[usize], which: impl Fn(&RollupTable) -> bool) {
        for t in &mut self.tables {
            if which(t) {
                t.rollup.add(rows, counted);
            }
        }
    }

    /// Commits what was added, recording `positions`, table by table.
    pub async fn commit(&mut self, positions: &[(String, i64)], crash: Option<CrashPoint>) -> Result<()> {
        for (n, t) in self.tables.iter_mut().enumerate() {
            if crash == Some(CrashPoint::AfterRollups(n)) {
                return Err(Error::SimulatedCrash);
            }
            let behind: Vec<(String, i64)> = positions
                .iter()
                .filter(|(app, p)| t.covered.get(app).is_none_or(|c| c < p))
                .cloned()
                .collect();
            if behind.is_empty() {
                continue;
            }
            let batch = match t.pending.take() {
                Some(b) => b,
                None => t.rollup.take()?,
            };
            // (a compaction of this table committed meanwhile is retried by the sink)
            if let Err(e) = t.sink.append(batch.clone(), &behind).await {
                t.pending = Some(batch);
                return Err(e);
            }
            t.covered.extend(behind);
        }
        Ok(())
    }
}
