//! The Delta tables the processor writes: created on first start, appended to
//! with the positions each commit covers recorded in the same transaction.

use std::collections::HashMap;

use arrow::array::{Array, StringArray};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use datafusion::prelude::SessionContext;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{StructType, Transaction};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use marsad_config::TablesLocation;
use marsad_schemas::{DATE_COLUMN, TableName, events_schema};

use crate::{Error, Result};

/// A handle on table `name` at `tables`, not loaded yet (a local directory is created if missing).
pub fn table_handle(tables: &TablesLocation, name: &'static str) -> Result<DeltaTable> {
    if let Some(dir) = tables.local_dir() {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io { path: dir, source: e })?;
    }
    DeltaTableBuilder::from_url(tables.table_url(name))
        .map(|b| b.with_storage_options(tables.storage_options()))
        .and_then(|b| b.build())
        .map_err(|source| Error::Delta { table: name, source })
}

/// Table `name` at its latest version, or `None` when it has no commit yet.
pub async fn open_existing(tables: &TablesLocation, name: &'static str) -> Result<Option<DeltaTable>> {
    let delta = |source| Error::Delta { table: name, source };
    // probe only an existing log: loading an empty location makes the kernel log an error
    let exists = match tables.local_dir() {
        Some(dir) => dir.join(name).join("_delta_log").is_dir(),
        None => true,
    };
    if !exists {
        return Ok(None);
    }
    let mut table = table_handle(tables, name)?;
    if !table.verify_deltatable_existence().await.map_err(delta)? {
        return Ok(None);
    }
    table.load().await.map_err(delta)?;
    Ok(Some(table))
}

/// What a table is made of, for creating it on first start.
#[derive(Clone)]
pub struct TableSpec {
    /// Which table.
    pub name: TableName,
    /// Its columns.
    pub schema: SchemaRef,
    /// Its partition columns.
    pub partitions: &'static [&'static str],
    /// What a row is (kept in the table's metadata).
    pub comment: &'static str,
}

/// A Delta table the processor appends to.
pub struct DeltaSink {
    name: &'static str,
    table: DeltaTable,
}

impl DeltaSink {
    /// Opens table `spec.name` at `tables`, creating it on first start.
    pub async fn open_or_create(tables: &TablesLocation, spec: &TableSpec) -> Result<Self> {
        let name = spec.name.as_str();
        let delta = |source| Error::Delta { table: name, source };
        if let Some(table) = open_existing(tables, name).await? {
            return Ok(DeltaSink { name, table });
        }
        let table = table_handle(tables, name)?;
        let schema: StructType = spec.schema.as_ref().try_into_kernel().map_err(|e| delta(e.into()))?;
        let created = table
            .create()
            .with_table_name(name)
            .with_comment(spec.comment)
            .with_columns(schema.fields().cloned())
            .with_partition_columns(spec.partitions.iter().copied())
            .with_save_mode(SaveMode::Ignore)
            // no retry: a writer that lost the race to create the table must not commit the
            // schema again as the next version (that would conflict with the winner's appends)
            .with_commit_properties(CommitProperties::default().with_max_retries(0))
            .await;
        match created {
            Ok(table) => Ok(DeltaSink { name, table }),
            // another processor created it first
            Err(e) => match open_existing(tables, name).await? {
                Some(table) => Ok(DeltaSink { name, table }),
                None => Err(delta(e)),
            },
        }
    }

    fn delta(&self, source: DeltaTableError) -> Error {
        Error::Delta {
            table: self.name,
            source,
        }
    }

    /// The last position committed for each `txn` app id (absent: none yet), read from one
    /// snapshot after catching up with other writers.
    ///
    /// One snapshot for all of them, and the same one the next append builds on: positions read
    /// across several refreshes could mix an old position with a newer table, and the append's
    /// conflict check (which only looks at commits after its snapshot) would then let a
    /// duplicate through.
    pub async fn committed(&mut self, app_ids: &[String]) -> Result<HashMap<String, i64>> {
        self.table.update_state().await.map_err(|e| self.delta(e))?;
        let log_store = self.table.log_store();
        let snapshot = self.table.snapshot().map_err(|e| self.delta(e))?;
        let mut committed = HashMap::new();
        for app_id in app_ids {
            let version = snapshot
                .transaction_version(log_store.as_ref(), app_id)
                .await
                .map_err(|e| self.delta(e))?;
            if let Some(v) = version {
                committed.insert(app_id.clone(), v);
            }
        }
        Ok(committed)
    }

