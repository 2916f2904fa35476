//! Catching the rollups up with `events`: after a crash between the `events`
//! commit and the rollup commits (or when a processor takes a partition over),
//! the `events` commits a rollup has not counted are read back and counted,
//! one commit at a time and one Parquet batch at a time, so memory does not
//! grow with how far a rollup lags.
//!
//! The open sessions are rebuilt first, as of what `traffic_hourly` counted:
//! recent rows of `events` are replayed without counting, except the ones the
//! catch-up is about to count (remembered as 128-bit fingerprints, and only
//! for the recent days the replay reads).

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, Date32Array};
use deltalake::DeltaTable;
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use futures::StreamExt;
use marsad_schemas::DATE_COLUMN;
use marsad_tables::Commit;
use object_store::ObjectStoreExt;

use super::Rollups;
use super::rows::{COLUMNS, EventRows};
use super::traffic::SESSION_MEMORY_MICROS;
use crate::dedup::IdFingerprints;
use crate::table::DeltaSink;
use crate::{Error, Result};

/// Partitions of the raw topic a rebuild looks for positions of other processors in.
const MAX_PROBED_PARTITIONS: u32 = 256;

/// Rows read from a data file at a time.
const READ_BATCH_ROWS: usize = 8192;

/// What a catch-up did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    /// Events counted into the rollups that lagged.
    pub events: usize,
    /// `events` commits read back.
    pub commits: usize,
    /// The most `events` rows held in memory at once.
    pub max_rows_held: usize,
}

