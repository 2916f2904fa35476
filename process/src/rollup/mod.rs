//! The rollup tables (`traffic_hourly`, `ad_performance_hourly`,
//! `demographics_daily`), written by the processor right after each `events`
//! commit, with the same log positions recorded in the same transaction.
//!
//! Each commit appends *partial* aggregates of the events it covers; rows with
//! the same key add up (`SUM` the counts, `hll_merge` the visitor sketches).
//! A table that lags `events` after a crash is caught up from the `events`
//! commits it has not seen, so every stored event is counted exactly once.
//! Bots are left out: reports are about people.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryBuilder, BooleanArray, Date32Builder, Int64Builder, StringArray, StringBuilder,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use datasketches::hll::{HllSketch, HllType};
use deltalake::DeltaTable;
use marsad_schemas::{
    DATE_COLUMN, HLL_LG_K, TableName, ad_performance_hourly_schema, demographics_daily_schema, traffic_hourly_schema,
};
use object_store::ObjectStoreExt;

use crate::sessions::SESSION_GAP_MINUTES;
use crate::table::{DeltaSink, TableSpec};
use crate::{Error, Result};

const MICROS_PER_HOUR: i64 = 3_600_000_000;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;
/// Sessions idle this long (event time) are forgotten by the rollup; longer than the
/// processor's 30-minute gap, so a session the processor continues is never counted twice.
const SESSION_MEMORY_MICROS: i64 = 4 * SESSION_GAP_MINUTES * 60_000_000;

/// The columns of `events` the rollups read, in [`Col`] order.
const COLUMNS: [&str; 16] = [
    "event_type",
    "visitor_key",
    "session_id",
    "country",
    "region",
    "device_type",
    "os",
    "browser",
    "language",
    "page_category",
    "referrer_domain",
    "campaign_id",
    "ad_id",
    "placement",
    "age_band",
    "gender",
];

#[derive(Clone, Copy)]
enum Col {
    EventType = 0,
    VisitorKey,
    SessionId,
    Country,
    Region,
    DeviceType,
    Os,
    Browser,
    Language,
    PageCategory,
    ReferrerDomain,
    CampaignId,
    AdId,
    Placement,
    AgeBand,
    Gender,
}

/// `events` rows as the rollups read them, whatever string encoding the batch came in.
pub struct EventRows {
    ts: TimestampMicrosecondArray,
    strings: Vec<StringArray>,
    is_bot: BooleanArray,
    event_id: StringArray,
}

fn utf8(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("events batch without `{name}`")))?;
    let cast = arrow::compute::cast(col, &DataType::Utf8)?;
    cast.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .ok_or_else(|| Error::Arrow(arrow::error::ArrowError::CastError(format!("`{name}` is not text"))))
}

impl EventRows {
    /// Reads the rollup columns of an `events` batch.
    pub fn new(batch: &RecordBatch) -> Result<Self> {
        let missing = |name: &str| arrow::error::ArrowError::SchemaError(format!("events batch without `{name}`"));
        let ts = batch.column_by_name("ts").ok_or_else(|| missing("ts"))?;
        let ts = arrow::compute::cast(ts, &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())))?;
        let ts = ts
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .cloned()
            .ok_or_else(|| missing("ts"))?;
        let is_bot = batch.column_by_name("is_bot").ok_or_else(|| missing("is_bot"))?;
        let is_bot = is_bot
            .as_any()
            .downcast_ref::<BooleanArray>()
            .cloned()
            .ok_or_else(|| missing("is_bot"))?;
        let strings = COLUMNS.iter().map(|c| utf8(batch, c)).collect::<Result<Vec<_>>>()?;
        Ok(EventRows {
            ts,
            strings,
            is_bot,
            event_id: utf8(batch, "event_id")?,
        })
    }

    fn len(&self) -> usize {
        self.ts.len()
    }

    fn get(&self, col: Col, row: usize) -> Option<&str> {
        let a = &self.strings[col as usize];
        (!a.is_null(row)).then(|| a.value(row))
    }

    fn owned(&self, col: Col, row: usize) -> Option<String> {
        self.get(col, row).map(str::to_owned)
    }

    fn counted(&self, row: usize) -> bool {
        !(self.is_bot.is_valid(row) && self.is_bot.value(row))
    }

    fn event_id(&self, row: usize) -> &str {
        self.event_id.value(row)
    }
}

