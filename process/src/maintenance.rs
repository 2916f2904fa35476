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

/// Rewrites the small files of each date of `table` that has at least `min_files` of them
/// (smaller than half of `target_bytes`) into files of about `target_bytes`: how `events`
/// reaches its target file size without an operator, while the processor keeps appending.
/// A date is rewritten only once it has gathered `min_files` small files (the rewrite takes
/// every file of the date under the target size, so a date's earlier output is rewritten
/// with them until it reaches the target). Not safe beside an erasure of the same table (see
/// `process.events_compaction_min_files`).
pub async fn compact_busy_dates(
    tables: &TablesLocation,
    table: TableName,
    target_bytes: u64,
    min_files: usize,
) -> Result<Vec<Compacted>> {
    use deltalake::kernel::schema::partitions::{FilterOp, FilterValue};
    let target = NonZeroU64::new(target_bytes.max(1024 * 1024)).unwrap_or(NonZeroU64::MIN);
    let name = table.as_str();
    let delta = |source| Error::Delta { table: name, source };
    let Some(handle) = open_table(tables, name).await? else {
        return Ok(Vec::new());
    };
    let mut small_per_date: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for file in handle.snapshot().map_err(delta)?.log_data() {
        if u64::try_from(file.size()).unwrap_or(u64::MAX) < target.get() / 2
            && let Some(Some(date)) = file.partition_values_map().get(DATE_COLUMN).cloned()
        {
            *small_per_date.entry(date).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for (date, small) in small_per_date {
        if small < min_files || NaiveDate::parse_from_str(&date, "%Y-%m-%d").is_err() {
            continue;
        }
        let Some(handle) = open_table(tables, name).await? else {
            break;
        };
        let filters = [(DATE_COLUMN, FilterOp::Eq, FilterValue::Scalar(date.as_str()))];
        let (_, metrics) = handle
            .optimize()
            .with_filters(&filters)
            .with_target_size(target)
            .await
            .map_err(delta)?;
        out.push(Compacted {
            table: name,
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
