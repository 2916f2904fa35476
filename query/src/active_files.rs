//! A Delta table version read as what it is for Marsad's tables: a list of Parquet files.
//!
//! delta-rs's own provider re-derives each batch through the Delta kernel (partition values
//! injected per batch, a file-id column, filters pushed into the Parquet decoder row by row),
//! which costs 2-3x a plain Parquet scan on dashboard queries. Marsad's tables use nothing
//! that needs it: no deletion vectors, no column mapping (reader version 1), partition
//! values in the log. [`ActiveFiles`] takes the version's active files, partition values and
//! row counts from the log once, and scans them with DataFusion's Parquet source: files
//! chosen by their partition values when the query is planned (a day's query of a table a
//! year old opens that day's files, not the year's), row groups pruned by their statistics,
//! and a count of the whole table answered from the log's row counts without opening a file.
//! A table that needs more of Delta (a reader version above 1) keeps delta-rs's provider.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::catalog::TableProvider;
use datafusion::common::stats::Precision;
use datafusion::common::{DFSchema, DataFusionError, Result as DfResult, ScalarValue, Statistics};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::cache::cache_manager::FileMetadataCache;
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::object_store::{ObjectStoreRegistry, ObjectStoreUrl};
use datafusion::logical_expr::expr_rewriter::unnormalize_col;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use deltalake::DeltaTable;

/// Why a table version is read through delta-rs instead.
#[derive(Debug, thiserror::Error)]
pub enum NotPlain {
    /// The table needs a Delta reader feature (deletion vectors, column mapping, …).
    #[error("the table needs Delta reader version {0}")]
    ReaderVersion(i32),
    /// The log could not be read as plain files.
    #[error("{0}")]
    Log(String),
}

/// One version of a Delta table, scanned as plain Parquet files.
#[derive(Debug)]
pub struct ActiveFiles {
    /// The columns in the table's order (strings as views, as DataFusion reads Parquet).
    schema: SchemaRef,
    /// Where each column of `schema` is in the scan's schema (file columns, then partitions).
    scan_index: Vec<usize>,
    /// What the Parquet source reads: the files' columns and the partition columns.
    table_schema: TableSchema,
    store: ObjectStoreUrl,
    files: Vec<ActiveFile>,
    /// The files' partition values, one row per file of `files`.
    partition_values: RecordBatch,
    footers: FooterCache,
}

/// The parsed footers of a table's data files, kept across its versions: a query opens a file
/// without reading and parsing its footer again. A data file is never changed in place (a
/// new version writes new files), and an entry is used only for a file of the same path, size
/// and time written (from the log). Footers of files a version no longer holds are forgotten
/// when the table is next looked up (a query still reading an older version may put one back
/// until then).
#[derive(Clone)]
pub struct FooterCache(Arc<FileMetadataCache>);

impl FooterCache {
    /// A cache holding at most `bytes` of footers (least recently used ones go first).
    pub fn new(bytes: usize) -> Self {
        FooterCache(Arc::new(DefaultCache::new(bytes)))
    }

    /// Forgets every footer (an erasure's rewritten files leave nothing of the old ones).
    pub fn clear(&self) {
        self.0.clear();
    }

    /// Forgets the footers of every file but `live` ones, so what is kept is bounded by the
    /// files the table holds (a query still reading an older version may put one back, forgotten
    /// at the next lookup).
    fn keep_only<'a>(&self, live: impl Iterator<Item = &'a datafusion::object_store::path::Path>) {
        let live: std::collections::HashSet<&datafusion::object_store::path::Path> = live.collect();
        for kept in self.0.list_entries().into_keys() {
            if !live.contains(&kept) {
                self.0.remove(&kept);
            }
        }
    }

    /// How many files' footers are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for FooterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FooterCache").field("files", &self.0.len()).finish()
    }
}

