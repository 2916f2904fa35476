//! A Delta table version read as what it is for Marsad's tables: a list of Parquet files.
//!
//! delta-rs's own provider re-derives each batch through the Delta kernel (partition values
//! injected per batch, a file-id column, filters pushed into the Parquet decoder row by row),
//! which costs 2-3x a plain Parquet scan on dashboard queries. Marsad's tables use nothing
//! that needs it: no deletion vectors, no column mapping (reader version 1), partition
//! values in the log. [`ActiveFiles`] takes the version's active files and partition values
//! from the log once, and scans them with DataFusion's Parquet source: row groups pruned by
//! their statistics, files by their partition values. A table that needs more of Delta
//! (a reader version above 1) keeps delta-rs's provider.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::catalog::TableProvider;
use datafusion::common::{DFSchema, Result as DfResult, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
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
    files: Vec<PartitionedFile>,
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
    /// under a name of the table's own (`name`).
    pub fn of(table: &DeltaTable, name: &str, stores: &dyn ObjectStoreRegistry) -> Result<Self, NotPlain> {
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
            // the path as the log stores it (percent-encoded parts stay encoded)
            scanned.object_meta.location = file.object_store_path();
            files.push(scanned);
        }
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
        })
    }
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
        // used to prune files and row groups; the plan still filters every row
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
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
        if self.files.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(self.schema.project(p)?),
                None => self.schema.clone(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        let options = state.table_options().parquet.clone();
        let mut source = ParquetSource::new(self.table_schema.clone()).with_table_parquet_options(options);
        if let Some(predicate) = conjunction(filters.iter().cloned().map(unnormalize_col)) {
            // only for pruning: a predicate the Parquet source cannot take leaves the scan whole
            let scan_schema = DFSchema::try_from(self.table_schema.table_schema().as_ref().clone())?;
            if let Ok(physical) = state.create_physical_expr(predicate, &scan_schema) {
                source = source.with_predicate(physical);
            }
        }
        let config = FileScanConfigBuilder::new(self.store.clone(), Arc::new(source))
            .with_file_group(FileGroup::new(self.files.clone()))
            .with_projection_indices(Some(indices))?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
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
        let url = url::Url::from_directory_path(dir.path()).expect("a url");
        let kernel: StructType = schema().as_ref().try_into_kernel().expect("a kernel schema");
        let mut table = DeltaTable::try_from_url(url)
            .await
            .expect("a handle")
            .create()
            .with_columns(kernel.fields().cloned())
            .with_partition_columns(["date"])
            .await
            .expect("created");
        for rows in [
            batch(20_000, &[(Some("JO"), 1), (Some("SA"), 2), (None, 3)]),
            batch(20_001, &[(Some("JO"), 4), (Some("EG"), 5)]),
            batch(20_001, &[(Some("SA"), 6)]),
        ] {
            table = table
                .write(vec![rows])
                .with_save_mode(SaveMode::Append)
                .with_partition_columns(["date"])
                .await
                .expect("appended");
        }
        let (table, _) = table.delete().with_predicate("country = 'JO'").await.expect("deleted");

        let stores: Arc<dyn ObjectStoreRegistry> =
            Arc::new(datafusion::execution::object_store::DefaultObjectStoreRegistry::new());
        let plain = ActiveFiles::of(&table, "t", stores.as_ref()).expect("plain files");
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_object_store_registry(stores)
            .build_arc()
            .expect("a runtime");
        let plain_ctx = SessionContext::new_with_config_rt(Default::default(), runtime);
        plain_ctx.register_table("t", Arc::new(plain)).expect("registered");
        let delta_ctx = SessionContext::new();
        table.update_datafusion_session(&delta_ctx.state()).expect("store");
        delta_ctx
            .register_table("t", table.table_provider().await.expect("a provider"))
            .expect("registered");

        for sql in [
            "SELECT * FROM t ORDER BY n",
            "SELECT country, date, n FROM t WHERE date = DATE '2024-10-04' ORDER BY n",
            "SELECT date, count(*), sum(n) FROM t GROUP BY date ORDER BY date",
            "SELECT n FROM t WHERE country IS NULL",
            "SELECT count(*) FROM t WHERE date > DATE '2030-01-01'",
            "SELECT arrow_typeof(country), arrow_typeof(visitors), arrow_typeof(date) FROM t LIMIT 1",
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
}
