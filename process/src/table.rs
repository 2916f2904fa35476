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
use deltalake::{DeltaTable, DeltaTableError, TableProperty};
use marsad_config::TablesLocation;
use marsad_schemas::{DATE_COLUMN, TableName, events_schema};
use marsad_tables::{open_table, table_handle};

use crate::dedup::RecentEventIds;
use crate::{Error, Result};

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

impl TableSpec {
    /// The Delta table properties Marsad sets on the table.
    ///
    /// - Expired log entries are removed by the maintenance every ten minutes, not by every
    ///   commit: on every commit delta-rs would list the whole `_delta_log` (a `stat` per
    ///   entry) to find them, and commits grew 3.2x slower over 3,000 versions (BENCHMARKS.md).
    /// - The log and the replaced files it remembers are kept an hour, not Delta's month and
    ///   week: what the log holds is replayed by every commit.
    /// - `events`: Delta's default isolation (Serializable) fails a delete on any concurrent
    ///   append whose rows might match it, so an erasure would never commit while events keep
    ///   arriving. Under WriteSerializable the processor's blind appends do not fail it; what
    ///   of the subject they land is caught by the erasure's next pass (an opt-out stops the
    ///   rest). The rollups keep Delta's default.
    fn properties(&self) -> Vec<(TableProperty, &'static str, Setting)> {
        let mut properties = vec![
            (
                TableProperty::DataSkippingStatsColumns,
                self.stats_columns(),
                Setting::Required,
            ),
            (TableProperty::EnableExpiredLogCleanup, "false", Setting::Default),
            (TableProperty::LogRetentionDuration, LOG_RETENTION, Setting::Default),
            (
                TableProperty::DeletedFileRetentionDuration,
                DELETED_FILE_RETENTION,
                Setting::Default,
            ),
        ];
        if self.name == TableName::Events {
            properties.push((TableProperty::IsolationLevel, WRITE_SERIALIZABLE, Setting::Required));
        }
        properties
    }

    /// The columns Delta keeps min/max statistics of in its log, for skipping files: the
    /// time column queries narrow a date to (`demographics_daily` has none but its date).
    /// Every commit replays the statistics of every
    /// active file (delta-rs keeps them parsed in its snapshot), so each column costs on
    /// every commit and every query's refresh: with all 26 `events` columns, a commit over
    /// 300 files took 92 ms; with `ts` alone, 25 ms (`benches/log_growth.rs`). No
    /// pseudonym, audience id, path or city is copied into the log as a file's min or max.
    fn stats_columns(&self) -> &'static str {
        match self.name {
            TableName::Events => "ts",
            TableName::TrafficHourly
            | TableName::AdPerformanceHourly
            | TableName::SourcesHourly
            | TableName::PagesHourly
            | TableName::GoalsHourly
            | TableName::FunnelsHourly => "hour",
            TableName::DemographicsDaily => "country",
            // (segment_id is a partition column: its value is in the file's path already)
            TableName::SegmentMembers => "refreshed_at",
        }
    }
}

/// Appends in a row that rewrites of the same table may fail before the conflict is
/// returned (the caller gives the partitions up and catches up again).
const MAX_REWRITE_CONFLICTS: usize = 5;

/// Whether a commit failed because another commit since its snapshot removed files (an
/// erasure, a compaction), not because another writer recorded positions of the same
/// partitions.
fn is_rewrite_conflict(e: &Error) -> bool {
    use deltalake::kernel::transaction::{CommitConflictError, TransactionError};
    matches!(
        e,
        Error::Delta {
            source: DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(
                    CommitConflictError::ConcurrentDeleteRead | CommitConflictError::ConcurrentDeleteDelete
                )
            },
            ..
        }
    )
}

/// A Delta table the processor appends to.
#[derive(Clone)]
pub struct DeltaSink {
    name: &'static str,
    table: DeltaTable,
    /// Per app id, the position this sink last committed or read as its own (none yet:
    /// `None`): what a retry over a rewrite expects to find still recorded.
    recorded: HashMap<String, Option<i64>>,
}

