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
            files.push(PartitionedFile::new(file.path().into_owned(), size).with_partition_values(partition_values));
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
