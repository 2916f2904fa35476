//! Backfill: re-runs the processor over the retained raw log and replaces what
//! the tables hold for a range of dates, so a changed rule (page categories,
//! GeoIP database, allow-list) or a processor fix reaches stored data.
//!
//! It is idempotent and exactly-once by construction: each table is rebuilt
//! from exactly the log positions that table's own Delta `txn` says it has
//! counted, and its rows for the range are swapped in one commit. What the
//! live processor commits meanwhile are blind appends of later positions,
//! kept by that commit. Opt-outs recorded since are applied; days whose
//! visitor key is destroyed are refused, never re-keyed.
//!
//! Memory is bounded by a chunk, not by the log: records are anonymized into
//! chunks of `process.batch_max_events` rows; each chunk's rows of the range
//! stream into the new `events` files (written as they come, committed at the
//! end) and feed the rollup aggregators, which keep only the cells of the
//! range's dates (bounded by the number of keys, not of events). Retried
//! duplicates are recognised with the processor's bounded fingerprint filter.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, BooleanArray, Date32Array};
use arrow::record_batch::RecordBatch;
use chrono::{NaiveDate, Utc};
use marsad_config::Config;
use marsad_eventlog::{EventLog, Position};
use marsad_privacy::optout::OptOutRegistry;
use marsad_schemas::{DATE_COLUMN, Envelope, TOPIC_RAW, TableName};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::anonymize::{AnonymousEvent, MAX_CLOCK_SKEW_FUTURE};
use crate::dedup::RecentEventIds;
use crate::events_batch::{EventsBatchBuilder, days_since_epoch};
use crate::offsets::app_id;
use crate::pipeline::anonymizer_from_config;
use crate::rollup::{EventRows, new_rollup, rollup_specs};
use crate::table::{DeltaSink, RowsOrStop, events_spec};
use crate::{Error, Result};

/// Records asked of the log per poll.
const POLL_MAX: usize = 10_000;
/// How long the log may stay silent before the positions the tables recorded.
const STALL: Duration = Duration::from_secs(30);

/// The dates to rebuild, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    /// First date.
    pub from: NaiveDate,
    /// Last date.
    pub to: NaiveDate,
}

impl DateRange {
    fn contains(&self, day: NaiveDate) -> bool {
        self.from <= day && day <= self.to
    }

    fn predicate(&self) -> String {
        format!("{DATE_COLUMN} >= '{}' AND {DATE_COLUMN} <= '{}'", self.from, self.to)
    }

    fn days(&self) -> impl Iterator<Item = NaiveDate> {
        self.from.iter_days().take_while(|d| *d <= self.to)
    }
}

/// What a backfill reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Reading the raw log: records read so far of the total to read.
    Reading {
        /// Read so far.
        read: u64,
        /// To read in all.
        total: u64,
    },
    /// Swapping the rebuilt rows of a table in.
    Writing {
        /// The table.
        table: &'static str,
    },
}

/// What a backfill did to one table.
#[derive(Debug, Clone, Serialize)]
pub struct TableRebuilt {
    /// The table.
    pub table: &'static str,
    /// Events the table counted in the range before (rows of `events`, summed counts of a rollup).
    pub events_before: i64,
    /// And after.
    pub events_after: i64,
    /// Rows written for the range.
    pub rows_written: usize,
}

/// The receipt of a backfill.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillReport {
    /// The dates rebuilt.
    pub from: NaiveDate,
    /// Inclusive.
    pub to: NaiveDate,
    /// Raw-log records read (every retained record up to what the tables have counted).
    pub records_read: u64,
    /// Events of the range rebuilt into `events`.
    pub events_rebuilt: usize,
    /// Records left out because the visitor refused analytics or has opted out since.
    pub not_collected: u64,
    /// Retried duplicates dropped by `event_id`.
    pub duplicates: u64,
    /// Records that cannot be processed (they are in the dead-letter topic already).
    pub unprocessable: u64,
    /// The most rebuilt events held in memory at once (a chunk: `process.batch_max_events`).
    pub max_rows_held: usize,
    /// Each table's before and after.
    pub tables: Vec<TableRebuilt>,
}

fn refused(reason: impl Into<String>) -> Error {
    Error::BackfillRefused(reason.into())
}