fn new_sketch() -> HllSketch {
    // HLL_LG_K is within the sketch's range, so this cannot fail; fall back to the smallest anyway
    HllSketch::new(HLL_LG_K, HllType::Hll8)
        .or_else(|_| HllSketch::new(4, HllType::Hll8))
        .unwrap_or_else(|_| unreachable!("lg_k 4 is valid"))
}

/// One rollup: what it aggregates from `events` rows and how it becomes a batch.
trait Rollup: Send + Sync {
    /// Adds rows (already filtered to those this table has not counted).
    fn add(&mut self, rows: &EventRows, which: &[usize]);
    /// The partial aggregates since the last call, as a batch (possibly empty).
    fn take(&mut self) -> Result<RecordBatch>;
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TrafficKey {
    hour: i64,
    dims: [Option<String>; 8],
    event_type: String,
}

struct TrafficCell {
    events: i64,
    sessions: i64,
    bounces: i64,
    session_seconds: i64,
    visitors: HllSketch,
}

impl Default for TrafficCell {
    fn default() -> Self {
        TrafficCell {
            events: 0,
            sessions: 0,
            bounces: 0,
            session_seconds: 0,
            visitors: new_sketch(),
        }
    }
}

struct OpenSession {
    start: TrafficKey,
    events: u32,
    first: i64,
    last: i64,
}

/// `traffic_hourly`, with sessions: a session counts in the hour and dimensions of its first
/// event, its duration and bounce (a single event) are added there as later events arrive.
#[derive(Default)]
struct TrafficRollup {
    cells: HashMap<TrafficKey, TrafficCell>,
    open: HashMap<String, OpenSession>,
    watermark: i64,
}

impl TrafficRollup {
    fn key(rows: &EventRows, i: usize) -> TrafficKey {
        let ts = rows.ts.value(i);
        TrafficKey {
            hour: ts - ts.rem_euclid(MICROS_PER_HOUR),
            dims: [
                rows.owned(Col::Country, i),
                rows.owned(Col::Region, i),
                rows.owned(Col::DeviceType, i),
                rows.owned(Col::Os, i),
                rows.owned(Col::Browser, i),
                rows.owned(Col::Language, i),
                rows.owned(Col::PageCategory, i),
                rows.owned(Col::ReferrerDomain, i),
            ],
            event_type: rows.get(Col::EventType, i).unwrap_or("custom").to_owned(),
        }
    }

    /// Follows sessions; with `emit`, adds what the row changes to the cells.
    fn observe(&mut self, rows: &EventRows, i: usize, emit: bool) {
        let ts = rows.ts.value(i);
        let key = Self::key(rows, i);
        if emit {
            let cell = self.cells.entry(key.clone()).or_default();
            cell.events += 1;
            if let Some(v) = rows.get(Col::VisitorKey, i) {
                cell.visitors.update(v);
            }
        }
        self.watermark = self.watermark.max(ts);
        let Some(session) = rows.get(Col::SessionId, i) else {
            return;
        };
        match self.open.get_mut(session) {
            None => {
                self.open.insert(
                    session.to_owned(),
                    OpenSession {
                        start: key.clone(),
                        events: 1,
                        first: ts,
                        last: ts,
                    },
                );
                if emit {
                    let cell = self.cells.entry(key).or_default();
                    cell.sessions += 1;
                    cell.bounces += 1;
                }
            }
            Some(open) => {
                open.events += 1;
                // whole seconds of the session so far, so the increments add up to its duration
                let before = (open.last - open.first) / 1_000_000;
                open.first = open.first.min(ts);
                open.last = open.last.max(ts);
                let longer = (open.last - open.first) / 1_000_000 - before;
                if emit {
                    let second = open.events == 2;
                    let cell = self.cells.entry(open.start.clone()).or_default();
                    if second {
                        cell.bounces -= 1;
                    }
                    cell.session_seconds += longer;
                }
            }
        }
    }