    /// Appends `batch` and records `positions` (app id, position) in the same transaction;
    /// returns the new table version.
    pub async fn append(&mut self, batch: RecordBatch, positions: &[(String, i64)]) -> Result<u64> {
        let txns: Vec<Transaction> = positions.iter().map(|(app, p)| Transaction::new(app, *p)).collect();
        let partitions: Vec<String> = self.partition_columns();
        // a blind append (it reads nothing of the table): a concurrent erasure, backfill or
        // compaction that rewrites other files need not conflict with it
        let properties = CommitProperties::default()
            .with_application_transactions(txns)
            .with_metadata([("isBlindAppend".to_owned(), serde_json::Value::Bool(true))]);
        let table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_partition_columns(partitions)
            .with_commit_properties(properties)
            .await
            .map_err(|e| self.delta(e))?;
        self.table = table;
        self.table
            .version()
            .ok_or_else(|| self.delta(DeltaTableError::Generic("no version after a commit".into())))
    }

    /// Replaces the whole table with `batch` in one commit carrying `metadata`; returns the new version.
    pub async fn overwrite(&mut self, batch: RecordBatch, metadata: Vec<(String, serde_json::Value)>) -> Result<u64> {
        let partitions: Vec<String> = self.partition_columns();
        let table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Overwrite)
            .with_partition_columns(partitions)
            .with_commit_properties(CommitProperties::default().with_metadata(metadata))
            .await
            .map_err(|e| self.delta(e))?;
        self.table = table;
        self.table
            .version()
            .ok_or_else(|| self.delta(DeltaTableError::Generic("no version after a commit".into())))
    }

    /// Replaces the rows matching `predicate` (a SQL condition on partition columns) with
    /// `batch` in one commit; rows appended concurrently by others are kept.
    pub async fn replace_where(&mut self, batch: RecordBatch, predicate: String) -> Result<u64> {
        let partitions: Vec<String> = self.partition_columns();
        let table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Overwrite)
            .with_replace_where(predicate)
            .with_partition_columns(partitions)
            .await
            .map_err(|e| self.delta(e))?;
        self.table = table;
        self.table
            .version()
            .ok_or_else(|| self.delta(DeltaTableError::Generic("no version after a commit".into())))
    }

    /// Deletes the rows matching `predicate` (a SQL condition) in one commit.
    pub async fn delete_where(&mut self, predicate: String) -> Result<u64> {
        let (table, _) = self
            .table
            .clone()
            .delete()
            .with_predicate(predicate)
            .await
            .map_err(|e| self.delta(e))?;
        self.table = table;
        self.table
            .version()
            .ok_or_else(|| self.delta(DeltaTableError::Generic("no version after a commit".into())))
    }

    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How many data files each value of the `date` partition has now.
    pub fn files_per_date(&self) -> Result<std::collections::BTreeMap<String, usize>> {
        let mut out = std::collections::BTreeMap::new();
        for uri in self.table.get_file_uris().map_err(|e| self.delta(e))? {
            if let Some(date) = uri.split('/').find_map(|seg| seg.strip_prefix("date=")) {
                *out.entry(date.to_owned()).or_default() += 1;
            }
        }
        Ok(out)
    }

    fn partition_columns(&self) -> Vec<String> {
        self.table
            .snapshot()
            .map(|s| s.metadata().partition_columns().to_vec())
            .unwrap_or_default()
    }

    /// The table's current version.
    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }

    /// The table, for reads.
    pub fn table(&self) -> &DeltaTable {
        &self.table
    }

    /// A DataFusion session with this table registered under its name, at `version` or the latest.
    pub async fn session(&self, version: Option<u64>) -> Result<SessionContext> {
        let query = |source| Error::Query {
            table: self.name,
            source,
        };
        let mut table = self.table.clone();
        if let Some(v) = version {
            table.load_version(v as _).await.map_err(|e| self.delta(e))?;
        }
        let ctx = SessionContext::new();
        // an object store (s3://) must be known to the session before it reads the files
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| self.delta(e))?;
        let provider = table.table_provider().await.map_err(query)?;
        ctx.register_table(self.name, provider).map_err(query)?;
        Ok(ctx)
    }

    /// Runs `sql` against this table (at `version` or the latest).
    pub async fn query(&self, sql: &str, version: Option<u64>) -> Result<Vec<RecordBatch>> {
        let query = |source| Error::Query {
            table: self.name,
            source,
        };
        let ctx = self.session(version).await?;
        ctx.sql(sql).await.map_err(query)?.collect().await.map_err(query)
    }
}

