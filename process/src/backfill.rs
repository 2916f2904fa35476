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

use std::collections::{BTreeMap, HashMap, HashSet};
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

use crate::anonymize::{AnonymousEvent, MAX_CLOCK_SKEW_FUTURE};
use crate::batch::EventsBatchBuilder;
use crate::offsets::app_id;
use crate::pipeline::anonymizer_from_config;
use crate::rollup::{aggregate, rollup_specs};
use crate::table::{DeltaSink, events_spec};
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
    /// Each table's before and after.
    pub tables: Vec<TableRebuilt>,
}

fn refused(reason: impl Into<String>) -> Error {
    Error::BackfillRefused(reason.into())
}

/// A rebuilt event and where in the log it came from.
struct Rebuilt {
    position: Position,
    row: AnonymousEvent,
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
    let mut sinks = vec![DeltaSink::open_or_create(&tables, &events_spec()).await?];
    for spec in rollup_specs() {
        sinks.push(DeltaSink::open_or_create(&tables, &spec).await?);
    }
    let mut sub = log.read_all(TOPIC_RAW).await?;
    let partitions = sub.assignment();
    // what each table has counted, per partition: the rebuild covers exactly that
    let mut counted: Vec<HashMap<u32, i64>> = Vec::new();
    let apps: Vec<(u32, String)> = partitions.iter().map(|&p| (p, app_id(TOPIC_RAW, p))).collect();
    let app_ids: Vec<String> = apps.iter().map(|(_, a)| a.clone()).collect();
    for sink in &mut sinks {
        let committed = sink.committed(&app_ids).await?;
        let by_partition: HashMap<u32, i64> = apps
            .iter()
            .filter_map(|(p, a)| committed.get(a).map(|c| (*p, *c)))
            .collect();
        counted.push(by_partition);
    }
    let mut end: BTreeMap<u32, i64> = BTreeMap::new();
    for by_partition in &counted {
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
        tables: Vec::new(),
    };
    let range_starts = range.from.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
        - chrono::Duration::minutes(MAX_CLOCK_SKEW_FUTURE);
    let mut seen_ids = HashSet::new();
    let mut rebuilt: Vec<Rebuilt> = Vec::new();
    let mut quiet_since = tokio::time::Instant::now();
    let done = |next: &BTreeMap<u32, u64>| {
        end.iter()
            .all(|(p, last)| next.get(p).is_some_and(|n| *n as i64 > *last))
    };
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
            if start.get(&p).is_some_and(|s| *s > 0 && rec.position.offset == *s) && env.received_at > range_starts {
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
                    if seen_ids.insert(row.event_id.clone()) {
                        rebuilt.push(Rebuilt {
                            position: rec.position,
                            row,
                        });
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
        }
        progress(Progress::Reading {
            read: report.records_read,
            total,
        });
    }

    for (sink, counted) in sinks.iter_mut().zip(&counted) {
        let table = sink_table(sink);
        progress(Progress::Writing { table: table.as_str() });
        // what this table has counted: a rollup lagging after a crash is rebuilt to its own position
        let covered = |r: &&Rebuilt| {
            counted
                .get(&r.position.partition)
                .is_some_and(|c| r.position.offset as i64 <= *c)
        };
        let batch = if table == TableName::Events {
            let mut builder = EventsBatchBuilder::new();
            for r in rebuilt.iter().filter(covered).filter(|r| range.contains(r.row.date)) {
                builder.push(&r.row);
            }
            report.events_rebuilt = builder.len();
            builder.finish()?
        } else {
            // every covered event feeds the rollup, so sessions crossing the range's edges count as
            // they did live; only the range's rows are swapped in
            let mut builder = EventsBatchBuilder::new();
            for r in rebuilt.iter().filter(covered) {
                builder.push(&r.row);
            }
            let all = aggregate(table, &[builder.finish()?])?;
            rows_in(&all, range)?
        };
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
    Ok(report)
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