impl Rollups {
    /// Counts what `events` holds beyond what the rollups have counted (after a crash between
    /// the commits, or a handover), after rebuilding the open sessions.
    pub async fn catch_up(&mut self, events: &DeltaSink, events_positions: &HashMap<String, i64>) -> Result<CatchUp> {
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
            match uncounted_commits(events.table(), &lagging).await? {
                Uncounted::Commits(commits, _) => commits,
                Uncounted::Gone { version } => {
                    tracing::warn!(
                        gone_from = version,
                        "the events commits the rollups have not counted are gone from the Delta log (cleaned \
                         up after a checkpoint): rebuilding the rollups of every date from events"
                    );
                    return self.rebuild_from_events(events, events_positions).await;
                }
            }
        };
        let mut report = CatchUp {
            commits: commits.len(),
            ..CatchUp::default()
        };
        // the open sessions as of what each table counted: recent rows but those it counts now
        // (tables lag by different commits after a crash between their commits)
        let mut lags: Vec<(Vec<u64>, IdFingerprints)> = Vec::new();
        let mut skip_of = Vec::new();
        for t in &self.tables {
            let behind: Vec<&Commit> = commits.iter().filter(|c| t.behind(&c.positions)).collect();
            let versions: Vec<u64> = behind.iter().map(|c| c.version).collect();
            let at = match lags.iter().position(|(v, _)| *v == versions) {
                Some(at) => at,
                None => {
                    lags.push((versions, recent_ids(events, &behind).await?));
                    lags.len() - 1
                }
            };
            skip_of.push(at);
        }
        let skips: Vec<&IdFingerprints> = skip_of.iter().map(|&at| &lags[at].1).collect();
        self.restore_sessions(events, &skips).await?;
        self.preload_clamps(events).await?;
        for commit in &commits {
            for file in &commit.added_files {
                let Some(reader) = data_file(events.table(), file, None).await? else {
                    // rewritten since it was committed (an erasure, a compaction) and vacuumed:
                    // its other rows live on in files no uncounted commit names
                    tracing::warn!(
                        path = file.as_str(),
                        version = commit.version,
                        "an events file the rollups had not counted is gone (rewritten and vacuumed): \
                         rebuilding the rollups of every date from events"
                    );
                    return self.rebuild_from_events(events, events_positions).await;
                };
                for batch in reader {
                    let batch = batch?;
                    report.max_rows_held = report.max_rows_held.max(batch.num_rows());
                    report.events += batch.num_rows();
                    self.add(&batch, &commit.positions)?;
                }
            }
            self.commit(&commit.positions, None).await?;
        }
        Ok(report)
    }

    /// Rebuilds every rollup table from the whole of `events`, a date at a time in time order
    /// (as the processor counted them), replacing the rows of the dates `events` holds and
    /// recording `events_positions` in the same commit: no event is skipped and none counted
    /// twice. Dates `events` no longer holds (past its retention) keep their rows.
    async fn rebuild_from_events(
        &mut self,
        events: &DeltaSink,
        events_positions: &HashMap<String, i64>,
    ) -> Result<CatchUp> {
        let query = |source| Error::Query {
            table: "events",
            source,
        };
        // the rebuild counts the rows of every partition: it may record every partition's
        // position only if they are all this processor's (the local log, or a lone processor)
        let table = events.table();
        let snapshot = table.snapshot().map_err(|e| Error::Delta {
            table: "events",
            source: e,
        })?;
        let mut others = Vec::new();
        for partition in 0..MAX_PROBED_PARTITIONS {
            let app = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, partition);
            if events_positions.contains_key(&app) {
                continue;
            }
            let version = snapshot
                .transaction_version(table.log_store().as_ref(), &app)
                .await
                .map_err(|e| Error::Delta {
                    table: "events",
                    source: e,
                })?;
            if version.is_some() {
                others.push(partition);
            }
        }
        if !others.is_empty() {
            return Err(Error::Delta {
                table: "events",
                source: deltalake::DeltaTableError::Generic(format!(
                    "the events commits the rollups have not counted are gone from the Delta log, so the \
                     rollups must be rebuilt from events; that counts every partition, and partitions \
                     {others:?} are other processors': stop every processor but one (it then owns all \
                     partitions and rebuilds), or rebuild the dates with `marsad backfill`"
                )),
            });
        }
        let mut report = CatchUp::default();
        let mut dates = Vec::new();
        let mut stream = events
            .query_stream(&format!(
                "SELECT DISTINCT {DATE_COLUMN} FROM events ORDER BY {DATE_COLUMN}"
            ))
            .await?;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(query)?;
            let column = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
            let column = column
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .ok_or_else(|| arrow::error::ArrowError::SchemaError("dates as text".into()))?;
            dates.extend(column.iter().flatten().map(str::to_owned));
        }
        for t in &mut self.tables {
            t.rollup = super::new_rollup(t.name, &self.rules);
            t.pending = None;
        }
        for date in &dates {
            let mut rows = events
                .query_stream(&format!(
                    "SELECT * FROM events WHERE {DATE_COLUMN} = DATE '{date}' ORDER BY ts"
                ))
                .await?;
            while let Some(batch) = rows.next().await {
                let batch = batch.map_err(query)?;
                report.max_rows_held = report.max_rows_held.max(batch.num_rows());
                report.events += batch.num_rows();
                self.add_to(&batch, |_| true)?;
            }
        }
        let positions: Vec<(String, i64)> = events_positions.iter().map(|(a, p)| (a.clone(), *p)).collect();
        let predicate = match (dates.first(), dates.last()) {
            (Some(first), Some(last)) => {
                format!("{DATE_COLUMN} >= DATE '{first}' AND {DATE_COLUMN} <= DATE '{last}'")
            }
            _ => "false".to_owned(),
        };
        for t in &mut self.tables {
            let batch = t.rollup.take()?;
            t.sink
                .replace_where_recording(batch, predicate.clone(), &positions)
                .await?;
            t.covered.extend(positions.iter().cloned());
        }
        tracing::info!(
            dates = dates.len(),
            events = report.events,
            "rollups rebuilt from events"
        );
        Ok(report)
    }

    /// Starts each table's clamp from the events stored of the latest two days: counted
    /// before a restart, or about to be counted by this catch-up (then they count twice
    /// against the clamp, which can only admit fewer, never more).
    async fn preload_clamps(&mut self, events: &DeltaSink) -> Result<()> {
        if events.version().is_none_or(|v| v == 0) {
            return Ok(());
        }
        let sql = format!(
            "SELECT visitor_key, CAST({DATE_COLUMN} AS INT) AS day, count(*) AS n, \
             count(*) FILTER (WHERE event_type IN ('ad_impression', 'ad_click')) AS ads FROM events \
             WHERE NOT is_bot AND visitor_key IS NOT NULL \
             AND {DATE_COLUMN} >= (SELECT max({DATE_COLUMN}) FROM events) - INTERVAL '1' DAY \
             GROUP BY visitor_key, {DATE_COLUMN}"
        );
        let mut rows = events.query_stream(&sql).await?;
        while let Some(batch) = rows.next().await {
            let batch = batch.map_err(|source| Error::Query {
                table: "events",
                source,
            })?;
            let visitors = EventRows::text_column(&batch, "visitor_key")?;
            let int = |name: &str| -> Result<arrow::array::Int64Array> {
                let column = batch
                    .column_by_name(name)
                    .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("no `{name}`")))?;
                let cast = arrow::compute::cast(column, &arrow::datatypes::DataType::Int64)?;
                Ok(cast
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .cloned()
                    .unwrap_or_else(|| arrow::array::Int64Array::from(Vec::<i64>::new())))
            };
            let (days, all, ads) = (int("day")?, int("n")?, int("ads")?);
            for i in 0..batch.num_rows().min(days.len()).min(all.len()).min(ads.len()) {
                if visitors.is_valid(i) && days.is_valid(i) {
                    for t in &mut self.tables {
                        t.rollup.preload_clamp(
                            days.value(i) as i32,
                            visitors.value(i),
                            all.value(i).max(0) as u64,
                            ads.value(i).max(0) as u64,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Rebuilds the open sessions of every table that follows sessions from the recent rows
    /// of `events`, but those in its entry of `skips` (the rows it is about to count).
    async fn restore_sessions(&mut self, events: &DeltaSink, skips: &[&IdFingerprints]) -> Result<()> {
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
        let mut rows = events.query_stream(&sql).await?;
        while let Some(batch) = rows.next().await {
            let batch = batch.map_err(|source| Error::Query {
                table: "events",
                source,
            })?;
            for (t, skip) in self.tables.iter_mut().zip(skips) {
                t.rollup.replay_sessions(&batch, skip)?;
            }
        }
        Ok(())
    }
}

/// Fingerprints of the events in `commits` dated within the days the session replay reads
/// (the latest date of `events` and the day before: older files are not read at all).
async fn recent_ids(events: &DeltaSink, commits: &[&Commit]) -> Result<IdFingerprints> {
    let mut ids = IdFingerprints::default();
    if commits.is_empty() {
        return Ok(ids);
    }
    let latest = events
        .query(&format!("SELECT max({DATE_COLUMN}) FROM events"), None)
        .await?
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<Date32Array>().cloned())
        .filter(|a| !a.is_empty() && a.is_valid(0))
        .map(|a| a.value(0));
    let Some(latest) = latest else {
        return Ok(ids);
    };
    for commit in commits {
        for file in &commit.added_files {
            // files are partitioned by date: the path says which day a file holds
            if file_date(file).is_some_and(|day| day < latest - 1) {
                continue;
            }
            let Some(reader) = data_file(events.table(), file, Some(&["event_id", "visitor_key"])).await? else {
                continue;
            };
            for batch in reader {
                let batch = batch?;
                let event_ids = EventRows::text_column(&batch, "event_id")?;
                let visitors = EventRows::text_column(&batch, "visitor_key")?;
                for i in 0..batch.num_rows() {
                    if event_ids.is_valid(i) {
                        let visitor = visitors.is_valid(i).then(|| visitors.value(i));
                        ids.insert(visitor, event_ids.value(i));
                    }
                }
            }
        }
    }
    Ok(ids)
}

/// The day a data file of `events` holds, from its partition directory (`date=YYYY-MM-DD/`),
/// as days since 1970.
fn file_date(path: &str) -> Option<i32> {
    let day = path.split('/').find_map(|segment| segment.strip_prefix("date="))?;
    let day = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()?;
    Some(crate::events_batch::days_since_epoch(day))
}

/// The `events` commits the rollups have not counted, or where the log no longer has them.
enum Uncounted {
    /// Oldest first, and the oldest version read to find them (the catch-up reads the same).
    Commits(Vec<Commit>, u64),
    /// Commit `version` and older are gone from the log.
    Gone {
        /// The newest version gone.
        version: i64,
    },
}

/// The oldest `events` version a rollup's catch-up would read: back from the latest to the
/// newest commit every rollup has counted for each app id (the catch-up walks back until
/// then), or the latest version when every rollup is level. Log entries from this version on
/// must stay, whatever their age: a commit the walk meets gone makes the catch-up rebuild
/// every date from `events` (which refuses beside other processors). An app id a rollup has
/// never counted keeps the whole log, as its catch-up reads all of it. A rollup table that
/// does not exist yet constrains nothing: it is built from `events` whole when it is made.
/// (The data files of an uncounted commit are another matter: once compacted and vacuumed,
/// 30 minutes later, the catch-up rebuilds too.)
pub(crate) async fn oldest_version_to_keep(events: &DeltaTable, rollups: &[DeltaTable]) -> Result<u64> {
    let Some(latest) = events.version() else {
        return Ok(0);
    };
    let delta = |table: &'static str| move |source| Error::Delta { table, source };
    let snapshot = events.snapshot().map_err(delta("events"))?;
    let mut lagging = HashMap::new();
    for partition in 0..MAX_PROBED_PARTITIONS {
        let app = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, partition);
        let Some(stored) = snapshot
            .transaction_version(events.log_store().as_ref(), &app)
            .await
            .map_err(delta("events"))?
        else {
            continue;
        };
        let mut lowest = i64::MAX;
        for rollup in rollups {
            let counted = rollup
                .snapshot()
                .map_err(delta("rollup"))?
                .transaction_version(rollup.log_store().as_ref(), &app)
                .await
                .map_err(delta("rollup"))?;
            lowest = lowest.min(counted.unwrap_or(-1));
        }
        if lowest < stored {
            lagging.insert(app, lowest);
        }
    }
    if lagging.is_empty() {
        return Ok(latest);
    }
    Ok(match uncounted_commits(events, &lagging).await? {
        Uncounted::Commits(_, oldest_read) => oldest_read,
        // the catch-up rebuilds from the rows whatever entries are kept
        Uncounted::Gone { .. } => latest,
    })
}

/// The appends to `events` (oldest first) that cover positions beyond `counted` per app id,
/// read from the log as typed actions, newest back to the first commit every app id has
/// counted.
async fn uncounted_commits(table: &DeltaTable, counted: &HashMap<String, i64>) -> Result<Uncounted> {
    let Some(latest) = table.version() else {
        return Ok(Uncounted::Commits(Vec::new(), 0));
    };
    let mut found = Vec::new();
    let mut settled: HashSet<&str> = HashSet::new();
    let mut version = latest as i64;
    while version >= 0 && settled.len() < counted.len() {
        let Some(commit) = marsad_tables::read_commit(table, "events", version as u64).await? else {
            // the entries before a checkpoint are gone (a partition quiet for over the log's
            // retention): the positions as of the oldest version left say whether the commits
            // before it were all counted
            if counted_before(table, (version + 1) as u64, counted, &settled).await? {
                break;
            }
            return Ok(Uncounted::Gone { version });
        };
        version -= 1;
        if !commit.is_write() {
            continue;
        }
        let mut needed = false;
        for (app, p) in &commit.positions {
            if let Some((name, &c)) = counted.get_key_value(app.as_str()) {
                if *p > c {
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
    Ok(Uncounted::Commits(found, (version + 1).max(0) as u64))
}

/// Whether every app id of `counted` not `settled` had committed no position beyond what the
/// rollups counted as of `events` version `oldest` (so none of the commits before it is
/// needed); false when that version cannot be read.
async fn counted_before(
    table: &DeltaTable,
    oldest: u64,
    counted: &HashMap<String, i64>,
    settled: &HashSet<&str>,
) -> Result<bool> {
    let mut at = table.clone();
    if let Err(e) = at.load_version(oldest).await {
        tracing::warn!(version = oldest, error = %e, "could not read the oldest events version in the log");
        return Ok(false);
    }
    let snapshot = at.snapshot().map_err(|source| Error::Delta {
        table: "events",
        source,
    })?;
    for (app, &c) in counted {
        if settled.contains(app.as_str()) {
            continue;
        }
        let position = snapshot
            .transaction_version(at.log_store().as_ref(), app)
            .await
            .map_err(|source| Error::Delta {
                table: "events",
                source,
            })?;
        if position.unwrap_or(-1) > c {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A reader of one data file of `events` (only `columns`, when given), batch by batch; `None`
/// when the file is gone (rewritten by an erasure or a compaction since it was committed, and
/// vacuumed).
async fn data_file(
    table: &DeltaTable,
    path: &str,
    columns: Option<&[&str]>,
) -> Result<Option<ParquetRecordBatchReader>> {
    let delta = |source| Error::Delta {
        table: "events",
        source,
    };
    let location = deltalake::Path::from_url_path(path).map_err(|e| {
        delta(deltalake::DeltaTableError::Generic(format!(
            "data file path {path}: {e}"
        )))
    })?;
    let bytes = match table.object_store().get(&location).await {
        Ok(got) => got.bytes().await,
        Err(e) => Err(e),
    };
    let bytes = match bytes {
        Ok(b) => b,
        Err(deltalake::ObjectStoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(delta(e.into())),
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| delta(e.into()))?
        .with_batch_size(READ_BATCH_ROWS);
    let builder = match columns {
        None => builder,
        Some(columns) => {
            let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
            builder.with_projection(mask)
        }
    };
    Ok(Some(builder.build().map_err(|e| delta(e.into()))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollup::RollupRules;
    use crate::rollup::rows::test_batch;
    use crate::table::EventsTable;

    /// Page views of cars, one per (visitor, session, minute).
    fn page_views(rows: &[(String, String, i64)]) -> arrow::record_batch::RecordBatch {
        let refs: Vec<(&str, &str, i64, &str, &str)> = rows
            .iter()
            .map(|(v, s, m)| (v.as_str(), s.as_str(), *m, "cars", "page_view"))
            .collect();
        test_batch(&refs)
    }

    /// The events `traffic_hourly` has counted, summed over its rows.
    async fn traffic_total(
        tables: &marsad_config::TablesLocation,
    ) -> std::result::Result<Option<i64>, Box<dyn std::error::Error>> {
        let traffic = DeltaSink::open_or_create(tables, &super::super::rollup_specs()[0]).await?;
        let batches = traffic
            .query("SELECT CAST(sum(events) AS BIGINT) FROM traffic_hourly", None)
            .await?;
        Ok(batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .map(|a| a.value(0)))
    }

    /// Three `events` commits the rollups never counted (a processor that died after each
    /// events commit) are counted, and never more than a read batch of them is in memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_lag_is_caught_up_a_batch_at_a_time() -> std::result::Result<(), Box<dyn std::error::Error>> {
        const COMMIT_ROWS: usize = 10_000;
        let dir = tempfile::tempdir()?;
        let tables = marsad_config::TablesLocation::local(dir.path())?;
        let mut events = EventsTable::open_or_create(&tables).await?;
        let app = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 0);
        for commit in 0..3 {
            let rows: Vec<(String, String, i64)> = (0..COMMIT_ROWS)
                .map(|i| {
                    let n = commit * COMMIT_ROWS + i;
                    // 7,000 visitors over the day: fewer events each than the clamp
                    (format!("v{}", n % 7_000), format!("s{}", n % 9_000), (n / 100) as i64)
                })
                .collect();
            let batch = page_views(&rows);
            let last = ((commit + 1) * COMMIT_ROWS - 1) as u64;
            events.append(batch.clone(), &[(app.clone(), last)]).await?;
        }
        let positions = events.committed_offsets(std::slice::from_ref(&app)).await?;
        let mut rollups = Rollups::open(&tables, std::slice::from_ref(&app), RollupRules::with_clamp(20)).await?;
        let report = rollups.catch_up(events.sink(), &positions).await?;
        assert_eq!((report.events, report.commits), (3 * COMMIT_ROWS, 3), "{report:?}");
        assert!(
            report.max_rows_held <= READ_BATCH_ROWS,
            "held {} rows at once: {report:?}",
            report.max_rows_held
        );
        let counted = traffic_total(&tables).await?;
        assert_eq!(counted, Some(3 * COMMIT_ROWS as i64));
        // caught up: a second catch-up finds nothing to count
        let again = Rollups::open(&tables, std::slice::from_ref(&app), RollupRules::with_clamp(20))
            .await?
            .catch_up(events.sink(), &positions)
            .await?;
        assert_eq!(again.events, 0);
        Ok(())
    }

    /// The rollups' own compaction commits between the processor's snapshot of a rollup table
    /// and its next append: the append goes on the newer version (its positions are still
    /// the processor's), instead of the processor giving its partitions up and catching up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rollup_commit_goes_on_after_a_compaction_of_its_table()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = marsad_config::TablesLocation::local(dir.path())?;
        let app = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 0);
        let mut rollups = Rollups::open(&tables, std::slice::from_ref(&app), RollupRules::with_clamp(20)).await?;
        for c in 0..5i64 {
            let rows: Vec<(String, String, i64)> = (0..10)
                .map(|i| (format!("v{i}"), format!("s{i}"), c * 10 + i))
                .collect();
            let batch = page_views(&rows);
            rollups.add(&batch, &[(app.clone(), c * 10 + 9)])?;
            if c == 4 {
                // the processor's snapshots are from before this compaction
                let merged = super::super::compact(&tables, 2).await?;
                assert!(!merged.is_empty(), "the partial rows were merged");
            }
            rollups.commit(&[(app.clone(), c * 10 + 9)], None).await?;
        }
        let counted = traffic_total(&tables).await?;
        assert_eq!(counted, Some(50));
        Ok(())
    }

    /// An erasure rewrites an `events` file the rollups have not counted yet (the processor
    /// died before its rollup commit) and vacuums the old one: the catch-up still counts every
    /// other visitor's events in it, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_rewritten_before_it_was_counted_is_not_lost() -> std::result::Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let tables = marsad_config::TablesLocation::local(dir.path())?;
        let app = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 0);
        let mut events = EventsTable::open_or_create(&tables).await?;
        let mut rollups = Rollups::open(&tables, std::slice::from_ref(&app), RollupRules::with_clamp(20)).await?;
        // the first commit is counted by the rollups too
        let first: Vec<(String, String, i64)> = (0..40).map(|i| (format!("v{}", i % 8), format!("s{i}"), i)).collect();
        let batch = page_views(&first);
        events.append(batch.clone(), &[(app.clone(), 39)]).await?;
        rollups.add(&batch, &[(app.clone(), 39)])?;
        rollups.commit(&[(app.clone(), 39)], None).await?;
        // the second is committed to events only, then one visitor's rows are erased from it
        let second: Vec<(String, String, i64)> =
            (40..100).map(|i| (format!("w{}", i % 8), format!("s{i}"), i)).collect();
        let batch = page_views(&second);
        events.append(batch.clone(), &[(app.clone(), 99)]).await?;
        drop(rollups);
        let (erased, _) = events
            .sink()
            .table()
            .clone()
            .delete()
            .with_predicate("visitor_key = 'w3'")
            .await?;
        let vacuumed = marsad_tables::remove_replaced_files(erased, chrono::Duration::zero()).await?;
        assert!(vacuumed > 0, "the erasure rewrote a file");

        let mut events = EventsTable::open_or_create(&tables).await?;
        let positions = events.committed_offsets(std::slice::from_ref(&app)).await?;
        let mut rollups = Rollups::open(&tables, std::slice::from_ref(&app), RollupRules::with_clamp(20)).await?;
        rollups.catch_up(events.sink(), &positions).await?;
        let counted = traffic_total(&tables).await?;
        let kept = events.sink().query("SELECT count(*) FROM events", None).await?[0]
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .map(|a| a.value(0));
        assert_eq!(kept, Some(100 - 8), "w3's 8 rows are erased");
        assert_eq!(counted, kept, "every event events still holds is counted once");
        Ok(())
    }

    /// The log cleanup removes old entries of `events` up to a checkpoint, but never a
    /// commit the rollups have not counted (a processor died between its commits): the
    /// catch-up then reads the uncounted commits themselves, rather than finding them gone
    /// and rebuilding every date from the rows (which refuses when other processors own
    /// partitions). Once the rollups are level, the next cleanup removes them too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_cleanup_keeps_the_commits_the_rollups_have_not_counted()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        // 4: a checkpoint between the last counted commit and the first uncounted one;
        // 7: the first uncounted commit is a checkpoint (the catch-up still reads the one before)
        for counted in [4, 7] {
            cleanup_keeps_what_the_catch_up_reads(counted).await?;
        }
        Ok(())
    }

    async fn cleanup_keeps_what_the_catch_up_reads(
        counted: i64,
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = marsad_config::TablesLocation::local(dir.path())?;
        let app = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 0);
        let mut events = EventsTable::checkpointing_every(&tables, 5).await?;
        let mut rollups = Rollups::open(&tables, std::slice::from_ref(&app), RollupRules::with_clamp(20)).await?;
        let mut first_uncounted = None;
        for c in 0..12i64 {
            let rows: Vec<(String, String, i64)> = (0..10)
                .map(|i| (format!("v{i}"), format!("s{c}-{i}"), c * 10 + i))
                .collect();
            let batch = page_views(&rows);
            let version = events
                .append(batch.clone(), &[(app.clone(), (c * 10 + 9) as u64)])
                .await?;
            // the processor dies after its `counted`th events commit: the rollups never count the rest
            if c < counted {
                rollups.add(&batch, &[(app.clone(), c * 10 + 9)])?;
                rollups.commit(&[(app.clone(), c * 10 + 9)], None).await?;
            } else if first_uncounted.is_none() {
                first_uncounted = Some(version);
            }
        }
        drop(rollups);
        let first_uncounted = first_uncounted.ok_or("an uncounted commit")?;
        let latest = events.sink().table().version().ok_or("a version")?;

        let removed = crate::maintenance::remove_expired_log_entries(&tables, Some(chrono::Duration::zero())).await?;
        assert!(
            removed > 0,
            "entries before the last checkpoint the catch-up does not need go"
        );
        for version in first_uncounted - 1..=latest {
            let commit = marsad_tables::read_commit(events.sink().table(), "events", version).await?;
            assert!(
                commit.is_some(),
                "version {version}, which the catch-up reads, was removed ({counted} counted)"
            );
        }
        assert!(
            marsad_tables::read_commit(events.sink().table(), "events", 0)
                .await?
                .is_none(),
            "the first entries are removed"
        );

        let positions = events.committed_offsets(std::slice::from_ref(&app)).await?;
        let mut rollups = Rollups::open(&tables, std::slice::from_ref(&app), RollupRules::with_clamp(20)).await?;
        let report = rollups.catch_up(events.sink(), &positions).await?;
        assert_eq!(
            (report.events, report.commits),
            (10 * (12 - counted as usize), 12 - counted as usize),
            "read back, not rebuilt: {report:?}"
        );
        assert_eq!(traffic_total(&tables).await?, Some(120));
        drop(rollups);

        crate::maintenance::remove_expired_log_entries(&tables, Some(chrono::Duration::zero())).await?;
        assert!(
            marsad_tables::read_commit(events.sink().table(), "events", first_uncounted - 1)
                .await?
                .is_none(),
            "counted, the commits before the last checkpoint go at the next cleanup"
        );
        Ok(())
    }

    /// A partition quiet for longer than the log's retention: its last counted commit leaves
    /// the log with nothing lagging. Then it gets an event and the processor dies between
    /// the commits: the catch-up counts that commit from the log (the positions at the
    /// oldest version left show nothing older was needed), instead of rebuilding every
    /// date, which refuses beside other processors.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_quiet_through_a_log_cleanup_is_caught_up_from_the_log()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = marsad_config::TablesLocation::local(dir.path())?;
        let (busy, quiet) = (
            crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 0),
            crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 1),
        );
        let apps = [busy.clone(), quiet.clone()];
        let mut events = EventsTable::checkpointing_every(&tables, 5).await?;
        let mut rollups = Rollups::open(&tables, &apps, RollupRules::with_clamp(20)).await?;
        let rows = |c: i64| -> Vec<(String, String, i64)> {
            (0..10)
                .map(|i| (format!("v{i}"), format!("s{c}-{i}"), c * 10 + i))
                .collect()
        };
        // both partitions counted; then only the busy one gets events, 12 commits
        for (c, app) in std::iter::once((0i64, &quiet)).chain((1..13).map(|c| (c, &busy))) {
            let rows = rows(c);
            let batch = page_views(&rows);
            events
                .append(batch.clone(), &[(app.clone(), (c * 10 + 9) as u64)])
                .await?;
            rollups.add(&batch, &[(app.clone(), c * 10 + 9)])?;
            rollups.commit(&[(app.clone(), c * 10 + 9)], None).await?;
        }
        drop(rollups);
        let removed = crate::maintenance::remove_expired_log_entries(&tables, Some(chrono::Duration::zero())).await?;
        assert!(removed > 0);
        assert!(
            marsad_tables::read_commit(events.sink().table(), "events", 2)
                .await?
                .is_none(),
            "the quiet partition's commit left the log"
        );
        // the quiet partition gets an event; the processor dies before the rollup commit
        let late = rows(13);
        let batch = page_views(&late);
        events.append(batch.clone(), &[(quiet.clone(), 139)]).await?;

        let positions = events.committed_offsets(&apps).await?;
        let mut rollups = Rollups::open(&tables, &apps, RollupRules::with_clamp(20)).await?;
        let report = rollups.catch_up(events.sink(), &positions).await?;
        assert_eq!(
            (report.events, report.commits),
            (10, 1),
            "read from the log, not rebuilt: {report:?}"
        );
        assert_eq!(traffic_total(&tables).await?, Some(140));
        Ok(())
    }
}
