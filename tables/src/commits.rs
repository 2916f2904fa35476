//! One commit of a table's log, read as deltalake's typed actions: which
//! operation it was, which positions (`txn`) it recorded and which data files
//! it added. The rollups' catch-up walks `events` commits this way.

use deltalake::DeltaTable;
use deltalake::kernel::Action;

use crate::{Result, delta};

/// What one commit of a table did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The table version it made.
    pub version: u64,
    /// `WRITE`, `DELETE`, `OPTIMIZE`, … as its `commitInfo` says.
    pub operation: Option<String>,
    /// The application positions it recorded (`txn` app id, version).
    pub positions: Vec<(String, i64)>,
    /// The data files it added, relative to the table root.
    pub added_files: Vec<String>,
}

impl Commit {
    /// Whether this commit appended or overwrote rows (`WRITE`), as opposed to a delete,
    /// a compaction or a schema change.
    pub fn is_write(&self) -> bool {
        self.operation.as_deref() == Some("WRITE")
    }
}

/// Commit `version` of `table`, or `None` when its log entry is gone (cleaned up after a
/// checkpoint) or was never written.
pub async fn read_commit(table: &DeltaTable, name: &str, version: u64) -> Result<Option<Commit>> {
    let Some(bytes) = table
        .log_store()
        .read_commit_entry(version as _)
        .await
        .map_err(delta(name))?
    else {
        return Ok(None);
    };
    let actions = deltalake::logstore::get_actions(version as _, &bytes).map_err(delta(name))?;
    let mut commit = Commit {
        version,
        operation: None,
        positions: Vec::new(),
        added_files: Vec::new(),
    };
    for action in actions {
        match action {
            Action::CommitInfo(info) => commit.operation = info.operation,
            Action::Txn(txn) => commit.positions.push((txn.app_id, txn.version)),
            Action::Add(add) => commit.added_files.push(add.path),
            _ => {}
        }
    }
    Ok(Some(commit))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use deltalake::kernel::transaction::CommitProperties;
    use deltalake::kernel::{DataType as DeltaType, PrimitiveType, StructField, Transaction};

    use super::*;

    #[tokio::test]
    async fn a_write_is_read_back_with_its_positions_and_files() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let location = marsad_config::TablesLocation::local(dir.path())?;
        assert!(crate::open_table(&location, "t").await?.is_none(), "no table yet");
        let table = crate::table_handle(&location, "t")?
            .create()
            .with_columns([StructField::new("n", DeltaType::Primitive(PrimitiveType::Long), true)])
            .await?;
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1, 2, 3]))])?;
        table
            .write(vec![batch])
            .with_commit_properties(
                CommitProperties::default().with_application_transactions(vec![Transaction::new("app-0", 41)]),
            )
            .await?;
        let table = crate::open_table(&location, "t").await?.ok_or("the table exists now")?;
        let created = read_commit(&table, "t", 0).await?.ok_or("version 0")?;
        assert!(!created.is_write() && created.added_files.is_empty(), "{created:?}");
        let written = read_commit(&table, "t", 1).await?.ok_or("version 1")?;
        assert!(written.is_write());
        assert_eq!(written.positions, vec![("app-0".to_owned(), 41)]);
        assert_eq!(written.added_files.len(), 1);
        assert!(written.added_files[0].ends_with(".parquet"), "{written:?}");
        assert_eq!(read_commit(&table, "t", 2).await?, None, "not written yet");
        Ok(())
    }
}