/// The `events` table spec.
pub fn events_spec() -> TableSpec {
    TableSpec {
        name: TableName::Events,
        schema: events_schema(),
        partitions: &[DATE_COLUMN],
        comment: "One row per anonymized event; no IP, cookie id or user id",
    }
}

/// The `events` table as the processor writes it.
pub struct EventsTable {
    sink: DeltaSink,
}

impl EventsTable {
    /// Opens the `events` table at `tables`, creating it (partitioned by date) on first start.
    pub async fn open_or_create(tables: &TablesLocation) -> Result<Self> {
        Ok(EventsTable {
            sink: DeltaSink::open_or_create(tables, &events_spec()).await?,
        })
    }

    /// The last raw-log offset committed for each `txn` app id, from one snapshot.
    pub async fn committed_offsets(&mut self, app_ids: &[String]) -> Result<HashMap<String, i64>> {
        self.sink.committed(app_ids).await
    }

    /// Appends `batch` and records `positions` (app id, last offset) in the same transaction;
    /// returns the new version.
    pub async fn append(&mut self, batch: RecordBatch, positions: &[(String, u64)]) -> Result<u64> {
        let positions: Vec<(String, i64)> = positions.iter().map(|(a, o)| (a.clone(), *o as i64)).collect();
        self.sink.append(batch, &positions).await
    }

    /// Event ids stored since `since`, to drop retried duplicates after a restart.
    pub async fn event_ids_since(&self, since: NaiveDate) -> Result<Vec<String>> {
        let sql = format!("SELECT event_id FROM events WHERE {DATE_COLUMN} >= DATE '{since}'");
        let mut ids = Vec::new();
        for b in self.sink.query(&sql, None).await? {
            let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
            if let Some(s) = col.as_any().downcast_ref::<StringArray>() {
                ids.extend(s.iter().flatten().map(str::to_owned));
            }
        }
        Ok(ids)
    }

    /// The latest session of each visitor in the stored recent days, to continue it after a restart.
    pub async fn recent_sessions(&self) -> Result<Vec<(String, String, chrono::DateTime<chrono::Utc>)>> {
        if self.sink.version().is_none_or(|v| v == 0) {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT visitor_key, session_id, max(ts) AS last FROM events \
             WHERE visitor_key IS NOT NULL AND session_id IS NOT NULL \
             AND {DATE_COLUMN} >= (SELECT max({DATE_COLUMN}) FROM events) - INTERVAL '1' DAY \
             GROUP BY visitor_key, session_id"
        );
        let mut out = Vec::new();
        for b in self.sink.query(&sql, None).await? {
            let text = |i: usize| -> Result<StringArray> {
                let col = arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8)?;
                Ok(col
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .unwrap_or_else(|| StringArray::from(Vec::<String>::new())))
            };
            let (visitors, sessions) = (text(0)?, text(1)?);
            let last = arrow::compute::cast(
                b.column(2),
                &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
            )?;
            let Some(last) = last.as_any().downcast_ref::<arrow::array::TimestampMicrosecondArray>() else {
                continue;
            };
            for i in 0..b.num_rows().min(visitors.len()).min(sessions.len()) {
                if let Some(ts) = chrono::DateTime::from_timestamp_micros(last.value(i)) {
                    out.push((visitors.value(i).to_owned(), sessions.value(i).to_owned(), ts));
                }
            }
        }
        Ok(out)
    }

    /// The table's current version (for logs).
    pub fn version(&self) -> Option<u64> {
        self.sink.version()
    }

    /// The underlying sink, for reads.
    pub fn sink(&self) -> &DeltaSink {
        &self.sink
    }
}