/// One data file of the version, with what the log says of it.
#[derive(Debug, Clone)]
struct ActiveFile {
    scanned: PartitionedFile,
    /// Its row count (`numRecords` of its statistics), when the log has it.
    rows: Option<usize>,
}

/// Strings and binaries as views: what DataFusion reads Parquet as, and the faster to group by.
fn as_views(field: &Field) -> Field {
    match field.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 => field.clone().with_data_type(DataType::Utf8View),
        DataType::Binary | DataType::LargeBinary => field.clone().with_data_type(DataType::BinaryView),
        _ => field.clone(),
    }
}

impl ActiveFiles {
    /// The version `table` is at, as plain files; its object store is registered in `stores`
    /// under a name of the table's own (`name`); footers read are kept in `footers`.
    pub fn of(
        table: &DeltaTable,
        name: &str,
        stores: &dyn ObjectStoreRegistry,
        footers: &FooterCache,
    ) -> Result<Self, NotPlain> {
        let log = |e: &dyn std::fmt::Display| NotPlain::Log(e.to_string());
        let state = table.snapshot().map_err(|e| log(&e))?;
        let reader_version = state.protocol().min_reader_version();
        if reader_version > 1 {
            return Err(NotPlain::ReaderVersion(reader_version));
        }
        let partition_columns: Vec<String> = state.metadata().partition_columns().to_vec();
        let logical = state.snapshot().arrow_schema();
        let fields: Vec<Field> = logical.fields().iter().map(|f| as_views(f)).collect();
        let file_fields: Vec<FieldRef> = fields
            .iter()
            .filter(|f| !partition_columns.contains(f.name()))
            .map(|f| Arc::new(f.clone()))
            .collect();
        let mut partition_fields: Vec<FieldRef> = Vec::new();
        for column in &partition_columns {
            let field = fields
                .iter()
                .find(|f| f.name() == column)
                .ok_or_else(|| NotPlain::Log(format!("partition column {column} is not in the schema")))?;
            partition_fields.push(Arc::new(field.clone()));
        }
        let scan_index = fields
            .iter()
            .map(|f| match partition_columns.iter().position(|p| p == f.name()) {
                Some(p) => file_fields.len() + p,
                None => file_fields.iter().position(|g| g.name() == f.name()).unwrap_or(0),
            })
            .collect();
        let mut files = Vec::new();
        for file in state.log_data() {
            let values = file.partition_values_map();
            let mut partition_values = Vec::with_capacity(partition_fields.len());
            for field in &partition_fields {
                let value = match values.get(field.name()).cloned().flatten() {
                    Some(text) => ScalarValue::try_from_string(text, field.data_type()).map_err(|e| log(&e))?,
                    None => ScalarValue::try_from(field.data_type()).map_err(|e| log(&e))?,
                };
                partition_values.push(value);
            }
            let size = u64::try_from(file.size()).unwrap_or(0);
            let mut scanned =
                PartitionedFile::new(file.path().into_owned(), size).with_partition_values(partition_values);
            // the path as the log stores it (percent-encoded parts stay encoded), and when it
            // was written: with the size, what a kept footer is checked against
            scanned.object_meta.location = file.object_store_path();
            if let Some(written) = chrono::DateTime::from_timestamp_millis(file.modification_time()) {
                scanned.object_meta.last_modified = written;
            }
            files.push(ActiveFile {
                scanned,
                rows: file.num_records(),
            });
        }
        // the footers of files no longer in the table (compacted, erased) are not kept
        footers.keep_only(files.iter().map(|f| &f.scanned.object_meta.location));
        let partition_values = partition_values_of(&files, &partition_fields).map_err(|e| log(&e))?;
        let store = ObjectStoreUrl::parse(format!("marsad-table://{name}")).map_err(|e| log(&e))?;
        let url = url::Url::parse(store.as_str()).map_err(|e| log(&e))?;
        stores.register_store(&url, table.log_store().object_store(None));
        Ok(ActiveFiles {
            schema: Arc::new(Schema::new(fields)),
            scan_index,
            table_schema: TableSchema::builder(Arc::new(Schema::new(file_fields)))
                .with_table_partition_cols(partition_fields)
                .build(),
            store,
            files,
            partition_values,
            footers: footers.clone(),
        })
    }
}