/// Rebuilds the dates of `range` in every table from the raw log in `log`, honouring the
/// opt-outs in `opt_outs` (which the caller has brought up to date with the opt-out log).
pub async fn backfill(
    config: &Config,
    log: &dyn EventLog,
    opt_outs: Arc<OptOutRegistry>,
    range: DateRange,
    mut progress: impl FnMut(Progress),
) -> Result<BackfillReport> {
    let today = Utc::now().date_naive();
    if range.from > range.to {
        return Err(refused(format!("--from {} is after --to {}", range.from, range.to)));
    }
    if range.to > today {
        return Err(refused(format!(
            "--to {} is in the future (today is {today})",
            range.to
        )));
    }
    let (mut anonymizer, daily_keys) = anonymizer_from_config(config, opt_outs)?;
    for day in range.days() {
        if let Err(marsad_privacy::Error::KeyDestroyed { .. }) = daily_keys.key_for(day) {
            return Err(refused(format!(
                "the visitor key of {day} was destroyed {} h after that day ended, so its rows cannot be \
                 rebuilt (by design: nobody can link that day to a cookie any more); choose a later --from",
                config.privacy.daily_key_grace_hours
            )));
        }
    }

    let tables = config.tables()?;
    // it commits over the versions it opens now, possibly hours later: the log cleanup waits
    // (on an early return the notice stops being renewed and expires within minutes)
    let notice = marsad_tables::announce_long_transaction(&tables).await?;
    let mut events_sink = DeltaSink::open_or_create(&tables, &events_spec()).await?;
    let mut rollup_sinks = Vec::new();
    for spec in rollup_specs() {
        rollup_sinks.push(DeltaSink::open_or_create(&tables, &spec).await?);
    }
    let mut sub = log.read_all(TOPIC_RAW).await?;
    let partitions = sub.assignment();
    // what each table has counted, per partition: the rebuild covers exactly that
    let apps: Vec<(u32, String)> = partitions.iter().map(|&p| (p, app_id(TOPIC_RAW, p))).collect();
    let app_ids: Vec<String> = apps.iter().map(|(_, a)| a.clone()).collect();
    let by_partition = |committed: HashMap<String, i64>| -> Counted {
        apps.iter()
            .filter_map(|(p, a)| committed.get(a).map(|c| (*p, *c)))
            .collect()
    };
    let events_counted = by_partition(events_sink.committed(&app_ids).await?);
    let mut rollups = Vec::new();
    let rules = crate::rollup::RollupRules::of(&config.process);
    for sink in &mut rollup_sinks {
        let table = sink_table(sink);
        rollups.push(RollupRebuild {
            table,
            counted: by_partition(sink.committed(&app_ids).await?),
            rollup: new_rollup(table, &rules),
        });
    }
    let mut end: BTreeMap<u32, i64> = BTreeMap::new();
    for by_partition in std::iter::once(&events_counted).chain(rollups.iter().map(|r| &r.counted)) {
        for (&p, &c) in by_partition {
            let e = end.entry(p).or_insert(c);
            *e = (*e).max(c);
        }
    }
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    let mut start: BTreeMap<u32, u64> = BTreeMap::new();
    let mut total = 0u64;
    for (&p, &last) in &end {
        let from = sub.retained_from(p).await?;
        sub.seek(p, from).await?;
        start.insert(p, from);
        next.insert(p, from);
        total += (last + 1).saturating_sub(from as i64) as u64;
    }

    let mut report = BackfillReport {
        from: range.from,
        to: range.to,
        records_read: 0,
        events_rebuilt: 0,
        not_collected: 0,
        duplicates: 0,
        unprocessable: 0,
        max_rows_held: 0,
        tables: Vec::new(),
    };
    let range_starts = range.from.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
        - chrono::Duration::minutes(MAX_CLOCK_SKEW_FUTURE);
    let chunk_rows = config.process.batch_max_events.max(1);
    let mut seen = RecentEventIds::new(config.process.dedup_capacity);

    // the rebuilt rows of `events` stream into new files while the log is read; they replace
    // the range's rows in one commit once the stream ends (never when it ends in an error)
    let events_before = counted_events(&events_sink, TableName::Events, range).await?;
    let (rows_tx, rows_rx) = mpsc::channel::<RowsOrStop>(2);
    let writer = {
        let sink = events_sink.clone();
        let predicate = range.predicate();
        tokio::spawn(async move {
            let mut sink = sink;
            sink.replace_where_streaming(rows_rx, predicate).await.map(|_| sink)
        })
    };

    let mut chunk = Chunk::new(chunk_rows);
    let mut quiet_since = tokio::time::Instant::now();
    let done = |next: &BTreeMap<u32, u64>| {
        end.iter()
            .all(|(p, last)| next.get(p).is_some_and(|n| *n as i64 > *last))
    };
    let read: Result<()> = async {
        while !done(&next) {
            let records = sub.poll(POLL_MAX, Duration::from_millis(500)).await?;
            if records.is_empty() {
                if quiet_since.elapsed() > STALL {
                    return Err(refused(format!(
                        "the raw log ends before the positions the tables have counted (read up to {next:?}, \
                         tables counted up to {end:?}); was the log deleted?"
                    )));
                }
                continue;
            }
            quiet_since = tokio::time::Instant::now();
            for rec in records {
                let p = rec.position.partition;
                let Some(&last) = end.get(&p) else { continue };
                if rec.position.offset as i64 > last {
                    continue;
                }
                next.insert(p, rec.position.offset + 1);
                report.records_read += 1;
                let env = match Envelope::from_bytes(&rec.payload) {
                    Ok(env) => env,
                    Err(_) => {
                        report.unprocessable += 1;
                        continue;
                    }
                };
                // the log must hold the whole range: refuse if retention took its beginning
                if start.get(&p).is_some_and(|s| *s > 0 && rec.position.offset == *s) && env.received_at > range_starts
                {
                    return Err(refused(format!(
                        "the raw log keeps partition {p} only from {} on (older records were deleted by \
                         retention), so {} cannot be rebuilt whole; choose a later --from",
                        env.received_at.format("%Y-%m-%d %H:%M UTC"),
                        range.from
                    )));
                }
                match tokio::task::block_in_place(|| anonymizer.anonymize(&env)) {
                    Ok(None) => report.not_collected += 1,
                    Ok(Some(row)) => {
                        if seen.insert(row.visitor_key.as_deref(), &row.event_id) {
                            chunk.push(rec.position, &row);
                        } else {
                            report.duplicates += 1;
                        }
                    }
                    Err(crate::anonymize::NotAnonymized::KeysUnavailable(why)) => {
                        return Err(refused(format!(
                            "the daily key store is unavailable ({why}); try again"
                        )));
                    }
                    Err(crate::anonymize::NotAnonymized::Unprocessable(_)) => report.unprocessable += 1,
                }
                if chunk.is_full() {
                    report.max_rows_held = report.max_rows_held.max(chunk.len());
                    let rows = chunk.take()?;
                    report.events_rebuilt += rows.feed(range, &events_counted, &mut rollups, &rows_tx).await?;
                }
            }
            progress(Progress::Reading {
                read: report.records_read,
                total,
            });
        }
        report.max_rows_held = report.max_rows_held.max(chunk.len());
        let rows = chunk.take()?;
        report.events_rebuilt += rows.feed(range, &events_counted, &mut rollups, &rows_tx).await?;
        Ok(())
    }
    .await;

    progress(Progress::Writing { table: "events" });
    let stop = match &read {
        Ok(()) => RowsOrStop::End,
        Err(e) => RowsOrStop::Stop(e.to_string()),
    };
    // a stream that ends in an error makes the writer commit nothing
    let _ = rows_tx.send(stop).await;
    drop(rows_tx);
    let written = writer
        .await
        .map_err(|e| refused(format!("the events writer stopped: {e}")))?;
    read?;
    let mut events_sink = written?;
    let events_after = counted_events(&events_sink, TableName::Events, range).await?;
    report.tables.push(TableRebuilt {
        table: TableName::Events.as_str(),
        events_before,
        events_after,
        rows_written: report.events_rebuilt,
    });
    events_sink.refresh().await?;

    for (sink, mut rebuild) in rollup_sinks.iter_mut().zip(rollups) {
        let table = rebuild.table;
        progress(Progress::Writing { table: table.as_str() });
        // every covered event fed the rollup, so sessions crossing the range's edges count as
        // they did live; only the range's rows are swapped in
        let batch = rows_in(&rebuild.rollup.take()?, range)?;
        let before = counted_events(sink, table, range).await?;
        let rows_written = batch.num_rows();
        if rows_written == 0 {
            sink.delete_where(range.predicate()).await?;
        } else {
            sink.replace_where(batch, range.predicate()).await?;
        }
        let after = counted_events(sink, table, range).await?;
        report.tables.push(TableRebuilt {
            table: table.as_str(),
            events_before: before,
            events_after: after,
            rows_written,
        });
    }
    notice.withdraw().await;
    Ok(report)
}

