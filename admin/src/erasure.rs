//! Erasure: an `all` opt-out is recorded first (so nothing new is collected
//! about the subject), then the erasure waits until the processor has
//! committed everything the raw log held at that moment (its positions in the
//! Delta `txn`s of `events` and of every rollup have passed the raw log's end on
//! every partition), then every row linkable to the subject is deleted from every
//! table — rows with the subject's `audience_id`, and for a cookie the rows
//! with its `visitor_key` of every day whose key still exists — and the
//! rewritten files are vacuumed at once. A user id also takes with it the
//! cookies the site sent with it in the raw log still held. A second pass
//! then checks that nothing of the subject landed meanwhile (a processor that
//! had not yet seen the opt-out); only a pass that finds nothing says done.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use arrow::array::{Array, Int64Array};
use chrono::{DateTime, Utc};
use datafusion::prelude::SessionContext;
use marsad_config::TablesLocation;
use marsad_eventlog::{EventLog, Record};
use marsad_privacy::keys::{DailyKeyStore, SubjectKeys};
use marsad_privacy::optout::{OptOutRecord, OptOutRegistry, OptOutScope};
use marsad_privacy::pseudonym::{Subject, audience_id, visitor_key};
use marsad_schemas::{Envelope, TOPIC_OPTOUTS, TOPIC_RAW, TableName};
use serde::Serialize;

/// Why an erasure could not finish; what was removed before stays removed, and repeating
/// the erasure is safe.
#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    /// The opt-out could not be recorded, so nothing was erased.
    #[error("could not record the opt-out, nothing was erased: {0}")]
    OptOut(marsad_eventlog::Error),
    /// The raw log could not be read (its end, or the cookies sent with a user id).
    #[error("reading the raw log: {0}")]
    RawLog(marsad_eventlog::Error),
    /// Rows of the subject kept landing pass after pass (a processor that has not seen the
    /// opt-out): never reported as done.
    #[error("rows of the subject were still being written after {passes} passes; repeat the erasure")]
    StillLanding {
        /// Passes made.
        passes: usize,
    },
    /// A table could not be read or rewritten.
    #[error("erasure in table {table}: {reason}")]
    Table {
        /// The table being erased from.
        table: &'static str,
        /// What failed.
        reason: String,
    },
}

/// What an erasure needs: where the tables are, the keys that find a subject's rows, and
/// the opt-out log it records the subject's refusal in first.
pub struct Erasure<'a> {
    /// Where the tables live.
    pub tables: &'a TablesLocation,
    /// Where opt-outs are recorded, and the raw log the processor reads.
    pub log: &'a dyn EventLog,
    /// This process's opt-outs in force, updated at once.
    pub opt_outs: &'a OptOutRegistry,
    /// Hash identifiers into `audience_id`s and opt-out subjects.
    pub subject_keys: &'a SubjectKeys,
    /// The daily visitor keys that still exist.
    pub daily_keys: &'a dyn DailyKeyStore,
    /// How often to look at the processor's committed positions while waiting.
    pub poll: Duration,
}

/// Passes over the tables before an erasure that keeps finding new rows gives up.
const MAX_PASSES: usize = 10;

/// Where the processor must have committed (per raw-log partition, the next offset) before
/// the subject's rows can be deleted for good.
pub type RawLogEnd = BTreeMap<u32, u64>;