/// One row per file of `files`, its partition values (`partitions`) as columns: what a filter of
/// partition values alone is evaluated on.
fn partition_values_of(files: &[ActiveFile], partitions: &[FieldRef]) -> DfResult<RecordBatch> {
    let columns = (0..partitions.len())
        .map(|i| {
            ScalarValue::iter_to_array(
                files
                    .iter()
                    .map(|f| f.scanned.partition_values.get(i).cloned().unwrap_or(ScalarValue::Null)),
            )
        })
        .collect::<DfResult<Vec<_>>>()?;
    // (a table of no partition column is one row per file too, for a filter of no column)
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(partitions.to_vec())),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(files.len())),
    )?)
}

#[async_trait]
impl TableProvider for ActiveFiles {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // a filter of partition values alone is decided per file when the query is planned
        // (exactly: every row of a file has its partition values); the others prune files and
        // row groups, and the plan still filters every row
        Ok(filters
            .iter()
            .map(|f| match self.decided_per_file(f) {
                true => TableProviderFilterPushDown::Exact,
                false => TableProviderFilterPushDown::Inexact,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let indices: Vec<usize> = match projection {
            Some(p) => p.iter().map(|&i| self.scan_index[i]).collect(),
            None => self.scan_index.clone(),
        };
        let (per_file, per_row): (Vec<&Expr>, Vec<&Expr>) = filters.iter().partition(|f| self.evaluable_per_file(f));
        let files = self.files_passing(state, &per_file)?;
        if files.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        let options = state.table_options().parquet.clone();
        let store = state.runtime_env().object_store(&self.store)?;
        let mut source = ParquetSource::new(self.table_schema.clone())
            .with_table_parquet_options(options)
            .with_parquet_file_reader_factory(Arc::new(CachedParquetFileReaderFactory::new(
                store,
                self.footers.0.clone(),
            )));
        if let Some(predicate) = conjunction(per_row.into_iter().cloned().map(unnormalize_col)) {
            // only for pruning: a predicate the Parquet source cannot take leaves the scan whole
            let scan_schema = DFSchema::try_from(self.table_schema.table_schema().as_ref().clone())?;
            if let Ok(physical) = state.create_physical_expr(predicate, &scan_schema) {
                source = source.with_predicate(physical);
            }
        }
        // the log's row counts: a count with no filter left to the rows is answered from them
        let mut statistics = Statistics::new_unknown(self.table_schema.table_schema());
        // (a sum that overflows is a log that lies: no count is taken from it)
        let rows = files
            .iter()
            .try_fold(0usize, |sum, f| f.rows.and_then(|rows| sum.checked_add(rows)));
        statistics.num_rows = match rows {
            Some(rows) => Precision::Exact(limit.map_or(rows, |limit| rows.min(limit))),
            None => Precision::Absent,
        };
        let config = FileScanConfigBuilder::new(self.store.clone(), Arc::new(source))
            .with_file_group(FileGroup::new(files.into_iter().map(|f| f.scanned).collect()))
            .with_projection_indices(Some(indices))?
            .with_statistics(statistics)
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

impl ActiveFiles {
    /// Whether `filter` names partition columns only and answers the same every time: then a
    /// file's partition values decide it for all of the file's rows. (It, and any filter of no
    /// column, is then evaluated for every file when the query is planned: one that fails on
    /// some file's values, such as a failing cast, fails the query even where another
    /// condition would have spared it.)
    fn decided_per_file(&self, filter: &Expr) -> bool {
        !filter.column_refs().is_empty() && self.evaluable_per_file(filter)
    }

    /// Whether `filter` can be evaluated on partition values alone: every filter pushed down as
    /// exact is, even one an optimizer later reduced to a constant.
    fn evaluable_per_file(&self, filter: &Expr) -> bool {
        let partitions = self.table_schema.table_partition_cols();
        filter
            .column_refs()
            .iter()
            .all(|c| partitions.iter().any(|p| p.name() == &c.name))
            && !filter.is_volatile()
    }

    /// The files whose partition values pass every one of `filters` (each decided per file).
    fn files_passing(&self, state: &dyn Session, filters: &[&Expr]) -> DfResult<Vec<ActiveFile>> {
        let Some(predicate) = conjunction(filters.iter().map(|f| unnormalize_col((*f).clone()))) else {
            return Ok(self.files.clone());
        };
        if self.files.is_empty() {
            return Ok(Vec::new());
        }
        let values = &self.partition_values;
        // an Exact filter must be applied: one that cannot be is an error, never a wider answer
        let physical = state.create_physical_expr(predicate, &DFSchema::try_from(values.schema().as_ref().clone())?)?;
        let passing = physical.evaluate(values)?.into_array(values.num_rows())?;
        let passing = passing
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| DataFusionError::Internal("a partition filter that is not a predicate".into()))?;
        Ok(self
            .files
            .iter()
            .zip(passing.iter())
            .filter(|(_, pass)| *pass == Some(true))
            .map(|(file, _)| file.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{BinaryArray, Date32Array, Int64Array, RecordBatch, StringArray};
    use datafusion::prelude::SessionContext;
    use deltalake::kernel::StructType;
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    use deltalake::protocol::SaveMode;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("country", DataType::Utf8, true),
            Field::new("date", DataType::Date32, false),
            Field::new("n", DataType::Int64, false),
            Field::new("visitors", DataType::Binary, true),
        ]))
    }

    fn batch(day: i32, rows: &[(Option<&str>, i64)]) -> RecordBatch {
        let countries: StringArray = rows.iter().map(|r| r.0).collect();
        let n: Int64Array = rows.iter().map(|r| Some(r.1)).collect();
        let visitors: BinaryArray = rows.iter().map(|r| Some(r.1.to_le_bytes().to_vec())).collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(countries),
                Arc::new(Date32Array::from(vec![day; rows.len()])),
                Arc::new(n),
                Arc::new(visitors),
            ],
        )
        .expect("a batch")
    }