    fn forget_idle(&mut self) {
        let cutoff = self.watermark - SESSION_MEMORY_MICROS;
        self.open.retain(|_, s| s.last >= cutoff);
    }
}

impl Rollup for TrafficRollup {
    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            self.observe(rows, i, true);
        }
        self.forget_idle();
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let mut hour = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut date = Date32Builder::new();
        let mut dims: Vec<StringBuilder> = (0..8).map(|_| StringBuilder::new()).collect();
        let mut event_type = StringBuilder::new();
        let mut counts: Vec<Int64Builder> = (0..4).map(|_| Int64Builder::new()).collect();
        let mut visitors = BinaryBuilder::new();
        for (k, c) in cells {
            hour.append_value(k.hour);
            date.append_value(k.hour.div_euclid(MICROS_PER_DAY) as i32);
            for (b, v) in dims.iter_mut().zip(&k.dims) {
                b.append_option(v.as_deref());
            }
            event_type.append_value(&k.event_type);
            for (b, v) in counts
                .iter_mut()
                .zip([c.events, c.sessions, c.bounces, c.session_seconds])
            {
                b.append_value(v);
            }
            visitors.append_value(c.visitors.serialize());
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(hour.finish()), Arc::new(date.finish())];
        columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(event_type.finish()));
        columns.extend(counts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(visitors.finish()));
        Ok(RecordBatch::try_new(traffic_hourly_schema(), columns)?)
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct AdKey {
    hour: i64,
    dims: [Option<String>; 5],
}

struct AdCell {
    impressions: i64,
    clicks: i64,
    visitors: HllSketch,
}

/// `ad_performance_hourly`: impressions and clicks of the ads.
#[derive(Default)]
struct AdRollup {
    cells: HashMap<AdKey, AdCell>,
}

impl Rollup for AdRollup {
    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            let (impression, click) = match rows.get(Col::EventType, i) {
                Some("ad_impression") => (1, 0),
                Some("ad_click") => (0, 1),
                _ => continue,
            };
            let ts = rows.ts.value(i);
            let key = AdKey {
                hour: ts - ts.rem_euclid(MICROS_PER_HOUR),
                dims: [
                    rows.owned(Col::CampaignId, i),
                    rows.owned(Col::AdId, i),
                    rows.owned(Col::Placement, i),
                    rows.owned(Col::Country, i),
                    rows.owned(Col::DeviceType, i),
                ],
            };
            let cell = self.cells.entry(key).or_insert_with(|| AdCell {
                impressions: 0,
                clicks: 0,
                visitors: new_sketch(),
            });
            cell.impressions += impression;
            cell.clicks += click;
            if let Some(v) = rows.get(Col::VisitorKey, i) {
                cell.visitors.update(v);
            }
        }
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let mut hour = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        let mut date = Date32Builder::new();
        let mut dims: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let mut impressions = Int64Builder::new();
        let mut clicks = Int64Builder::new();
        let mut visitors = BinaryBuilder::new();
        for (k, c) in cells {
            hour.append_value(k.hour);
            date.append_value(k.hour.div_euclid(MICROS_PER_DAY) as i32);
            for (b, v) in dims.iter_mut().zip(&k.dims) {
                b.append_option(v.as_deref());
            }
            impressions.append_value(c.impressions);
            clicks.append_value(c.clicks);
            visitors.append_value(c.visitors.serialize());
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(hour.finish()), Arc::new(date.finish())];
        columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(impressions.finish()));
        columns.push(Arc::new(clicks.finish()));
        columns.push(Arc::new(visitors.finish()));
        Ok(RecordBatch::try_new(ad_performance_hourly_schema(), columns)?)
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct DemographicsKey {
    day: i32,
    dims: [Option<String>; 5],
}

struct DemographicsCell {
    events: i64,
    visitors: HllSketch,
}