impl DeltaSink {
    /// Opens table `spec.name` at `tables`, creating it on first start.
    pub async fn open_or_create(tables: &TablesLocation, spec: &TableSpec) -> Result<Self> {
        let name = spec.name.as_str();
        let delta = |source| Error::Delta { table: name, source };
        if let Some(table) = open_table(tables, name).await? {
            let mut sink = DeltaSink {
                name,
                table,
                recorded: HashMap::new(),
            };
            sink.settle_properties(spec).await?;
            return Ok(sink);
        }
        let table = table_handle(tables, name)?;
        let schema: StructType = spec.schema.as_ref().try_into_kernel().map_err(|e| delta(e.into()))?;
        let mut create = table.create();
        for (key, value, _) in spec.properties() {
            create = create.with_configuration_property(key, Some(value));
        }
        let created = create
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
            Ok(table) => Ok(DeltaSink {
                name,
                table,
                recorded: HashMap::new(),
            }),
            // another processor created it first
            Err(e) => match open_table(tables, name).await? {
                Some(table) => Ok(DeltaSink {
                    name,
                    table,
                    recorded: HashMap::new(),
                }),
                None => Err(delta(e)),
            },
        }
    }

    /// Sets on a table an earlier Marsad made the properties [`TableSpec::properties`] wants.
    async fn settle_properties(&mut self, spec: &TableSpec) -> Result<()> {
        let configuration = self
            .table
            .snapshot()
            .map_err(|e| self.delta(e))?
            .metadata()
            .configuration()
            .clone();
        let missing: HashMap<String, String> = spec
            .properties()
            .into_iter()
            .filter(|(key, value, setting)| match configuration.get(key.as_ref()) {
                None => true,
                Some(current) => *setting == Setting::Required && current != value,
            })
            .map(|(key, value, _)| (key.as_ref().to_owned(), value.to_owned()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let set = self
            .table
            .clone()
            .set_tbl_properties()
            .with_properties(missing.clone())
            .await;
        match set {
            Ok(table) => self.table = table,
            // another processor set them (or wrote) first: they are set, or the next open sets them
            Err(e) => {
                tracing::warn!(table = self.name, properties = ?missing, error = %e, "could not set the table's properties")
            }
        }
        Ok(())
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
        let committed = self.latest_positions(app_ids).await?;
        for app in app_ids {
            self.recorded.insert(app.clone(), committed.get(app).copied());
        }
        Ok(committed)
    }

    /// The positions recorded for `app_ids` in the latest version.
    async fn latest_positions(&mut self, app_ids: &[String]) -> Result<HashMap<String, i64>> {
        self.table.update_state().await.map_err(|e| self.delta(e))?;
        self.positions_in_snapshot(app_ids).await
    }

    /// Appends `batch` and records `positions` (app id, position) in the same transaction;
    /// returns the new table version.
    ///
    /// delta-rs takes an append for a read of every file in its snapshot, so an erasure's
    /// delete or a compaction committed meanwhile fails it (`ConcurrentDeleteRead`), though
    /// the append read nothing. It goes on the newer version then, unless a position of one
    /// of `positions`' app ids is recorded now that this sink neither committed nor read as
    /// its own ([`DeltaSink::committed`]; for an app id it never did, one its snapshot did not
    /// hold): that is a partition that moved to another processor, and the conflict is
    /// returned. Each try writes its files
    /// anew; a failed try's files are referenced by no version, and the sweep of unreferenced
    /// files removes them a day later (`marsad_tables::UNREFERENCED_KEPT`).
    pub async fn append(&mut self, batch: RecordBatch, positions: &[(String, i64)]) -> Result<u64> {
        let mut rewrites = 0;
        loop {
            match self.append_once(batch.clone(), positions).await {
                Err(e) if rewrites < MAX_REWRITE_CONFLICTS && is_rewrite_conflict(&e) => {
                    rewrites += 1;
                    let apps: Vec<String> = positions.iter().map(|(app, _)| app.clone()).collect();
                    // the snapshot the failed commit built on (a failed write leaves it as it was)
                    let before = self.positions_in_snapshot(&apps).await?;
                    let now = self.latest_positions(&apps).await?;
                    let moved = apps.iter().any(|app| {
                        let expected = match self.recorded.get(app) {
                            Some(own) => *own,
                            None => before.get(app).copied(),
                        };
                        now.get(app).copied() != expected
                    });
                    if moved {
                        return Err(e);
                    }
                    tracing::debug!(
                        table = self.name,
                        rewrites,
                        "a rewrite committed under an append; appending again"
                    );
                }
                Ok(version) => {
                    self.recorded
                        .extend(positions.iter().map(|(app, p)| (app.clone(), Some(*p))));
                    return Ok(version);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The positions recorded for `app_ids` in the snapshot this sink holds, without reading
    /// newer commits.
    async fn positions_in_snapshot(&self, app_ids: &[String]) -> Result<HashMap<String, i64>> {
        let log_store = self.table.log_store();
        let snapshot = self.table.snapshot().map_err(|e| self.delta(e))?;
        let mut recorded = HashMap::new();
        for app_id in app_ids {
            let version = snapshot
                .transaction_version(log_store.as_ref(), app_id)
                .await
                .map_err(|e| self.delta(e))?;
            if let Some(v) = version {
                recorded.insert(app_id.clone(), v);
            }
        }
        Ok(recorded)
    }

    /// How this table's appends and merges are written ([`append_writer_properties`]).
    fn append_properties(&self) -> Result<deltalake::parquet::file::properties::WriterProperties> {
        append_writer_properties().map_err(|source| Error::Query {
            table: self.name,
            source,
        })
    }

    async fn append_once(&mut self, batch: RecordBatch, positions: &[(String, i64)]) -> Result<u64> {
        let txns: Vec<Transaction> = positions.iter().map(|(app, p)| Transaction::new(app, *p)).collect();
        let partitions: Vec<String> = self.partition_columns();
        // marked a blind append (it reads nothing of the table): a concurrent erasure, backfill
        // or compaction that rewrites files need not fail because of it
        let properties = CommitProperties::default()
            .with_application_transactions(txns)
            .with_metadata([("isBlindAppend".to_owned(), serde_json::Value::Bool(true))]);
        let table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_writer_properties(self.append_properties()?)
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
    /// The batch's schema replaces the table's (a column added in a newer Marsad).
    pub async fn overwrite(&mut self, batch: RecordBatch, metadata: Vec<(String, serde_json::Value)>) -> Result<u64> {
        let partitions: Vec<String> = self.partition_columns();
        let table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite)
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
        self.replace_where_recording(batch, predicate, &[]).await
    }

    /// [`DeltaSink::replace_where`], recording `positions` (app id, position) in the same commit.
    pub async fn replace_where_recording(
        &mut self,
        batch: RecordBatch,
        predicate: String,
        positions: &[(String, i64)],
    ) -> Result<u64> {
        let partitions: Vec<String> = self.partition_columns();
        let txns: Vec<Transaction> = positions.iter().map(|(app, p)| Transaction::new(app, *p)).collect();
        let table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Overwrite)
            .with_replace_where(predicate)
            .with_partition_columns(partitions)
            .with_writer_properties(self.append_properties()?)
            .with_commit_properties(CommitProperties::default().with_application_transactions(txns))
            .await
            .map_err(|e| self.delta(e))?;
        self.table = table;
        self.table
            .version()
            .ok_or_else(|| self.delta(DeltaTableError::Generic("no version after a commit".into())))
    }

    /// Replaces the rows matching `predicate` (on partition columns) with the rows `rows` sends,
    /// written to new files as they arrive and committed in one commit after
    /// [`RowsOrStop::End`]; after [`RowsOrStop::Stop`], or if the sender goes away without
    /// either, nothing is committed. Memory stays within a few batches whatever the total.
    pub async fn replace_where_streaming(
        &mut self,
        rows: tokio::sync::mpsc::Receiver<RowsOrStop>,
        predicate: String,
    ) -> Result<u64> {
        use datafusion::catalog::streaming::StreamingTable;
        use datafusion::datasource::provider_as_source;
        use datafusion::logical_expr::LogicalPlanBuilder;
        let schema: SchemaRef = self
            .table
            .snapshot()
            .map_err(|e| self.delta(e))?
            .snapshot()
            .arrow_schema();
        let source = OneShotRows {
            schema: schema.clone(),
            rows: std::sync::Mutex::new(Some(rows)),
        };
        let plan = StreamingTable::try_new(schema, vec![std::sync::Arc::new(source)])
            .and_then(|table| {
                LogicalPlanBuilder::scan("rebuilt", provider_as_source(std::sync::Arc::new(table)), None)?.build()
            })
            .map_err(|source| Error::Query {
                table: self.name,
                source,
            })?;
        let partitions: Vec<String> = self.partition_columns();
        // row groups of 64k rows and files of 64 MiB: the writer's buffer stays a row group
        let properties = marsad_tables::sketch_column_settings(
            deltalake::parquet::file::properties::WriterProperties::builder()
                .set_max_row_group_row_count(Some(marsad_tables::REWRITE_ROW_GROUP_ROWS)),
        )
        .build();
        let table = self
            .table
            .clone()
            .write(Vec::new())
            .with_input_plan(plan)
            .with_writer_properties(properties)
            .with_target_file_size(std::num::NonZeroU64::new(REWRITE_FILE_BYTES))
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

    /// Brings this handle up to the table's latest version.
    pub async fn refresh(&mut self) -> Result<()> {
        self.table.update_state().await.map_err(|e| self.delta(e))
    }

    /// Deletes the rows matching `predicate` (a SQL condition) in one commit.
    pub async fn delete_where(&mut self, predicate: String) -> Result<u64> {
        let (table, _) = self
            .table
            .clone()
            .delete()
            .with_session_state(marsad_tables::rewrite_session())
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
        let mut table = self.table.clone();
        if let Some(v) = version {
            table.load_version(v as _).await.map_err(|e| self.delta(e))?;
        }
        let ctx = SessionContext::new();
        marsad_tables::register(&ctx, self.name, &table).await?;
        Ok(ctx)
    }

    /// Runs `sql` against the latest version of this table, as a stream of batches (memory
    /// bounded by a batch, not by the result).
    pub async fn query_stream(&self, sql: &str) -> Result<datafusion::execution::SendableRecordBatchStream> {
        let query = |source| Error::Query {
            table: self.name,
            source,
        };
        let ctx = self.session(None).await?;
        ctx.sql(sql).await.map_err(query)?.execute_stream().await.map_err(query)
    }

    /// Runs `sql` against the latest version, one stream per partition of the plan, to be read
    /// one after another: for a plain scan (no repartitioning in the plan) the rows come in the
    /// same order every time, whatever the threads' timing, and are never all held at once.
    pub async fn query_partitions(&self, sql: &str) -> Result<Vec<datafusion::execution::SendableRecordBatchStream>> {
        let query = |source| Error::Query {
            table: self.name,
            source,
        };
        let ctx = self.session(None).await?;
        ctx.sql(sql)
            .await
            .map_err(query)?
            .execute_stream_partitioned()
            .await
            .map_err(query)
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

/// Target size of the files of a streaming rewrite.
const REWRITE_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// What a streaming rewrite is sent.
pub enum RowsOrStop {
    /// Rows to write.
    Rows(RecordBatch),
    /// Every row is sent: commit.
    End,
    /// The producer failed (the reason): commit nothing.
    Stop(String),
}

/// A scan that hands out the rows of a channel once: the input of a streaming rewrite.
#[derive(Debug)]
struct OneShotRows {
    schema: SchemaRef,
    rows: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<RowsOrStop>>>,
}

impl datafusion::physical_plan::streaming::PartitionStream for OneShotRows {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(
        &self,
        _ctx: std::sync::Arc<datafusion::execution::TaskContext>,
    ) -> datafusion::execution::SendableRecordBatchStream {
        use datafusion::error::DataFusionError;
        use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
        let rows = self.rows.lock().ok().and_then(|mut r| r.take());
        let schema = self.schema.clone();
        // (receiver, finished): after an error or the end, nothing more
        let stream = futures::stream::unfold((rows, false), move |(rows, finished)| {
            let schema = schema.clone();
            async move {
                if finished {
                    return None;
                }
                let Some(mut rx) = rows else {
                    let e = DataFusionError::Execution("the rebuilt rows were already read once".into());
                    return Some((Err(e), (None, true)));
                };
                match rx.recv().await {
                    Some(RowsOrStop::Rows(batch)) => {
                        // the table's column types (the builder's may differ in encoding only)
                        let aligned =
                            align(&schema, &batch).map_err(|e| DataFusionError::ArrowError(Box::new(e), None));
                        Some((aligned, (Some(rx), false)))
                    }
                    Some(RowsOrStop::End) => None,
                    Some(RowsOrStop::Stop(why)) => Some((Err(DataFusionError::Execution(why)), (None, true))),
                    None => {
                        let e = DataFusionError::Execution("the producer of the rows stopped before their end".into());
                        Some((Err(e), (None, true)))
                    }
                }
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// `batch` with the columns and types of `schema`, by name.
fn align(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let c = batch
                .column_by_name(f.name())
                .ok_or_else(|| arrow::error::ArrowError::SchemaError(format!("rows without `{}`", f.name())))?;
            arrow::compute::cast(c, f.data_type())
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
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

/// Deletes and rewrites conflict with what they read, not with concurrent blind appends.
/// (Spelled as the Delta kernel under delta-rs parses it, camelCase: it reads
/// `WriteSerializable` as unknown and falls back to Serializable.)
const WRITE_SERIALIZABLE: &str = "writeSerializable";

/// How long a table's old log entries are kept (Delta's default is 30 days, for time travel
/// Marsad does not offer): a listing of `_delta_log` grows with them, and a table written
/// every second gathers 86,400 a day. What the rollups' catch-up still needs is kept whatever
/// their age (`maintenance::remove_expired_log_entries`).
pub const LOG_RETENTION: &str = "interval 1 hour";

/// How long a replaced file is remembered as replaced (Delta's default is a week): every
/// commit replays what the log remembers, and a compaction replaces a file per commit, so a
/// week of them made each commit slower with the table's age (1.62x over 3,000 commits; with
/// the replaced files forgotten at once, 1.00x; BENCHMARKS.md). The files themselves are
/// removed after `maintenance::REPLACED_FILES_KEPT`, well within this.
pub const DELETED_FILE_RETENTION: &str = "interval 60 minutes";

/// Whether a Delta property Marsad sets on its tables is kept as it finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    /// Set when absent; a value an operator chose is left alone.
    Default,
    /// Set to Marsad's value whatever it was: correctness rests on it.
    Required,
}

/// The `events` table as the processor writes it.
pub struct EventsTable {
    sink: DeltaSink,
}

impl EventsTable {
    /// Opens the `events` table at `tables`, creating it (partitioned by date) on first start.
    pub async fn open_or_create(tables: &TablesLocation) -> Result<Self> {
        let sink = DeltaSink::open_or_create(tables, &events_spec()).await?;
        Ok(EventsTable { sink })
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

    /// Remembers in `recent` the events stored since `since`, to drop retried duplicates after
    /// a restart; returns how many it read. Streams: memory is `recent`'s, not the ids'.
    pub async fn remember_events_since(&self, since: NaiveDate, recent: &mut RecentEventIds) -> Result<usize> {
        use futures::StreamExt;
        if self.sink.version().is_none_or(|v| v == 0) {
            return Ok(0);
        }
        let sql = format!("SELECT visitor_key, event_id FROM events WHERE {DATE_COLUMN} >= DATE '{since}'");
        let mut batches = self.sink.query_stream(&sql).await?;
        let mut read = 0;
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(|source| Error::Query {
                table: "events",
                source,
            })?;
            let visitors = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
            let ids = arrow::compute::cast(batch.column(1), &arrow::datatypes::DataType::Utf8)?;
            let (Some(visitors), Some(ids)) = (
                visitors.as_any().downcast_ref::<StringArray>(),
                ids.as_any().downcast_ref::<StringArray>(),
            ) else {
                continue;
            };
            for i in 0..batch.num_rows() {
                if ids.is_valid(i) {
                    let visitor = visitors.is_valid(i).then(|| visitors.value(i));
                    recent.insert(visitor, ids.value(i));
                    read += 1;
                }
            }
        }
        Ok(read)
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

    /// A fresh `events` at `tables` that writes a checkpoint every `versions` versions, so a
    /// test's few dozen commits have several (log cleanup removes entries up to one).
    #[cfg(test)]
    pub(crate) async fn checkpointing_every(
        tables: &TablesLocation,
        versions: u32,
    ) -> std::result::Result<Self, Box<dyn std::error::Error>> {
        let events = Self::open_or_create(tables).await?;
        events
            .sink
            .table
            .clone()
            .set_tbl_properties()
            .with_properties(HashMap::from([(
                "delta.checkpointInterval".to_owned(),
                versions.to_string(),
            )]))
            .await?;
        Ok(Self::open_or_create(tables).await?)
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

/// Columns whose values are (nearly) all different: keyed pseudonyms, ids and sketches. A
/// dictionary of them is as large as the column and only costs time; statistics of their
/// pages prune nothing.
const UNIQUE_VALUED_COLUMNS: [&str; 5] = ["event_id", "visitor_key", "audience_id", "session_id", "visitors"];

/// How appends are written: DataFusion's defaults (what delta-rs writes with when given none)
/// but zstd at level 1 instead of 3 (an append's small files are merged by the compaction
/// within minutes, and rewritten at level 4 then), and without dictionaries or page
/// statistics for the columns whose values are all different.
fn append_writer_properties() -> datafusion::error::Result<deltalake::parquet::file::properties::WriterProperties> {
    use deltalake::parquet::basic::{Compression, ZstdLevel};
    use deltalake::parquet::file::properties::EnabledStatistics;
    use deltalake::parquet::schema::types::ColumnPath;
    let level = ZstdLevel::try_new(1).map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    let mut builder = datafusion::config::ParquetOptions::default()
        .into_writer_properties_builder()?
        .set_compression(Compression::ZSTD(level));
    for column in UNIQUE_VALUED_COLUMNS {
        builder = builder
            .set_column_dictionary_enabled(ColumnPath::from(column), false)
            .set_column_statistics_enabled(ColumnPath::from(column), EnabledStatistics::Chunk);
    }
    Ok(marsad_tables::sketch_column_settings(builder).build())
}