    /// A table at `dir` partitioned by date, with one append of each of `appends`.
    async fn partitioned_table(dir: &std::path::Path, appends: impl IntoIterator<Item = RecordBatch>) -> DeltaTable {
        table_by(dir, &["date"], appends).await
    }

    /// A table at `dir` partitioned by `partitions`, with one append of each of `appends`.
    async fn table_by(
        dir: &std::path::Path,
        partitions: &[&str],
        appends: impl IntoIterator<Item = RecordBatch>,
    ) -> DeltaTable {
        let url = url::Url::from_directory_path(dir).expect("a url");
        let kernel: StructType = schema().as_ref().try_into_kernel().expect("a kernel schema");
        let mut table = DeltaTable::try_from_url(url)
            .await
            .expect("a handle")
            .create()
            .with_columns(kernel.fields().cloned())
            .with_partition_columns(partitions.iter().copied())
            .await
            .expect("created");
        for rows in appends {
            table = table
                .write(vec![rows])
                .with_save_mode(SaveMode::Append)
                .with_partition_columns(partitions.iter().copied())
                .await
                .expect("appended");
        }
        table
    }

    /// Table `t` in a session that reads it through delta-rs's own provider.
    async fn delta_session(table: &DeltaTable) -> SessionContext {
        let ctx = SessionContext::new();
        table.update_datafusion_session(&ctx.state()).expect("store");
        ctx.register_table("t", table.table_provider().await.expect("a provider"))
            .expect("registered");
        ctx
    }

