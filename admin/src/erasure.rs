//! Erasure: an `all` opt-out is recorded first (so nothing new is collected
//! about the subject), then every row linkable to it is deleted from every
//! table — rows with the subject's `audience_id`, and for a cookie the rows
//! with its `visitor_key` of every day whose key still exists — and the
//! rewritten files are vacuumed at once, so older Delta versions do not keep
//! them either.

use std::time::{Duration, Instant};

use arrow::array::{Array, Int64Array};
use chrono::{DateTime, Utc};
use datafusion::prelude::SessionContext;
use deltalake::operations::vacuum::VacuumMode;
use marsad_config::TablesLocation;
use marsad_eventlog::{EventLog, Record};
use marsad_privacy::keys::{DailyKeyStore, SecretKey};
use marsad_privacy::optout::{OptOutRecord, OptOutRegistry, OptOutScope, subject_key};
use marsad_privacy::pseudonym::{Subject, audience_id, visitor_key};
use marsad_schemas::{TOPIC_OPTOUTS, TableName};
use serde::Serialize;

/// Why an erasure could not finish; what was removed before stays removed, and repeating
/// the erasure is safe.
#[derive(Debug, thiserror::Error)]
pub enum ErasureError {
    /// The opt-out could not be recorded, so nothing was erased.
    #[error("could not record the opt-out, nothing was erased: {0}")]
    OptOut(marsad_eventlog::Error),
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
    /// Where opt-outs are recorded.
    pub log: &'a dyn EventLog,
    /// This process's opt-outs in force, updated at once.
    pub opt_outs: &'a OptOutRegistry,
    /// Hashes identifiers into `audience_id`s and opt-out subjects.
    pub targeting_key: &'a SecretKey,
    /// The daily visitor keys that still exist.
    pub daily_keys: &'a dyn DailyKeyStore,
    /// How long the processor needs to see the opt-out and commit what it buffered before.
    pub settle: Duration,
}

impl Erasure<'_> {
    /// Records an `all` opt-out for `subject`, waits for the processor to see it, then deletes
    /// every row linkable to the subject from every table.
    pub async fn erase(&self, subject: Subject<'_>) -> Result<ErasureReceipt, ErasureError> {
        let record = OptOutRecord {
            subject: subject_key(self.targeting_key, subject),
            scope: OptOutScope::All,
            at: Utc::now(),
        };
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
        tracing::info!("erasure: opt-out recorded; waiting for the processor to see it");
        tokio::time::sleep(self.settle).await;
        erase_rows(self.tables, self.daily_keys, self.targeting_key, subject, true).await
    }
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
    /// `cookie_id` or `user_id` (the identifier itself is not repeated).
    pub subject_kind: &'static str,
    /// Whether an `all` opt-out was recorded first.
    pub opt_out_recorded: bool,
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

/// Deletes every row linkable to `subject` from every table at `location` (the opt-out is the
/// caller's: [`Erasure::erase`] records it first).
pub async fn erase_rows(
    location: &TablesLocation,
    daily_keys: &dyn DailyKeyStore,
    targeting_key: &SecretKey,
    subject: Subject<'_>,
    opt_out_recorded: bool,
) -> Result<ErasureReceipt, ErasureError> {
    let started = Instant::now();
    let aid = audience_id(targeting_key, subject);
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
        // count first: the delete's own metrics may not know the count for whole-file removals
        let ctx = SessionContext::new();
        marsad_tables::register(&ctx, name, &table)
            .await
            .map_err(|e| err(e.to_string()))?;
        let batches = ctx
            .sql(&format!("SELECT count(*) FROM {name} WHERE {predicate}"))
            .await
            .map_err(|e| err(e.to_string()))?
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?;
        let rows = batches
            .first()
            .and_then(|b| b.column(0).as_any().downcast_ref::<Int64Array>().map(|a| a.value(0)))
            .unwrap_or(0) as u64;
        if rows == 0 {
            tables.push(TableErasure {
                table: name,
                rows_removed: 0,
                files_vacuumed: 0,
            });
            continue;
        }
        let (table, _metrics) = table
            .delete()
            .with_predicate(predicate)
            .await
            .map_err(|e| err(e.to_string()))?;
        // Lite mode removes only files tombstoned by commits (never a writer's uncommitted files)
        let (_, vacuumed) = table
            .vacuum()
            .with_mode(VacuumMode::Lite)
            .with_retention_period(chrono::Duration::zero())
            .with_enforce_retention_duration(false)
            .await
            .map_err(|e| err(e.to_string()))?;
        tables.push(TableErasure {
            table: name,
            rows_removed: rows,
            files_vacuumed: vacuumed.files_deleted.len(),
        });
    }
    Ok(ErasureReceipt {
        subject_kind: match subject {
            Subject::Cookie(_) => "cookie_id",
            Subject::User(_) => "user_id",
        },
        opt_out_recorded,
        visitor_key_days: visitor_keys.len(),
        rows_removed: tables.iter().map(|t| t.rows_removed).sum(),
        tables,
        duration_ms: started.elapsed().as_millis() as u64,
        completed_at: Utc::now(),
    })
}