/// `demographics_daily`: declared age band and gender (null when undeclared) by place and category.
#[derive(Default)]
struct DemographicsRollup {
    cells: HashMap<DemographicsKey, DemographicsCell>,
}

impl Rollup for DemographicsRollup {
    fn add(&mut self, rows: &EventRows, which: &[usize]) {
        for &i in which {
            let key = DemographicsKey {
                day: rows.ts.value(i).div_euclid(MICROS_PER_DAY) as i32,
                dims: [
                    rows.owned(Col::Country, i),
                    rows.owned(Col::Region, i),
                    rows.owned(Col::AgeBand, i),
                    rows.owned(Col::Gender, i),
                    rows.owned(Col::PageCategory, i),
                ],
            };
            let cell = self.cells.entry(key).or_insert_with(|| DemographicsCell {
                events: 0,
                visitors: new_sketch(),
            });
            cell.events += 1;
            if let Some(v) = rows.get(Col::VisitorKey, i) {
                cell.visitors.update(v);
            }
        }
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let cells = std::mem::take(&mut self.cells);
        let mut date = Date32Builder::new();
        let mut dims: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
        let mut events = Int64Builder::new();
        let mut visitors = BinaryBuilder::new();
        for (k, c) in cells {
            date.append_value(k.day);
            for (b, v) in dims.iter_mut().zip(&k.dims) {
                b.append_option(v.as_deref());
            }
            events.append_value(c.events);
            visitors.append_value(c.visitors.serialize());
        }
        let mut columns: Vec<ArrayRef> = vec![Arc::new(date.finish())];
        columns.extend(dims.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(events.finish()));
        columns.push(Arc::new(visitors.finish()));
        Ok(RecordBatch::try_new(demographics_daily_schema(), columns)?)
    }
}

fn new_rollup(table: TableName) -> Box<dyn Rollup> {
    match table {
        TableName::TrafficHourly => Box::new(TrafficRollup::default()),
        TableName::AdPerformanceHourly => Box::new(AdRollup::default()),
        _ => Box::new(DemographicsRollup::default()),
    }
}

/// The rows of rollup `table` over `batches` of `events` rows in log order, from scratch:
/// how a backfill rebuilds a rollup from rebuilt events.
pub fn aggregate(table: TableName, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let mut rollup = new_rollup(table);
    for batch in batches {
        let rows = EventRows::new(batch)?;
        let counted: Vec<usize> = (0..rows.len()).filter(|&i| rows.counted(i)).collect();
        rollup.add(&rows, &counted);
    }
    rollup.take()
}

/// The specs of the rollup tables.
pub fn rollup_specs() -> [TableSpec; 3] {
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
    ]
}

struct RollupTable {
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

/// The three rollup tables and what they have counted.
pub struct Rollups {
    tables: Vec<RollupTable>,
}

/// An `events` commit as the catch-up reads it.
struct EventsCommit {
    positions: HashMap<String, i64>,
    files: Vec<String>,
}

impl Rollups {
    /// Opens (or creates) the rollup tables and reads the positions they cover for `app_ids`.
    pub async fn open(location: &marsad_config::TablesLocation, app_ids: &[String]) -> Result<Self> {
        let mut tables = Vec::new();
        for spec in rollup_specs() {
            let mut sink = DeltaSink::open_or_create(location, &spec).await?;
            let covered = sink.committed(app_ids).await?;
            let rollup = new_rollup(spec.name);
            tables.push(RollupTable {
                sink,
                rollup,
                covered,
                pending: None,
            });
        }
        Ok(Rollups { tables })
    }

    /// Adds the rows of an `events` commit covering `positions` to every table that has not
    /// counted them.
    pub fn add(&mut self, batch: &RecordBatch, positions: &[(String, i64)]) -> Result<()> {
        let rows = EventRows::new(batch)?;
        let counted: Vec<usize> = (0..rows.len()).filter(|&i| rows.counted(i)).collect();
        for t in &mut self.tables {
            if t.behind(positions) {
                t.rollup.add(&rows, &counted);
            }
        }
        Ok(())
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
            if let Err(e) = t.sink.append(batch.clone(), &behind).await {
                t.pending = Some(batch);
                return Err(e);
            }
            t.covered.extend(behind);
        }
        Ok(())
    }