/// The last position a table has counted, per partition.
type Counted = HashMap<u32, i64>;

fn covered(counted: &Counted, position: Position) -> bool {
    counted
        .get(&position.partition)
        .is_some_and(|c| position.offset as i64 <= *c)
}

/// A rollup being rebuilt: what its table has counted, and the cells so far.
struct RollupRebuild {
    table: TableName,
    counted: Counted,
    rollup: Box<dyn crate::rollup::Rollup>,
}

/// Rebuilt events not yet handed on, with where each came from.
struct Chunk {
    builder: EventsBatchBuilder,
    positions: Vec<Position>,
    capacity: usize,
}

impl Chunk {
    fn new(capacity: usize) -> Self {
        Chunk {
            builder: EventsBatchBuilder::new(),
            positions: Vec::with_capacity(capacity),
            capacity,
        }
    }

    fn push(&mut self, position: Position, row: &AnonymousEvent) {
        self.builder.push(row);
        self.positions.push(position);
    }

    fn len(&self) -> usize {
        self.positions.len()
    }

    fn is_full(&self) -> bool {
        self.len() >= self.capacity
    }

    fn take(&mut self) -> Result<ChunkRows> {
        Ok(ChunkRows {
            batch: self.builder.finish()?,
            positions: std::mem::take(&mut self.positions),
        })
    }
}

