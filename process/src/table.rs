//! The `events` Delta table: created on first start, appended to with the
//! log positions each commit covers.

use std::path::Path;

use arrow::array::{Array, StringArray};
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use datafusion::prelude::SessionContext;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{StructType, Transaction};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use marsad_schemas::{DATE_COLUMN, TableName, events_schema};

use crate::{Error, Result};

const NAME: &str = "events";

fn delta(source: DeltaTableError) -> Error {
    Error::Delta { table: NAME, source }
}

/// The `file://` URL of a table directory (created if missing).
pub fn table_url(dir: &Path) -> Result<url::Url> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.into(),
        source: e,
    })?;
    let abs = std::path::absolute(dir).map_err(|e| Error::Io {
        path: dir.into(),
        source: e,
    })?;
    url::Url::from_directory_path(&abs).map_err(|_| Error::Io {
        path: abs.clone(),
        source: std::io::Error::other("not an absolute path"),
    })
}

/// The `events` table as the processor writes it.
pub struct EventsTable {
    table: DeltaTable,
}

impl EventsTable {
    /// Opens `<tables_dir>/events`, creating it (partitioned by date) on first start.
    pub async fn open_or_create(tables_dir: &Path) -> Result<Self> {
        let url = table_url(&tables_dir.join(TableName::Events.as_str()))?;
        let dir = tables_dir.join(TableName::Events.as_str());
        // probe only an existing log: probing an empty directory makes the kernel log an error
        let table = if dir.join("_delta_log").is_dir() {
            let table = DeltaTable::try_from_url(url.clone()).await.map_err(delta)?;
            if table.version().is_some() {
                return Ok(EventsTable { table });
            }
            table
        } else {
            DeltaTableBuilder::from_url(url.clone())
                .and_then(|b| b.build())
                .map_err(delta)?
        };
        let schema: StructType = events_schema()
            .as_ref()
            .try_into_kernel()
            .map_err(|e| delta(e.into()))?;
        let created = table
            .create()
            .with_table_name(NAME)
            .with_comment("One row per anonymized event; no IP, cookie id or user id")
            .with_columns(schema.fields().cloned())
            .with_partition_columns([DATE_COLUMN])
            .with_save_mode(SaveMode::Ignore)
            .await;
        match created {
            Ok(table) => Ok(EventsTable { table }),
            // another processor created it first
            Err(_) => Ok(EventsTable {
                table: DeltaTable::try_from_url(url).await.map_err(delta)?,
            }),
        }
    }

    /// The last raw-log offset committed for a `txn` app id.
    pub async fn committed_offset(&mut self, app_id: &str) -> Result<Option<i64>> {
        self.table.update_state().await.map_err(delta)?;
        let log_store = self.table.log_store();
        self.table
            .snapshot()
            .map_err(delta)?
            .transaction_version(log_store.as_ref(), app_id)
            .await
            .map_err(delta)
    }

    /// Appends `batch` and records `positions` (app id, last offset) in the same transaction.
    pub async fn append(&mut self, batch: RecordBatch, positions: &[(String, u64)]) -> Result<()> {
        let txns: Vec<Transaction> = positions
            .iter()
            .map(|(app, offset)| Transaction::new(app, *offset as i64))
            .collect();
        let table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_partition_columns([DATE_COLUMN])
            .with_commit_properties(CommitProperties::default().with_application_transactions(txns))
            .await
            .map_err(delta)?;
        self.table = table;
        Ok(())
    }

    /// Event ids stored since `since`, to drop retried duplicates after a restart.
    pub async fn event_ids_since(&self, since: NaiveDate) -> Result<Vec<String>> {
        let ctx = SessionContext::new();
        let provider = self
            .table
            .table_provider()
            .await
            .map_err(|e| Error::Query { table: NAME, source: e })?;
        ctx.register_table(NAME, provider)
            .map_err(|e| Error::Query { table: NAME, source: e })?;
        let sql = format!("SELECT event_id FROM {NAME} WHERE {DATE_COLUMN} >= DATE '{since}'");
        let batches = ctx
            .sql(&sql)
            .await
            .map_err(|e| Error::Query { table: NAME, source: e })?
            .collect()
            .await
            .map_err(|e| Error::Query { table: NAME, source: e })?;
        let mut ids = Vec::new();
        for b in batches {
            let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
            if let Some(s) = col.as_any().downcast_ref::<StringArray>() {
                ids.extend(s.iter().flatten().map(str::to_owned));
            }
        }
        Ok(ids)
    }

    /// The table's current version (for logs).
    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }
}