    async fn answer(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.expect("plans").collect().await.expect("runs");
        arrow::util::pretty::pretty_format_batches(&batches)
            .expect("prints")
            .to_string()
    }

    /// A partitioned table after appends to two dates and a delete that rewrote files: the plain
    /// scan answers every query as delta-rs's provider does, removed rows included never.
    #[tokio::test]
    async fn plain_files_answer_as_the_delta_provider() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let table = partitioned_table(
            dir.path(),
            [
                batch(20_000, &[(Some("JO"), 1), (Some("SA"), 2), (None, 3)]),
                batch(20_001, &[(Some("JO"), 4), (Some("EG"), 5)]),
                batch(20_001, &[(Some("SA"), 6)]),
            ],
        )
        .await;
        let (table, _) = table.delete().with_predicate("country = 'JO'").await.expect("deleted");

        let plain_ctx = plain_session(&table, &FooterCache::new(1 << 20));
        let delta_ctx = delta_session(&table).await;

        for sql in [
            "SELECT * FROM t ORDER BY n",
            "SELECT country, date, n FROM t WHERE date = DATE '2024-10-04' ORDER BY n",
            "SELECT date, count(*), sum(n) FROM t GROUP BY date ORDER BY date",
            "SELECT n FROM t WHERE country IS NULL",
            "SELECT count(*) FROM t WHERE date > DATE '2030-01-01'",
            "SELECT arrow_typeof(country), arrow_typeof(visitors), arrow_typeof(date) FROM t LIMIT 1",
            // partition filters decided per file, alone, mixed with others, and in an OR
            "SELECT n FROM t WHERE date IN (DATE '2024-10-03', DATE '2024-10-05') ORDER BY n",
            "SELECT count(*) FROM t WHERE date >= DATE '2024-10-05'",
            "SELECT n FROM t WHERE CAST(date AS VARCHAR) LIKE '2024-10-0%' AND n > 4 ORDER BY n",
            "SELECT n FROM t WHERE date = DATE '2024-10-04' OR country = 'EG' ORDER BY n",
            "SELECT n FROM t WHERE date = DATE '2024-10-05' ORDER BY n LIMIT 1",
            "SELECT count(*) FROM (SELECT * FROM t LIMIT 1)",
            "SELECT count(*), count(country), min(date) FROM t",
        ] {
            let (ours, theirs) = (answer(&plain_ctx, sql).await, answer(&delta_ctx, sql).await);
            assert_eq!(ours, theirs, "{sql}");
        }
        let all = answer(&plain_ctx, "SELECT * FROM t ORDER BY n").await;
        assert!(!all.contains("JO") && all.contains("EG"), "{all}");
        let columns: Vec<String> = plain_ctx
            .table("t")
            .await
            .expect("t")
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(columns, ["country", "date", "n", "visitors"], "the table's own order");
    }

    /// Table `t` in a session that reads it as plain files.
    fn plain_session(table: &DeltaTable, footers: &FooterCache) -> SessionContext {
        let stores: Arc<dyn ObjectStoreRegistry> =
            Arc::new(datafusion::execution::object_store::DefaultObjectStoreRegistry::new());
        let plain = ActiveFiles::of(table, "t", stores.as_ref(), footers).expect("plain files");
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_object_store_registry(stores)
            .build_arc()
            .expect("a runtime");
        let ctx = SessionContext::new_with_config_rt(Default::default(), runtime);
        ctx.register_table("t", Arc::new(plain)).expect("registered");
        ctx
    }

    /// A query of one date opens that date's files only, chosen when it is planned, and their
    /// footers are kept; a count with no filter left to the rows is the log's, read without a
    /// data file.
    #[tokio::test]
    async fn a_dates_files_are_chosen_when_planned_and_a_count_is_the_logs() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let table = partitioned_table(
            dir.path(),
            [
                batch(20_000, &[(Some("JO"), 1), (Some("SA"), 2)]),
                batch(20_001, &[(Some("EG"), 3)]),
                batch(20_001, &[(None, 4), (Some("SA"), 5)]),
                batch(20_002, &[(Some("JO"), 6)]),
            ],
        )
        .await;
        let footers = FooterCache::new(1 << 20);
        let ctx = plain_session(&table, &footers);
        let plan = ctx
            .sql("EXPLAIN SELECT n FROM t WHERE date = DATE '2024-10-05' AND n > 0")
            .await
            .expect("plans");
        let plan = answer_of(plan).await;
        assert!(plan.contains("date=2024-10-05"), "{plan}");
        assert!(
            !plan.contains("date=2024-10-04") && !plan.contains("date=2024-10-06"),
            "other dates' files are not in the plan: {plan}"
        );

        let day = "SELECT sum(n) AS n FROM t WHERE date = DATE '2024-10-05'";
        assert_eq!(answer(&ctx, day).await, answer_table("n", 12));
        assert_eq!(footers.len(), 2, "the footers of the date's two files are kept");

        // the data files gone: what the log answers still answers, what needs a file fails
        let mut hidden = 0;
        for day in ["2024-10-04", "2024-10-05", "2024-10-06"] {
            for file in std::fs::read_dir(dir.path().join(format!("date={day}"))).expect("a date's directory") {
                let path = file.expect("an entry").path();
                std::fs::rename(&path, path.with_extension("hidden")).expect("hidden");
                hidden += 1;
            }
        }
        assert_eq!(hidden, 4);
        assert_eq!(answer(&ctx, "SELECT count(*) AS n FROM t").await, answer_table("n", 6));
        assert_eq!(
            answer(&ctx, "SELECT count(*) AS n FROM t WHERE date = DATE '2024-10-05'").await,
            answer_table("n", 3)
        );
        assert_eq!(
            answer(&ctx, "SELECT count(*) AS n FROM t WHERE date > DATE '2030-01-01'").await,
            answer_table("n", 0)
        );
        // the scan's own row count: the log's, within a limit pushed into it
        let provider = ctx.table_provider("t").await.expect("t");
        let rows = |limit: Option<usize>| {
            let (ctx, provider) = (&ctx, provider.clone());
            async move {
                let scan = provider.scan(&ctx.state(), None, &[], limit).await.expect("a scan");
                rows_of(&scan)
            }
        };
        assert_eq!(rows(None).await, Precision::Exact(6));
        assert_eq!(rows(Some(2)).await, Precision::Exact(2), "a limit caps the count");
        assert_eq!(rows(Some(60)).await, Precision::Exact(6));

        for needs_files in [
            day,
            "SELECT sum(n) FROM t",
            "SELECT count(*) FROM t WHERE n > 0",
            "SELECT count(country) FROM t",
        ] {
            let failed = match ctx.sql(needs_files).await {
                Ok(frame) => frame.collect().await.is_err(),
                Err(_) => true,
            };
            assert!(failed, "{needs_files} reads the files");
        }
    }

    async fn answer_of(frame: datafusion::dataframe::DataFrame) -> String {
        let batches = frame.collect().await.expect("runs");
        arrow::util::pretty::pretty_format_batches(&batches)
            .expect("prints")
            .to_string()
    }

    /// How [`answer`] prints one integer column `name` of one row `value`.
    fn answer_table(name: &str, value: i64) -> String {
        let batch = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(name, DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from(vec![value]))],
        )
        .expect("a batch");
        arrow::util::pretty::pretty_format_batches(&[batch])
            .expect("prints")
            .to_string()
    }

    /// A partition column that holds NULLs: filters on it alone, decided per file (`IS NULL`,
    /// `OR`, `NOT`, `IN`, a function of it), answer as delta-rs's provider answers.
    #[tokio::test]
    async fn filters_on_a_nullable_partition_answer_as_the_delta_provider() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let table = table_by(
            dir.path(),
            &["country"],
            [
                batch(20_000, &[(Some("JO"), 1), (None, 2), (Some("SA"), 3)]),
                batch(20_001, &[(None, 4), (Some("EG"), 5)]),
            ],
        )
        .await;
        let plain_ctx = plain_session(&table, &FooterCache::new(1 << 20));
        let delta_ctx = delta_session(&table).await;
        for sql in [
            "SELECT n FROM t WHERE country IS NULL ORDER BY n",
            "SELECT n FROM t WHERE country = 'JO' OR country IS NULL ORDER BY n",
            "SELECT n FROM t WHERE NOT (country = 'SA') ORDER BY n",
            "SELECT n FROM t WHERE country <> 'JO' ORDER BY n",
            "SELECT n FROM t WHERE country IN ('JO', 'EG') ORDER BY n",
            "SELECT n FROM t WHERE coalesce(country, '-') = '-' ORDER BY n",
            "SELECT country, count(*) FROM t WHERE country IS NOT NULL GROUP BY country ORDER BY country",
            "SELECT count(*) FROM t WHERE country IS NULL",
            "SELECT count(*) FROM t WHERE country IS NULL AND n > 2",
        ] {
            let (ours, theirs) = (answer(&plain_ctx, sql).await, answer(&delta_ctx, sql).await);
            assert_eq!(ours, theirs, "{sql}");
        }
        let nulls = answer(&plain_ctx, "SELECT n FROM t WHERE country IS NULL ORDER BY n").await;
        assert!(
            nulls.contains('2') && nulls.contains('4') && !nulls.contains('5'),
            "{nulls}"
        );
    }

    /// The footers kept are those of the files the table holds: a file a later version removed
    /// is forgotten once that version is read.
    #[tokio::test]
    async fn only_the_footers_of_files_the_table_holds_are_kept() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let table = partitioned_table(
            dir.path(),
            [batch(20_000, &[(Some("JO"), 1)]), batch(20_001, &[(Some("SA"), 2)])],
        )
        .await;
        let footers = FooterCache::new(1 << 20);
        let ctx = plain_session(&table, &footers);
        assert_eq!(answer(&ctx, "SELECT sum(n) AS n FROM t").await, answer_table("n", 3));
        assert_eq!(footers.len(), 2);
        let (table, _) = table
            .delete()
            .with_predicate("date = '2024-10-04'")
            .await
            .expect("deleted");
        let ctx = plain_session(&table, &footers);
        assert_eq!(footers.len(), 1, "the removed file's footer is forgotten");
        assert_eq!(answer(&ctx, "SELECT sum(n) AS n FROM t").await, answer_table("n", 2));
    }

    /// The row count a plan's statistics give.
    fn rows_of(plan: &Arc<dyn ExecutionPlan>) -> Precision<usize> {
        use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
        StatisticsContext::new()
            .compute(plan.as_ref(), &StatisticsArgs::new())
            .expect("statistics")
            .num_rows
    }

    /// A filter of no column reaching the scan of a table of no partition column (an optimizer
    /// may leave one) is decided per file too: false keeps no file, true every file.
    #[tokio::test]
    async fn a_constant_filter_on_an_unpartitioned_table_is_decided_per_file() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let table = table_by(dir.path(), &[], [batch(20_000, &[(Some("JO"), 1)])]).await;
        let ctx = plain_session(&table, &FooterCache::new(1 << 20));
        let provider = ctx.table_provider("t").await.expect("t");
        let state = ctx.state();
        let none = provider
            .scan(&state, None, &[datafusion::logical_expr::lit(false)], None)
            .await
            .expect("a scan");
        assert_eq!(none.name(), "EmptyExec", "no file passes a false filter");
        let all = provider
            .scan(&state, None, &[datafusion::logical_expr::lit(true)], None)
            .await
            .expect("a scan");
        assert_eq!(rows_of(&all), Precision::Exact(1));
    }
}