impl Erasure<'_> {
    /// Records an `all` opt-out for `subject` (and the cookies sent with a user id), waits
    /// for the processor to commit everything logged before it, then deletes every row
    /// linkable to them from every table, and checks once more.
    pub async fn erase(&self, subject: Subject<'_>) -> Result<ErasureReceipt, ErasureError> {
        // the background compaction holds off while this runs (each would keep failing the
        // other's commits on a busy date)
        let notice = match marsad_tables::announce_erasure(self.tables).await {
            Ok(notice) => Some(notice),
            Err(e) => {
                tracing::warn!(error = %e, "erasure: could not announce it; the compaction may slow it down");
                None
            }
        };
        let erased = self.erase_announced(subject).await;
        if let Some(notice) = notice {
            notice.withdraw().await;
        }
        erased
    }

    async fn erase_announced(&self, subject: Subject<'_>) -> Result<ErasureReceipt, ErasureError> {
        let started = Instant::now();
        let linked_cookies = match subject {
            Subject::User(u) => cookies_sent_with(self.log, u).await?,
            Subject::Cookie(_) => BTreeSet::new(),
        };
        let mut subjects = vec![subject];
        subjects.extend(linked_cookies.iter().map(|c| Subject::Cookie(c)));
        for s in &subjects {
            self.record_opt_out(*s).await?;
        }
        tracing::info!(
            linked_cookies = linked_cookies.len(),
            "erasure: opt-out recorded; waiting for the processor to commit what was logged before it"
        );
        let mut passes = Vec::new();
        let mut waited_ms = 0;
        loop {
            let end = raw_log_end(self.log).await?;
            let waited = Instant::now();
            self.wait_for_processor(&end).await?;
            waited_ms += waited.elapsed().as_millis() as u64;
            let mut pass = Vec::new();
            for s in &subjects {
                pass.push(erase_rows(self.tables, self.daily_keys, self.subject_keys, *s).await?);
            }
            let removed: u64 = pass.iter().map(|r| r.rows_removed).sum();
            passes.push(pass);
            // done only when a pass over everything committed after the opt-out found nothing
            if removed == 0 {
                break;
            }
            if passes.len() >= MAX_PASSES {
                return Err(ErasureError::StillLanding { passes: passes.len() });
            }
        }
        let mut tables: BTreeMap<&'static str, TableErasure> = BTreeMap::new();
        let mut visitor_key_days = 0;
        for pass in &passes {
            for r in pass {
                visitor_key_days = visitor_key_days.max(r.visitor_key_days);
                for t in &r.tables {
                    let entry = tables.entry(t.table).or_insert(TableErasure {
                        table: t.table,
                        rows_removed: 0,
                        files_vacuumed: 0,
                    });
                    entry.rows_removed += t.rows_removed;
                    entry.files_vacuumed += t.files_vacuumed;
                }
            }
        }
        let tables: Vec<TableErasure> = tables.into_values().collect();
        Ok(ErasureReceipt {
            receipt_id: String::new(),
            subject_kind: match subject {
                Subject::Cookie(_) => "cookie_id",
                Subject::User(_) => "user_id",
            },
            opt_out_recorded: true,
            linked_cookies: linked_cookies.len(),
            visitor_key_days,
            rows_removed: tables.iter().map(|t| t.rows_removed).sum(),
            tables,
            passes: passes.len(),
            waited_for_processor_ms: waited_ms,
            duration_ms: started.elapsed().as_millis() as u64,
            completed_at: Utc::now(),
        })
    }

    async fn record_opt_out(&self, subject: Subject<'_>) -> Result<(), ErasureError> {
        let record = OptOutRecord::new(
            &self.subject_keys.optout,
            &self.subject_keys.targeting,
            subject,
            OptOutScope::All,
        );
        self.log
            .append(
                TOPIC_OPTOUTS,
                vec![Record {
                    key: Some(record.log_key()),
                    payload: record.to_bytes(),
                }],
            )
            .await
            .map_err(ErasureError::OptOut)?;
        self.opt_outs.apply(&record);
        Ok(())
    }

    /// Waits until `events` and every rollup record positions at or past `end` on every
    /// partition.
    pub async fn wait_for_processor(&self, end: &RawLogEnd) -> Result<(), ErasureError> {
        let mut logged = Instant::now();
        loop {
            let behind = behind(self.tables, end).await?;
            if behind.is_empty() {
                return Ok(());
            }
            if logged.elapsed() > Duration::from_secs(10) {
                tracing::info!(
                    ?behind,
                    "erasure: still waiting for the processor to commit past the opt-out"
                );
                logged = Instant::now();
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// The raw log's end now, per partition (the next offset to be written).
pub async fn raw_log_end(log: &dyn EventLog) -> Result<RawLogEnd, ErasureError> {
    let mut sub = log.read_all(TOPIC_RAW).await.map_err(ErasureError::RawLog)?;
    let mut end = BTreeMap::new();
    for p in sub.assignment() {
        let e = match sub.end_offset(p).await.map_err(ErasureError::RawLog)? {
            Some(e) => e,
            None => {
                // a log that cannot say: read to the end
                sub.seek(p, 0).await.map_err(ErasureError::RawLog)?;
                let mut next = 0;
                loop {
                    let got = sub
                        .poll(10_000, Duration::from_millis(100))
                        .await
                        .map_err(ErasureError::RawLog)?;
                    match got.last() {
                        Some(r) => next = r.position.offset + 1,
                        None => break,
                    }
                }
                next
            }
        };
        end.insert(p, e);
    }
    Ok(end)
}

/// The tables and partitions whose committed position is short of `end`: (table, partition,
/// committed next offset, wanted). The rollups count too: they commit after `events` (up to
/// `process.rollup_commit_interval_ms` later), and a processor that dies before they do
/// counts the `events` files it committed on its next start, so those files must still be
/// there. An erasure that rewrote one before would lose every other visitor's rows in it
/// from the rollups.
async fn behind(tables: &TablesLocation, end: &RawLogEnd) -> Result<Vec<(&'static str, u32, u64, u64)>, ErasureError> {
    let mut behind = Vec::new();
    for name in std::iter::once(TableName::Events).chain(TableName::ROLLUPS) {
        let name = name.as_str();
        let err = |reason: String| ErasureError::Table { table: name, reason };
        let Some(table) = marsad_tables::open_table(tables, name)
            .await
            .map_err(|e| err(e.to_string()))?
        else {
            // no table yet: only if nothing was ever logged is nothing behind
            behind.extend(end.iter().filter(|(_, e)| **e > 0).map(|(p, e)| (name, *p, 0, *e)));
            continue;
        };
        let snapshot = table.snapshot().map_err(|e| err(e.to_string()))?;
        let log_store = table.log_store();
        for (&partition, &wanted) in end {
            if wanted == 0 {
                continue;
            }
            let app = marsad_schemas::log_position_app_id(TOPIC_RAW, partition);
            let committed = snapshot
                .transaction_version(log_store.as_ref(), &app)
                .await
                .map_err(|e| err(e.to_string()))?
                .map_or(0, |v| (v.max(-1) + 1) as u64);
            if committed < wanted {
                behind.push((name, partition, committed, wanted));
            }
        }
    }
    Ok(behind)
}

/// The cookie ids the raw log still holds sent together with `user_id`.
pub async fn cookies_sent_with(log: &dyn EventLog, user_id: &str) -> Result<BTreeSet<String>, ErasureError> {
    let end = raw_log_end(log).await?;
    let mut sub = log.read_all(TOPIC_RAW).await.map_err(ErasureError::RawLog)?;
    // the partitions still to read, each up to its end now
    let mut open = BTreeMap::new();
    for (&p, &e) in &end {
        let from = sub.retained_from(p).await.map_err(ErasureError::RawLog)?;
        sub.seek(p, from).await.map_err(ErasureError::RawLog)?;
        if from < e {
            open.insert(p, e);
        }
    }
    let mut cookies = BTreeSet::new();
    let mut idle = 0;
    while !open.is_empty() && idle < 50 {
        let got = sub
            .poll(10_000, Duration::from_millis(200))
            .await
            .map_err(ErasureError::RawLog)?;
        idle = if got.is_empty() { idle + 1 } else { 0 };
        for r in got {
            if let Some(e) = open.get(&r.position.partition)
                && r.position.offset + 1 >= *e
            {
                open.remove(&r.position.partition);
            }
            if let Ok(env) = Envelope::from_bytes(&r.payload)
                && env.event.user_id.as_deref() == Some(user_id)
                && let Some(c) = env.event.cookie_id
            {
                cookies.insert(c);
            }
        }
    }
    Ok(cookies)
}

/// What one table gave up.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TableErasure {
    /// The table.
    pub table: &'static str,
    /// Rows deleted.
    pub rows_removed: u64,
    /// Data files deleted from storage by the vacuum.
    pub files_vacuumed: usize,
}

/// The answer to an erasure request.
#[derive(Debug, Clone, Serialize)]
pub struct ErasureReceipt {
    /// Names this erasure in logs and in `/v1/subjects/erasures/{id}`.
    pub receipt_id: String,
    /// `cookie_id` or `user_id` (the identifier itself is not repeated).
    pub subject_kind: &'static str,
    /// Whether an `all` opt-out was recorded first.
    pub opt_out_recorded: bool,
    /// Cookies the raw log held sent with the user id, erased with it.
    pub linked_cookies: usize,
    /// Passes over the tables (the last found nothing left).
    pub passes: usize,
    /// How long the erasure waited for the processor to commit past the opt-out.
    pub waited_for_processor_ms: u64,
    /// Days whose visitor key still existed and was used to find rows.
    pub visitor_key_days: usize,
    /// Per table.
    pub tables: Vec<TableErasure>,
    /// Sum over the tables.
    pub rows_removed: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// When it finished.
    pub completed_at: DateTime<Utc>,
}

/// What one pass removed of one subject.
#[derive(Debug, Clone)]
pub struct RowsErased {
    /// Days whose visitor key was used.
    pub visitor_key_days: usize,
    /// Per table.
    pub tables: Vec<TableErasure>,
    /// Sum over the tables.
    pub rows_removed: u64,
}

/// Deletes every row linkable to `subject` from every table at `location` (the opt-out and
/// the wait are the caller's: [`Erasure::erase`] does both first).
pub async fn erase_rows(
    location: &TablesLocation,
    daily_keys: &dyn DailyKeyStore,
    subject_keys: &SubjectKeys,
    subject: Subject<'_>,
) -> Result<RowsErased, ErasureError> {
    let aid = audience_id(&subject_keys.targeting, subject);
    let visitor_keys: Vec<String> = match subject {
        Subject::Cookie(c) => daily_keys
            .existing()
            .map_err(|e| ErasureError::Table {
                table: "-",
                reason: e.to_string(),
            })?
            .iter()
            .map(|(_, key)| visitor_key(key, c))
            .collect(),
        Subject::User(_) => Vec::new(),
    };
    let mut tables = Vec::new();
    for name in TableName::ALL.iter().map(|t| t.as_str()) {
        let err = |reason: String| ErasureError::Table { table: name, reason };
        let Some(table) = marsad_tables::open_table(location, name)
            .await
            .map_err(|e| err(e.to_string()))?
        else {
            continue;
        };
        let columns: Vec<String> = table
            .snapshot()
            .map_err(|e| err(e.to_string()))?
            .schema()
            .fields()
            .map(|f| f.name().to_owned())
            .collect();
        let mut clauses = Vec::new();
        if columns.iter().any(|c| c == "audience_id") {
            clauses.push(format!("audience_id = '{aid}'"));
        }
        if columns.iter().any(|c| c == "visitor_key") && !visitor_keys.is_empty() {
            let list = visitor_keys
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ");
            clauses.push(format!("visitor_key IN ({list})"));
        }
        if clauses.is_empty() {
            continue;
        }
        let predicate = clauses.join(" OR ");
        let mut table = table;
        let mut conflicts = 0;
        let (rows, files_vacuumed) = loop {
            match delete_matching(location, &table, name, &predicate).await {
                Ok(done) => break done,
                // a compaction of the same files committed since this read (it conflicts the
                // other way round too): read the table again and delete from what it holds now
                Err(DeleteFailure::Conflict(reason)) if conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    tracing::info!(
                        table = name,
                        reason,
                        "erasure: the table changed under the delete; again"
                    );
                    tokio::time::sleep(Duration::from_millis(100 * conflicts.min(10) as u64)).await;
                    table = marsad_tables::open_table(location, name)
                        .await
                        .map_err(|e| err(e.to_string()))?
                        .ok_or_else(|| err("the table is gone".to_owned()))?;
                }
                Err(DeleteFailure::Conflict(reason) | DeleteFailure::Other(reason)) => return Err(err(reason)),
            }
        };
        tables.push(TableErasure {
            table: name,
            rows_removed: rows,
            files_vacuumed,
        });
    }
    Ok(RowsErased {
        visitor_key_days: visitor_keys.len(),
        rows_removed: tables.iter().map(|t| t.rows_removed).sum(),
        tables,
    })
}

/// Conflicting commits (a compaction rewriting the same files) an erasure's delete retries,
/// pausing longer each time (up to a second), before it gives up.
const MAX_CONFLICTS: usize = 30;

/// Why one delete did not commit.
enum DeleteFailure {
    /// Another commit since the read rewrote files this delete reads or removes.
    Conflict(String),
    /// Anything else.
    Other(String),
}

/// Counts the rows of `table` matching `predicate`, deletes them in one commit and removes
/// the rewritten files from storage: (rows, files vacuumed). A delete that fails removes the
/// files it wrote: they hold every other row of the files it rewrote, and no vacuum would.
async fn delete_matching(
    location: &TablesLocation,
    table: &deltalake::DeltaTable,
    name: &str,
    predicate: &str,
) -> Result<(u64, usize), DeleteFailure> {
    let other = |e: &dyn std::fmt::Display| DeleteFailure::Other(e.to_string());
    // count first: the delete's own metrics may not know the count for whole-file removals
    let ctx = SessionContext::new();
    marsad_tables::register(&ctx, name, table)
        .await
        .map_err(|e| other(&e))?;
    let batches = ctx
        .sql(&format!("SELECT count(*) FROM {name} WHERE {predicate}"))
        .await
        .map_err(|e| other(&e))?
        .collect()
        .await
        .map_err(|e| other(&e))?;
    let rows = batches
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<Int64Array>().map(|a| a.value(0)))
        .unwrap_or(0) as u64;
    if rows == 0 {
        // nothing left; what an earlier erasure removed may still be in storage (its vacuum
        // failed, or its process died after the delete): repeating the erasure removes it
        let vacuumed = marsad_tables::remove_replaced_files(table.clone(), chrono::Duration::zero())
            .await
            .map_err(|e| other(&e))?;
        return Ok((0, vacuumed));
    }
    let run = marsad_tables::RewriteRun::new();
    let deleted = table
        .clone()
        .delete()
        .with_session_state(marsad_tables::rewrite_session())
        .with_predicate(predicate.to_owned())
        .with_writer_properties(run.writer_properties())
        .await;
    if deleted.is_err() {
        let unreferenced = marsad_tables::Unreferenced::Of(&run);
        if let Err(e) = marsad_tables::remove_unreferenced_rewrites(location, name, None, unreferenced).await {
            tracing::error!(table = name, error = %e, "the files of a failed erasure delete could not be removed");
        }
    }
    let (table, _metrics) = deleted.map_err(|e| match e {
        deltalake::DeltaTableError::Transaction {
            source: deltalake::kernel::transaction::TransactionError::CommitConflict(c),
        } => DeleteFailure::Conflict(c.to_string()),
        // a file of the version read was vacuumed meanwhile (another erasure): read again
        e if marsad_tables::is_vanished_file(&e) => DeleteFailure::Conflict(e.to_string()),
        // a commit after the version read left the log (cleaned up meanwhile): read again
        e @ deltalake::DeltaTableError::InvalidVersion(_) => DeleteFailure::Conflict(e.to_string()),
        e => other(&e),
    })?;
    // the files it rewrote hold the subject's rows: removed from storage at once
    let vacuumed = marsad_tables::remove_replaced_files(table, chrono::Duration::zero())
        .await
        .map_err(|e| other(&e))?;
    Ok((rows, vacuumed))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use deltalake::kernel::transaction::CommitProperties;
    use deltalake::kernel::{DataType as DeltaType, PrimitiveType, StructField, Transaction};

    use super::*;

    /// Writes one row to `name` (creating it) recording raw-log partition 0 at `offset`.
    async fn commit_position(
        location: &TablesLocation,
        name: &str,
        offset: i64,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let table = match marsad_tables::open_table(location, name).await? {
            Some(t) => t,
            None => {
                marsad_tables::table_handle(location, name)?
                    .create()
                    .with_columns([StructField::new("n", DeltaType::Primitive(PrimitiveType::Long), true)])
                    .await?
            }
        };
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![offset]))])?;
        let app = marsad_schemas::log_position_app_id(TOPIC_RAW, 0);
        table
            .write(vec![batch])
            .with_commit_properties(
                CommitProperties::default().with_application_transactions(vec![Transaction::new(app, offset)]),
            )
            .await?;
        Ok(())
    }

    /// `events` has committed past the opt-out but a rollup has not (it commits up to
    /// `rollup_commit_interval_ms` later): the erasure must keep waiting, or it would rewrite
    /// an `events` file the rollups still have to count.
    #[tokio::test]
    async fn an_erasure_waits_for_the_rollups_as_well_as_events() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let location = TablesLocation::local(dir.path())?;
        let end: RawLogEnd = BTreeMap::from([(0, 10)]);
        commit_position(&location, "events", 9).await?;
        assert_eq!(
            behind(&location, &end).await?,
            vec![
                ("traffic_hourly", 0, 0, 10),
                ("ad_performance_hourly", 0, 0, 10),
                ("demographics_daily", 0, 0, 10),
                ("sources_hourly", 0, 0, 10),
                ("pages_hourly", 0, 0, 10),
                ("goals_hourly", 0, 0, 10),
                ("funnels_hourly", 0, 0, 10)
            ],
            "rollups not created yet"
        );
        for rollup in TableName::ROLLUPS {
            commit_position(&location, rollup.as_str(), 9).await?;
        }
        assert!(behind(&location, &end).await?.is_empty(), "every table is past the end");
        let later: RawLogEnd = BTreeMap::from([(0, 12)]);
        commit_position(&location, "events", 11).await?;
        commit_position(&location, "ad_performance_hourly", 11).await?;
        commit_position(&location, "demographics_daily", 11).await?;
        commit_position(&location, "sources_hourly", 11).await?;
        commit_position(&location, "pages_hourly", 11).await?;
        commit_position(&location, "goals_hourly", 11).await?;
        commit_position(&location, "funnels_hourly", 11).await?;
        assert_eq!(behind(&location, &later).await?, vec![("traffic_hourly", 0, 10, 12)]);
        Ok(())
    }
}