    /// Counts what `events` holds beyond what the rollups have counted (after a crash between
    /// the commits), and rebuilds the open sessions; returns how many events it caught up.
    pub async fn catch_up(&mut self, events: &DeltaSink, events_positions: &HashMap<String, i64>) -> Result<usize> {
        let lagging: HashMap<String, i64> = events_positions
            .iter()
            .filter_map(|(app, &e)| {
                let lowest = self
                    .tables
                    .iter()
                    .map(|t| t.covered.get(app).copied().unwrap_or(-1))
                    .min()?;
                (lowest < e).then(|| (app.clone(), lowest))
            })
            .collect();
        let commits = if lagging.is_empty() {
            Vec::new()
        } else {
            uncounted_commits(events.table(), &lagging).await?
        };
        let mut batches = Vec::new();
        for commit in &commits {
            let mut read = Vec::new();
            for file in &commit.files {
                read.extend(read_data_file(events.table(), file).await?);
            }
            batches.push((commit, read));
        }
        // the open sessions as of what traffic_hourly counted: recent rows but those it counts now
        let mut skip = HashSet::new();
        let traffic_behind = |commit: &EventsCommit| {
            self.tables.first().is_some_and(|t| {
                t.behind(
                    &commit
                        .positions
                        .iter()
                        .map(|(a, p)| (a.clone(), *p))
                        .collect::<Vec<_>>(),
                )
            })
        };
        for (commit, read) in &batches {
            if !traffic_behind(commit) {
                continue;
            }
            for b in read {
                let rows = EventRows::new(b)?;
                skip.extend((0..rows.len()).map(|i| rows.event_id(i).to_owned()));
            }
        }
        self.restore_sessions(events, &skip).await?;
        let mut caught_up = 0;
        for (commit, read) in batches {
            let positions: Vec<(String, i64)> = commit.positions.iter().map(|(a, p)| (a.clone(), *p)).collect();
            for b in &read {
                self.add(b, &positions)?;
                caught_up += b.num_rows();
            }
            self.commit(&positions, None).await?;
        }
        Ok(caught_up)
    }

    async fn restore_sessions(&mut self, events: &DeltaSink, skip: &HashSet<String>) -> Result<()> {
        let Some(traffic) = self.tables.first_mut() else {
            return Ok(());
        };
        if events.version().is_none_or(|v| v == 0) {
            return Ok(());
        }
        let cols = COLUMNS.join(", ");
        let sql = format!(
            "WITH latest AS (SELECT max(ts) AS ts, max({DATE_COLUMN}) AS day FROM events) \
             SELECT event_id, ts, is_bot, {cols} FROM events \
             WHERE NOT is_bot AND {DATE_COLUMN} >= (SELECT day FROM latest) - INTERVAL '1' DAY \
             AND session_id IN (SELECT session_id FROM events WHERE session_id IS NOT NULL \
               AND {DATE_COLUMN} >= (SELECT day FROM latest) - INTERVAL '1' DAY GROUP BY session_id \
               HAVING max(ts) >= (SELECT ts FROM latest) - INTERVAL '{} minutes') \
             ORDER BY ts",
            SESSION_MEMORY_MICROS / 60_000_000
        );
        let rollup = TrafficRollup::restore(events.query(&sql, None).await?, skip)?;
        traffic.rollup = Box::new(rollup);
        Ok(())
    }
}

impl TrafficRollup {
    fn restore(batches: Vec<RecordBatch>, skip: &HashSet<String>) -> Result<Self> {
        let mut rollup = TrafficRollup::default();
        for b in &batches {
            let rows = EventRows::new(b)?;
            for i in 0..rows.len() {
                if !skip.contains(rows.event_id(i)) {
                    rollup.observe(&rows, i, false);
                }
            }
        }
        rollup.forget_idle();
        Ok(rollup)
    }
}

