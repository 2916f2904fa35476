//! Table maintenance for data engineers' batch jobs: compaction (rollup rows
//! merged per key, then small files rewritten into large ones) and retention
//! (old dates deleted from every table, and their files removed from storage).

use std::num::NonZeroU64;

use chrono::NaiveDate;
use deltalake::operations::vacuum::VacuumMode;
use marsad_config::TablesLocation;
use marsad_schemas::{DATE_COLUMN, TableName};
use serde::Serialize;

use crate::{Error, Result};
use marsad_tables::open_table;

/// What compacting one table did.
#[derive(Debug, Clone, Serialize)]
pub struct Compacted {
    /// The table.
    pub table: &'static str,
    /// Small files rewritten.
    pub files_removed: u64,
    /// Files written instead.
    pub files_added: u64,
    /// Partitions touched.
    pub partitions: u64,
}

/// What retention did to one table.
#[derive(Debug, Clone, Serialize)]
pub struct Retained {
    /// The table.
    pub table: &'static str,
    /// Rows of dates before the cut-off deleted.
    pub rows_deleted: usize,
    /// Files removed from storage.
    pub files_vacuumed: usize,
}

/// Rewrites small files of every table into files of about `target_bytes` (Delta optimize).
/// The replaced files stay for time travel until a vacuum past the table's retention.
pub async fn compact_files(
    tables: &TablesLocation,
    target_bytes: u64,
    mut progress: impl FnMut(&'static str),
) -> Result<Vec<Compacted>> {
    let target = NonZeroU64::new(target_bytes.max(1024 * 1024)).unwrap_or(NonZeroU64::MIN);
    let mut out = Vec::new();
    for name in TableName::ALL {
        progress(name.as_str());
        let Some(table) = open_table(tables, name.as_str()).await? else {
            continue;
        };
        if table.version().is_none() {
            continue;
        }
        let (_, metrics) = table
            .optimize()
            .with_target_size(target)
            .await
            .map_err(|source| Error::Delta {
                table: name.as_str(),
                source,
            })?;
        out.push(Compacted {
            table: name.as_str(),
            files_removed: metrics.num_files_removed,
            files_added: metrics.num_files_added,
            partitions: metrics.partitions_optimized,
        });
    }
    Ok(out)
}

/// Deletes every row dated before `cutoff` from every date-partitioned table and removes
/// the deleted files from storage at once, so older table versions do not keep them.
pub async fn apply_retention(
    tables: &TablesLocation,
    cutoff: NaiveDate,
    mut progress: impl FnMut(&'static str),
) -> Result<Vec<Retained>> {
    let mut out = Vec::new();
    for name in TableName::ALL {
        progress(name.as_str());
        let Some(table) = open_table(tables, name.as_str()).await? else {
            continue;
        };
        let delta = |source| Error::Delta {
            table: name.as_str(),
            source,
        };
        let partitioned_by_date = table
            .snapshot()
            .map(|s| s.metadata().partition_columns().iter().any(|c| c == DATE_COLUMN))
            .unwrap_or(false);
        if !partitioned_by_date {
            continue;
        }
        let (table, metrics) = table
            .delete()
            .with_predicate(format!("{DATE_COLUMN} < '{cutoff}'"))
            .await
            .map_err(delta)?;
        // Lite mode removes only files tombstoned by commits (never a writer's uncommitted files)
        let (_, vacuumed) = table
            .vacuum()
            .with_mode(VacuumMode::Lite)
            .with_retention_period(chrono::Duration::zero())
            .with_enforce_retention_duration(false)
            .await
            .map_err(delta)?;
        out.push(Retained {
            table: name.as_str(),
            rows_deleted: metrics.num_deleted_rows.unwrap_or(0),
            files_vacuumed: vacuumed.files_deleted.len(),
        });
    }
    Ok(out)
}