/// One chunk's rows as a batch.
struct ChunkRows {
    batch: RecordBatch,
    positions: Vec<Position>,
}

impl ChunkRows {
    /// Hands the rows on: the range's rows that `events` has counted to its writer, the rows
    /// each rollup has counted to that rollup; returns how many went to `events`.
    async fn feed(
        self,
        range: DateRange,
        events_counted: &Counted,
        rollups: &mut [RollupRebuild],
        writer: &mpsc::Sender<RowsOrStop>,
    ) -> Result<usize> {
        if self.positions.is_empty() {
            return Ok(0);
        }
        let dates = self
            .batch
            .column_by_name(DATE_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<Date32Array>())
            .ok_or_else(|| Error::Arrow(arrow::error::ArrowError::SchemaError("events without a date".into())))?;
        let keep: BooleanArray = self
            .positions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Some(covered(events_counted, *p) && dates.value_as_date(i).is_some_and(|d| range.contains(d)))
            })
            .collect();
        let rows = arrow::compute::filter_record_batch(&self.batch, &keep)?;
        let sent = rows.num_rows();
        if sent > 0 && writer.send(RowsOrStop::Rows(rows)).await.is_err() {
            return Err(refused("the events writer stopped early".to_owned()));
        }
        let all = EventRows::new(&self.batch)?;
        let (first, last) = (days_since_epoch(range.from), days_since_epoch(range.to));
        for r in rollups.iter_mut() {
            let which: Vec<usize> = (0..self.positions.len())
                .filter(|&i| covered(&r.counted, self.positions[i]) && all.counted(i))
                .collect();
            r.rollup.add(&all, &which);
            r.rollup.retain_days(first, last);
        }
        Ok(sent)
    }
}

fn sink_table(sink: &DeltaSink) -> TableName {
    TableName::ALL
        .into_iter()
        .find(|t| t.as_str() == sink.name())
        .unwrap_or(TableName::Events)
}
/// The rows of a rollup batch dated within `range`.
fn rows_in(batch: &RecordBatch, range: DateRange) -> Result<RecordBatch> {
    let dates = batch
        .column_by_name(DATE_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<Date32Array>())
        .ok_or_else(|| Error::Arrow(arrow::error::ArrowError::SchemaError("rollup without a date".into())))?;
    let keep: BooleanArray = (0..dates.len())
        .map(|i| Some(dates.is_valid(i) && dates.value_as_date(i).is_some_and(|d| range.contains(d))))
        .collect();
    Ok(arrow::compute::filter_record_batch(batch, &keep)?)
}

/// The events a table counts for `range`: rows of `events`, summed counts of a rollup.
async fn counted_events(sink: &DeltaSink, table: TableName, range: DateRange) -> Result<i64> {
    if sink.version().is_none() {
        return Ok(0);
    }
    let measure = match table {
        TableName::Events => "count(*)",
        TableName::AdPerformanceHourly => "sum(impressions) + sum(clicks)",
        TableName::PagesHourly => "sum(page_views)",
        TableName::GoalsHourly => "sum(conversions)",
        TableName::FunnelsHourly => "sum(sessions)",
        _ => "sum(events)",
    };
    let sql = format!(
        "SELECT CAST(coalesce({measure}, 0) AS BIGINT) AS n FROM {} WHERE {}",
        table.as_str(),
        range.predicate()
    );
    let batches = sink.query(&sql, None).await?;
    Ok(batches
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_inclusive_and_names_its_partitions() {
        let range = DateRange {
            from: NaiveDate::from_ymd_opt(2026, 11, 23).unwrap_or_default(),
            to: NaiveDate::from_ymd_opt(2026, 11, 25).unwrap_or_default(),
        };
        assert_eq!(range.days().count(), 3);
        assert!(range.contains(range.from) && range.contains(range.to));
        assert!(!range.contains(NaiveDate::from_ymd_opt(2026, 11, 26).unwrap_or_default()));
        assert_eq!(range.predicate(), "date >= '2026-11-23' AND date <= '2026-11-25'");
    }
}