/// The appends to `events` (newest last) that cover positions beyond `counted` per app id.
async fn uncounted_commits(table: &DeltaTable, counted: &HashMap<String, i64>) -> Result<Vec<EventsCommit>> {
    let delta = |source| Error::Delta {
        table: "events",
        source,
    };
    let Some(latest) = table.version() else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    let mut settled: HashSet<&str> = HashSet::new();
    let mut version = latest as i64;
    while version >= 0 && settled.len() < counted.len() {
        let Some(bytes) = table.log_store().read_commit_entry(version as _).await.map_err(delta)? else {
            break; // older commits were cleaned up
        };
        version -= 1;
        let mut commit = EventsCommit {
            positions: HashMap::new(),
            files: Vec::new(),
        };
        let mut append = false;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(op) = action.pointer("/commitInfo/operation").and_then(|v| v.as_str()) {
                append = op == "WRITE";
            }
            if let (Some(app), Some(v)) = (
                action.pointer("/txn/appId").and_then(|v| v.as_str()),
                action.pointer("/txn/version").and_then(|v| v.as_i64()),
            ) {
                commit.positions.insert(app.to_owned(), v);
            }
            if let Some(path) = action.pointer("/add/path").and_then(|v| v.as_str()) {
                commit.files.push(path.to_owned());
            }
        }
        if !append {
            continue;
        }
        let mut needed = false;
        for (app, &p) in &commit.positions {
            if let Some((name, &c)) = counted.get_key_value(app.as_str()) {
                if p > c {
                    needed = true;
                } else {
                    settled.insert(name.as_str());
                }
            }
        }
        if needed {
            found.push(commit);
        }
    }
    found.reverse();
    Ok(found)
}

/// The rows of one data file of `events` (vacuumed files, erased since, are skipped).
async fn read_data_file(table: &DeltaTable, path: &str) -> Result<Vec<RecordBatch>> {
    let location = deltalake::Path::from_url_path(path).map_err(|e| Error::Delta {
        table: "events",
        source: deltalake::DeltaTableError::Generic(format!("data file path {path}: {e}")),
    })?;
    let bytes = match table.object_store().get(&location).await {
        Ok(got) => got.bytes().await,
        Err(e) => Err(e),
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(deltalake::ObjectStoreError::NotFound { .. }) => {
            tracing::warn!(
                path,
                "an events file the rollups had not counted is gone (erased); skipping it"
            );
            return Ok(Vec::new());
        }
        Err(e) => {
            return Err(Error::Delta {
                table: "events",
                source: e.into(),
            });
        }
    };
    let reader = deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| Error::Delta {
            table: "events",
            source: e.into(),
        })?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// What a compaction did to one date of one rollup table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompactedDate {
    /// The table.
    pub table: &'static str,
    /// The `date` partition.
    pub date: String,
    /// Data files before.
    pub files: usize,
    /// Partial rows before.
    pub rows_before: usize,
    /// Rows after: one per key.
    pub rows_after: usize,
}

/// Merges the partial rows of every date partition of the rollup tables that has at least
/// `min_files` files into one row per key (counts summed, sketches merged), one commit per date.
/// Safe while the processor runs: rows it appends meanwhile are kept as they are.
pub async fn compact(tables: &marsad_config::TablesLocation, min_files: usize) -> Result<Vec<CompactedDate>> {
    let mut done = Vec::new();
    for spec in rollup_specs() {
        let mut sink = DeltaSink::open_or_create(tables, &spec).await?;
        let name = spec.name.as_str();
        for (date, files) in sink.files_per_date()? {
            if files < min_files || chrono::NaiveDate::parse_from_str(&date, "%Y-%m-%d").is_err() {
                continue;
            }
            let batches = sink
                .query(
                    &format!("SELECT * FROM {name} WHERE {DATE_COLUMN} = DATE '{date}'"),
                    None,
                )
                .await?;
            let rows_before = batches.iter().map(|b| b.num_rows()).sum();
            let merged = merge_partial_rows(&spec.schema, &batches)?;
            let rows_after = merged.num_rows();
            sink.replace_where(merged, format!("{DATE_COLUMN} = '{date}'")).await?;
            done.push(CompactedDate {
                table: name,
                date,
                files,
                rows_before,
                rows_after,
            });
        }
    }
    Ok(done)
}

/// One row per key of a rollup's partial rows: `Int64` columns summed, `Binary` sketch columns
/// merged, every other column is the key.
pub fn merge_partial_rows(schema: &arrow::datatypes::SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    use arrow::array::{Int64Array, UInt32Array};
    use arrow::row::{RowConverter, SortField};
    use datasketches::hll::HllUnion;
    // in the table's column order and types, whatever order and encodings the scan gave
    let mut aligned = Vec::new();
    for b in batches {
        let mut columns = Vec::new();
        for f in schema.fields() {
            let c = b
                .column_by_name(f.name())
                .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("rollup rows without `{}`", f.name())))?;
            columns.push(arrow::compute::cast(c, f.data_type())?);
        }
        aligned.push(RecordBatch::try_new(schema.clone(), columns)?);
    }
    let all = arrow::compute::concat_batches(schema, &aligned)?;
    let (mut keys, mut sums, mut sketches) = (Vec::new(), Vec::new(), Vec::new());
    for (i, f) in schema.fields().iter().enumerate() {
        match f.data_type() {
            DataType::Int64 => sums.push(i),
            DataType::Binary => sketches.push(i),
            _ => keys.push(i),
        }
    }
    let converter = RowConverter::new(
        keys.iter()
            .map(|&i| SortField::new(schema.field(i).data_type().clone()))
            .collect(),
    )?;
    let key_columns: Vec<ArrayRef> = keys.iter().map(|&i| all.column(i).clone()).collect();
    let rows = converter.convert_columns(&key_columns)?;
    let mut group_of = HashMap::new();
    let mut first: Vec<u32> = Vec::new();
    let mut totals: Vec<Vec<i64>> = vec![Vec::new(); sums.len()];
    let mut unions: Vec<Vec<HllUnion>> = (0..sketches.len()).map(|_| Vec::new()).collect();
    let ints: Vec<&Int64Array> = sums
        .iter()
        .filter_map(|&i| all.column(i).as_any().downcast_ref::<Int64Array>())
        .collect();
    let bins: Vec<&arrow::array::BinaryArray> = sketches
        .iter()
        .filter_map(|&i| all.column(i).as_any().downcast_ref::<arrow::array::BinaryArray>())
        .collect();
    for r in 0..all.num_rows() {
        let next = first.len();
        let g = *group_of.entry(rows.row(r).owned()).or_insert(next);
        if g == next {
            first.push(r as u32);
            totals.iter_mut().for_each(|t| t.push(0));
            for u in unions.iter_mut() {
                u.push(
                    HllUnion::new(HLL_LG_K)
                        .map_err(|e| Error::Arrow(arrow::error::ArrowError::ComputeError(format!("HLL union: {e}"))))?,
                );
            }
        }
        for (t, a) in totals.iter_mut().zip(&ints) {
            if a.is_valid(r) {
                t[g] += a.value(r);
            }
        }
        for (u, a) in unions.iter_mut().zip(&bins) {
            if a.is_valid(r) {
                let sketch = HllSketch::deserialize(a.value(r))
                    .map_err(|e| Error::Arrow(arrow::error::ArrowError::ComputeError(format!("stored sketch: {e}"))))?;
                u[g].update(&sketch);
            }
        }
    }
    let take = UInt32Array::from(first);
    let mut columns: Vec<ArrayRef> = Vec::new();
    for i in 0..schema.fields().len() {
        if let Some(k) = sums.iter().position(|&s| s == i) {
            columns.push(Arc::new(Int64Array::from(std::mem::take(&mut totals[k]))));
        } else if let Some(k) = sketches.iter().position(|&s| s == i) {
            let mut b = BinaryBuilder::new();
            for u in &unions[k] {
                b.append_value(u.to_sketch(HllType::Hll8).serialize());
            }
            columns.push(Arc::new(b.finish()));
        } else {
            columns.push(arrow::compute::take(all.column(i), &take, None)?);
        }
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BooleanBuilder, StringBuilder};
    use marsad_schemas::events_schema;

    /// An `events`-shaped batch of (visitor, session, minute, category, type) rows.
    fn batch(rows: &[(&str, &str, i64, &str, &str)]) -> RecordBatch {
        let schema = events_schema();
        let columns: Vec<ArrayRef> = schema
            .fields()
            .iter()
            .map(|f| -> ArrayRef {
                match f.name().as_str() {
                    "ts" => Arc::new(
                        TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.2 * 60_000_000))
                            .with_timezone("UTC"),
                    ),
                    "date" => Arc::new(arrow::array::Date32Array::from_iter_values(rows.iter().map(|_| 0))),
                    "is_bot" | "consent_marketing" => {
                        let mut b = BooleanBuilder::new();
                        rows.iter().for_each(|_| b.append_value(false));
                        Arc::new(b.finish())
                    }
                    name => {
                        let mut b = StringBuilder::new();
                        for (i, r) in rows.iter().enumerate() {
                            match name {
                                "event_id" => b.append_value(format!("e{i}-{}-{}", r.1, r.2)),
                                "visitor_key" => b.append_value(r.0),
                                "session_id" => b.append_value(r.1),
                                "page_category" => b.append_value(r.3),
                                "event_type" => b.append_value(r.4),
                                "country" => b.append_value("JO"),
                                _ => b.append_null(),
                            }
                        }
                        Arc::new(b.finish())
                    }
                }
            })
            .collect();
        RecordBatch::try_new(schema, columns).expect("a valid batch")
    }

    fn totals(b: &RecordBatch) -> (i64, i64, i64, i64) {
        let sum = |name: &str| {
            let a = b.column_by_name(name).expect("column");
            let a = a.as_any().downcast_ref::<arrow::array::Int64Array>().expect("int64");
            a.iter().flatten().sum::<i64>()
        };
        (sum("events"), sum("sessions"), sum("bounces"), sum("session_seconds"))
    }

    #[test]
    fn sessions_bounces_and_durations_add_up_across_batches() {
        let mut t = TrafficRollup::default();
        let first = batch(&[
            ("v1", "s1", 0, "cars", "page_view"),
            ("v2", "s2", 1, "jobs", "page_view"),
            ("v1", "s1", 5, "cars", "page_view"),
        ]);
        let rows = EventRows::new(&first).expect("rows");
        t.add(&rows, &[0, 1, 2]);
        let a = t.take().expect("batch");
        // a later batch continues s1 by 10 more minutes and opens s3
        let second = batch(&[
            ("v1", "s1", 15, "jobs", "page_view"),
            ("v3", "s3", 20, "cars", "ad_click"),
        ]);
        let rows = EventRows::new(&second).expect("rows");
        t.add(&rows, &[0, 1]);
        let b = t.take().expect("batch");
        let (ea, sa, ba, da) = totals(&a);
        let (eb, sb, bb, db) = totals(&b);
        assert_eq!(ea + eb, 5, "events");
        assert_eq!(sa + sb, 3, "sessions s1, s2, s3");
        assert_eq!(ba + bb, 2, "s2 and s3 are single-event sessions");
        assert_eq!((da + db), 15 * 60, "s1 lasted 15 minutes");
    }

    #[test]
    fn ad_rollup_counts_impressions_and_clicks_only() {
        let mut ad = AdRollup::default();
        let b = batch(&[
            ("v1", "s1", 0, "cars", "ad_impression"),
            ("v1", "s1", 1, "cars", "ad_click"),
            ("v2", "s2", 1, "cars", "page_view"),
        ]);
        ad.add(&EventRows::new(&b).expect("rows"), &[0, 1, 2]);
        let out = ad.take().expect("batch");
        let sum = |name: &str| {
            let a = out.column_by_name(name).expect("column");
            let a = a.as_any().downcast_ref::<arrow::array::Int64Array>().expect("int64");
            a.iter().flatten().sum::<i64>()
        };
        assert_eq!((sum("impressions"), sum("clicks")), (1, 1));
    }
}
