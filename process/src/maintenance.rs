//! Table maintenance for data engineers' batch jobs: compaction (rollup rows
//! merged per key, then small files rewritten into large ones) and retention
//! (old dates deleted from every table, and their files removed from storage).

use std::num::NonZeroU64;

use chrono::NaiveDate;
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
        let metrics = optimize_marked(tables, table, name.as_str(), None, target).await?;
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
/// with them until it reaches the target). Safe beside an erasure: see [`optimize_marked`].
pub async fn compact_busy_dates(
    tables: &TablesLocation,
    table: TableName,
    target_bytes: u64,
    min_files: usize,
) -> Result<Vec<Compacted>> {
    let target = NonZeroU64::new(target_bytes.max(1024 * 1024)).unwrap_or(NonZeroU64::MIN);
    let name = table.as_str();
    let delta = |source| Error::Delta { table: name, source };
    if marsad_tables::erasure_in_progress(tables).await? {
        tracing::info!(
            table = name,
            "an erasure is in progress; the compaction waits for the next run"
        );
        return Ok(Vec::new());
    }
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
    let mut handle = Some(handle);
    for (date, small) in small_per_date {
        if small < min_files || NaiveDate::parse_from_str(&date, "%Y-%m-%d").is_err() {
            continue;
        }
        // the version just read for the first date; the latest for the next ones
        let handle = match handle.take() {
            Some(h) => h,
            None => match open_table(tables, name).await? {
                Some(h) => h,
                None => break,
            },
        };
        let metrics = optimize_marked(tables, handle, name, Some(&date), target).await?;
        out.push(Compacted {
            table: name,
            files_removed: metrics.num_files_removed,
            files_added: metrics.num_files_added,
            partitions: metrics.partitions_optimized,
        });
    }
    Ok(out)
}

/// Delta optimize of `table` (one `date` partition, or all), its files marked with a fresh
/// run id: when the run fails (it lost a conflict with an erasure), the files it wrote are
/// deleted before the error is returned, since they may hold rows the erasure removed (see
/// [`marsad_tables::rewrites`]).
async fn optimize_marked(
    tables: &TablesLocation,
    table: deltalake::DeltaTable,
    name: &'static str,
    date: Option<&str>,
    target: NonZeroU64,
) -> Result<deltalake::operations::optimize::Metrics> {
    use deltalake::kernel::schema::partitions::{FilterOp, FilterValue};
    let run = marsad_tables::RewriteRun::new();
    let filters: Vec<_> = date
        .map(|d| (DATE_COLUMN, FilterOp::Eq, FilterValue::Scalar(d)))
        .into_iter()
        .collect();
    let optimized = table
        .optimize()
        .with_filters(&filters)
        .with_target_size(target)
        .with_writer_properties(run.writer_properties())
        .with_session_state(marsad_tables::rewrite_session())
        // a long run commits as it goes, so that no file of a live run is ever taken for
        // one a dead run left (`ABANDONED_AFTER`)
        .with_min_commit_interval(std::time::Duration::from_secs(600))
        .await;
    match optimized {
        Ok((_, metrics)) => Ok(metrics),
        Err(source) => {
            let prefix = date.map(|d| format!("{DATE_COLUMN}={d}"));
            let unreferenced = marsad_tables::Unreferenced::Of(&run);
            match marsad_tables::remove_unreferenced_rewrites(tables, name, prefix.as_deref(), unreferenced).await {
                Ok(removed) => tracing::info!(table = name, removed, "compaction failed; removed the files it wrote"),
                Err(e) => tracing::error!(
                    table = name,
                    error = %e,
                    "compaction failed and the files it wrote could not be removed; the next sweep removes them"
                ),
            }
            Err(Error::Delta { table: name, source })
        }
    }
}

/// Files a commit replaced (a compaction's inputs, an erasure's rewrites) stay in storage
/// this long for queries still reading older versions.
pub const REPLACED_FILES_KEPT: chrono::Duration = chrono::Duration::minutes(30);

/// How often `marsad up` / `marsad process` remove replaced files and expired log entries.
/// With [`REPLACED_FILES_KEPT`] it bounds how long a replaced file stays (40 minutes), which
/// must be shorter than the tables' `delta.deletedFileRetentionDuration` (an hour,
/// `table::DELETED_FILE_RETENTION`): past it the checkpoint forgets the file was replaced,
/// and no vacuum that reads the log finds it.
pub const LOG_AND_FILES_MAINTENANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes from storage the files of every table that commits replaced more than
/// [`REPLACED_FILES_KEPT`] ago (a Delta vacuum of the files the log lists as removed). Without
/// it they would stay for good once their tombstones leave the log (after
/// `delta.deletedFileRetentionDuration`, an hour on Marsad's tables): the small files a compaction merged, with
/// rows an erasure or retention removed later from the merged file only.
pub async fn remove_replaced_files(tables: &TablesLocation) -> Result<usize> {
    let mut removed = 0;
    for name in TableName::ALL {
        let Some(table) = open_table(tables, name.as_str()).await? else {
            continue;
        };
        removed += marsad_tables::remove_replaced_files(table, REPLACED_FILES_KEPT)
            .await
            .map_err(|source| Error::Delta {
                table: name.as_str(),
                source,
            })?;
    }
    Ok(removed)
}

/// Removes from every table's `_delta_log` the entries older than `kept` (`None`: the table's
/// `delta.logRetentionDuration`, at least `marsad_tables::CLEANUP_FLOOR`; `Some` is for tests
/// and tools run while no writer is, or by a table's only writer while it waits) that a
/// checkpoint makes unnecessary, but never an `events` commit a rollup has not counted yet. Marsad's tables leave this to the maintenance every ten minutes
/// (`delta.enableExpiredLogCleanup = false`): done by every commit, it lists the whole log.
pub async fn remove_expired_log_entries(tables: &TablesLocation, kept: Option<chrono::Duration>) -> Result<usize> {
    let mut removed = 0;
    for name in TableName::ALL {
        let Some(table) = open_table(tables, name.as_str()).await? else {
            continue;
        };
        let delta = |source| Error::Delta {
            table: name.as_str(),
            source,
        };
        let Some(latest) = table.version() else {
            continue;
        };
        // a backfill commits over the version it read at its start, and its conflict check
        // reads every commit since: none may go while it runs. (Checked after opening the
        // table: a backfill that starts after the check reads `latest` or later, which stays.)
        if marsad_tables::long_transaction_in_progress(tables).await? {
            tracing::info!("a long transaction (a backfill) is in progress: the log cleanup waits");
            return Ok(removed);
        }
        let keep_from = if name == TableName::Events {
            // opened after `events`: positions they counted since only keep more
            let mut rollups = Vec::new();
            for rollup in TableName::ROLLUPS {
                if let Some(table) = open_table(tables, rollup.as_str()).await? {
                    rollups.push(table);
                }
            }
            crate::rollup::oldest_version_to_keep(&table, &rollups).await?
        } else {
            latest
        };
        let kept = match kept {
            Some(kept) => kept,
            None => {
                use deltalake::table::config::TablePropertiesExt;
                // never younger than writers count on (a retention set below it is not honoured):
                // a writer that read a commit under 10 s old finds the later ones by their names
                let retention = table
                    .snapshot()
                    .map_err(delta)?
                    .table_config()
                    .log_retention_duration()
                    .max(marsad_tables::CLEANUP_FLOOR);
                chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX)
            }
        };
        // a retention longer than the calendar reaches (an operator's "interval 100000000 weeks")
        // expires nothing, rather than overflowing
        let Some(cutoff) = chrono::Utc::now().checked_sub_signed(kept) else {
            continue;
        };
        let cutoff = cutoff.timestamp_millis();
        removed += deltalake::protocol::checkpoints::cleanup_expired_logs_for(
            keep_from,
            table.log_store().as_ref(),
            cutoff,
            None,
        )
        .await
        .map_err(delta)?;
    }
    Ok(removed)
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
            .with_session_state(marsad_tables::rewrite_session())
            .with_predicate(format!("{DATE_COLUMN} < '{cutoff}'"))
            .await
            .map_err(delta)?;
        let files_vacuumed = marsad_tables::remove_replaced_files(table, chrono::Duration::zero())
            .await
            .map_err(delta)?;
        out.push(Retained {
            table: name.as_str(),
            rows_deleted: metrics.num_deleted_rows.unwrap_or(0),
            files_vacuumed,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use deltalake::DeltaTable;

    use super::*;
    use crate::rollup::test_batch;
    use crate::table::EventsTable;

    /// Ten visitors `v0`..`v9`, one event each, in one commit.
    async fn append_ten(
        events: &mut EventsTable,
        position: u64,
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let app = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 0);
        let rows: Vec<(String, String, i64)> = (0..10).map(|i| (format!("v{i}"), format!("s{i}"), i)).collect();
        let refs: Vec<(&str, &str, i64, &str, &str)> = rows
            .iter()
            .map(|(v, s, m)| (v.as_str(), s.as_str(), *m, "cars", "page_view"))
            .collect();
        events.append(test_batch(&refs), &[(app, position)]).await?;
        Ok(())
    }

    /// (rows, rows of `visitor`) in the latest version of `events`.
    async fn counts(
        tables: &TablesLocation,
        visitor: &str,
    ) -> std::result::Result<(i64, i64), Box<dyn std::error::Error>> {
        let table = open_table(tables, "events").await?.ok_or("events exists")?;
        let ctx = datafusion::prelude::SessionContext::new();
        marsad_tables::register(&ctx, "events", &table).await?;
        let batches = ctx
            .sql(&format!(
                "SELECT count(*), count(*) FILTER (WHERE visitor_key = '{visitor}') FROM events"
            ))
            .await?
            .collect()
            .await?;
        let column = |i: usize| {
            batches[0]
                .column(i)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .map(|a| a.value(0))
                .ok_or("a count")
        };
        Ok((column(0)?, column(1)?))
    }

    /// Rows of `visitor` in every Parquet file under `dir`, committed or not.
    fn rows_in_storage(dir: &std::path::Path, visitor: &str) -> std::result::Result<usize, Box<dyn std::error::Error>> {
        let mut found = 0;
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(d)? {
                let path = entry?.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "parquet") {
                    let file = std::fs::File::open(&path)?;
                    let reader =
                        deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?
                            .build()?;
                    for batch in reader {
                        let batch = batch?;
                        use arrow::array::Array;
                        let keys = crate::rollup::EventRows::text_column(&batch, "visitor_key")?;
                        found += (0..batch.num_rows())
                            .filter(|&i| keys.is_valid(i) && keys.value(i) == visitor)
                            .count();
                    }
                }
            }
        }
        Ok(found)
    }

    fn is_conflict<T>(result: &std::result::Result<T, deltalake::DeltaTableError>) -> bool {
        matches!(
            result,
            Err(deltalake::DeltaTableError::Transaction {
                source: deltalake::kernel::transaction::TransactionError::CommitConflict(_)
            })
        )
    }

    /// An erasure (a Delta delete) and a compaction of `events` that read the same version
    /// never both commit, whichever commits first: otherwise the erased rows would come back
    /// in the compacted file, and the rewritten file's other rows would be there twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_erasure_and_a_compaction_of_the_same_rows_never_both_commit()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let mut events = EventsTable::open_or_create(&tables).await?;
        for c in 0..3 {
            append_ten(&mut events, c * 10 + 9).await?;
        }
        let date = |table: &DeltaTable| -> std::result::Result<String, Box<dyn std::error::Error>> {
            Ok(table
                .snapshot()?
                .log_data()
                .into_iter()
                .find_map(|f| f.partition_values_map().get(DATE_COLUMN).cloned().flatten())
                .ok_or("a dated file")?)
        };

        // the compaction commits first; the erasure read the version before it
        let erasure_read = open_table(&tables, "events").await?.ok_or("events")?;
        let compacted = compact_busy_dates(&tables, TableName::Events, 64 << 20, 2).await?;
        assert_eq!(compacted.iter().map(|c| c.files_removed).sum::<u64>(), 3);
        // (marked as the erasure marks its files, and its files removed when it fails)
        let run = marsad_tables::RewriteRun::new();
        let erased = erasure_read
            .delete()
            .with_predicate("visitor_key = 'v3'")
            .with_writer_properties(run.writer_properties())
            .await;
        assert!(
            is_conflict(&erased),
            "the erasure must not commit over the compaction: {erased:?}"
        );
        let unreferenced = marsad_tables::Unreferenced::Of(&run);
        let removed = marsad_tables::remove_unreferenced_rewrites(&tables, "events", None, unreferenced).await?;
        assert_eq!(removed, 1, "the erasure's rewrite of the file it read");
        assert_eq!(counts(&tables, "v3").await?, (30, 3), "nothing lost, nothing doubled");

        // the erasure commits first; the compaction read the version before it
        for c in 3..6 {
            append_ten(&mut events, c * 10 + 9).await?;
        }
        let compaction_read = open_table(&tables, "events").await?.ok_or("events")?;
        let day = date(&compaction_read)?;
        let (_, erased) = open_table(&tables, "events")
            .await?
            .ok_or("events")?
            .delete()
            .with_predicate("visitor_key = 'v4'")
            .await?;
        assert_eq!(erased.num_deleted_rows, Some(6));
        let target = NonZeroU64::new(64 << 20).ok_or("target")?;
        let compacted = optimize_marked(&tables, compaction_read, "events", Some(&day), target).await;
        assert!(
            matches!(
                &compacted,
                Err(Error::Delta {
                    source: deltalake::DeltaTableError::Transaction { .. },
                    ..
                })
            ),
            "the compaction must not commit over the erasure: {compacted:?}"
        );
        assert_eq!(counts(&tables, "v4").await?, (54, 0), "the erased rows stay erased");
        // the erasure then removes the files it rewrote from storage
        let events = open_table(&tables, "events").await?.ok_or("events")?;
        let vacuumed = marsad_tables::remove_replaced_files(events, chrono::Duration::zero()).await?;
        assert!(vacuumed > 0);
        // and the file the compaction wrote from the older version, v4's rows in it, is gone
        assert_eq!(
            rows_in_storage(dir.path(), "v4")?,
            0,
            "an uncommitted compaction file keeps erased rows"
        );
        assert_eq!(rows_in_storage(dir.path(), "v5")?, 6, "only the committed files remain");
        Ok(())
    }

    /// The processor appends while an erasure deletes (the erasure read the version before the
    /// append): the delete still commits. Under Delta's default isolation it failed on every
    /// append whose rows might match, so an erasure never finished while events kept coming.
    #[tokio::test]
    async fn an_erasure_commits_beside_the_processors_appends() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let mut events = EventsTable::open_or_create(&tables).await?;
        append_ten(&mut events, 9).await?;
        let erasure_read = open_table(&tables, "events").await?.ok_or("events")?;
        append_ten(&mut events, 19).await?;
        let (_, erased) = erasure_read.delete().with_predicate("visitor_key = 'v3'").await?;
        assert_eq!(erased.num_deleted_rows, Some(1), "the rows of the version it read");
        assert_eq!(
            counts(&tables, "v3").await?,
            (19, 1),
            "the row appended meanwhile is the next pass's"
        );
        Ok(())
    }

    /// The other order: an erasure commits between the processor's snapshot and its append.
    /// delta-rs takes the append for a read of the file the erasure removed; the append goes
    /// on the newer version (it read nothing), once, without the processor giving its
    /// partition up. A writer that recorded the same partition meanwhile still wins.
    #[tokio::test]
    async fn an_append_commits_over_an_erasure_unless_its_partition_moved()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let mut events = EventsTable::open_or_create(&tables).await?;
        append_ten(&mut events, 9).await?;
        let erase = |visitor: &'static str| {
            let tables = tables.clone();
            async move {
                let table = open_table(&tables, "events").await?.ok_or("events")?;
                let (_, erased) = table
                    .delete()
                    .with_predicate(format!("visitor_key = '{visitor}'"))
                    .await?;
                Ok::<_, Box<dyn std::error::Error>>(erased.num_deleted_rows)
            }
        };
        assert_eq!(erase("v3").await?, Some(1));
        append_ten(&mut events, 19).await?;
        assert_eq!(
            counts(&tables, "v3").await?,
            (19, 1),
            "the append after the erasure, once"
        );

        // an erasure, then another processor takes the partition (records a position of it):
        // the append meets the erasure first, and must not go on over the other's position
        assert_eq!(erase("v4").await?, Some(2));
        let mut taken_over = EventsTable::open_or_create(&tables).await?;
        append_ten(&mut taken_over, 29).await?;
        let failed = append_ten(&mut events, 29).await;
        let error = failed.err().ok_or("an append over another processor's position")?;
        let error = error
            .downcast::<Error>()
            .map_err(|e| format!("not a processor error: {e}"))?;
        assert!(error.is_lost_ownership(), "{error}");
        assert_eq!(
            counts(&tables, "v4").await?,
            (27, 1),
            "nothing doubled, the erased stay erased"
        );
        Ok(())
    }

    /// A processor that committed only one of its partitions for a while has a snapshot past
    /// another processor's take-over of the other: its next append there, failed by an
    /// erasure, must not go on over the new owner's position.
    #[tokio::test]
    async fn an_append_over_an_erasure_sees_a_take_over_its_quiet_commits_stepped_past()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let (p0, p1) = (
            crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 0),
            crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 1),
        );
        let batch = || test_batch(&[("v1", "s1", 1, "cars", "page_view")]);
        let mut events = EventsTable::open_or_create(&tables).await?;
        // it owns both partitions: neither has a position yet
        assert!(events.committed_offsets(&[p0.clone(), p1.clone()]).await?.is_empty());
        events.append(batch(), &[(p0.clone(), 9)]).await?;
        let mut other = EventsTable::open_or_create(&tables).await?;
        other.append(batch(), &[(p1.clone(), 19)]).await?;
        // partition 0 alone: no conflict, and its snapshot now holds the other's position
        events.append(batch(), &[(p0.clone(), 29)]).await?;
        let table = open_table(&tables, "events").await?.ok_or("events")?;
        table.delete().with_predicate("visitor_key = 'v1'").await?;
        let error = events
            .append(batch(), &[(p1.clone(), 39)])
            .await
            .err()
            .ok_or("an append over another processor's position")?;
        assert!(error.is_lost_ownership(), "{error}");
        Ok(())
    }

    /// A table an earlier Marsad made (or a data engineer's tool) gets the properties Marsad
    /// needs when the processor opens it: log cleanup out of the commit path, an hour's log
    /// retention, and for `events` the isolation an erasure needs. An operator's own retention
    /// is left alone; the isolation level is not, correctness rests on it.
    #[tokio::test]
    async fn tables_made_before_get_marsads_properties_and_keep_an_operators_choice()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let schema: deltalake::kernel::StructType = marsad_schemas::events_schema().as_ref().try_into_kernel()?;
        marsad_tables::table_handle(&tables, "events")?
            .create()
            .with_columns(schema.fields().cloned())
            .with_partition_columns([DATE_COLUMN])
            .with_configuration_property(deltalake::TableProperty::IsolationLevel, Some("Serializable"))
            .with_configuration_property(deltalake::TableProperty::LogRetentionDuration, Some("interval 7 days"))
            .await?;
        let mut events = EventsTable::open_or_create(&tables).await?;
        append_ten(&mut events, 9).await?;
        let table = open_table(&tables, "events").await?.ok_or("events")?;
        let configuration = table.snapshot()?.metadata().configuration().clone();
        let property = |key: &str| configuration.get(key).map(String::as_str);
        assert_eq!(property("delta.isolationLevel"), Some("writeSerializable"));
        assert_eq!(property("delta.enableExpiredLogCleanup"), Some("false"));
        assert_eq!(property("delta.logRetentionDuration"), Some("interval 7 days"));
        assert_eq!(property("delta.dataSkippingStatsColumns"), Some("ts"));
        Ok(())
    }

    /// Delta copies a file's min and max of each statistics column into its log: with one
    /// visitor in a file, that is the visitor's pseudonym and session, kept in the log (and
    /// in checkpoints while the file lives) apart from the rows an erasure rewrites. Only
    /// the time is copied.
    #[tokio::test]
    async fn no_pseudonym_or_session_reaches_the_delta_log() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let mut events = EventsTable::open_or_create(&tables).await?;
        let app = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 0);
        let pseudonym = "5f1e0c2b9a7d4e3f8a6b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
        let session = "session-of-the-only-visitor";
        events
            .append(test_batch(&[(pseudonym, session, 3, "cars", "page_view")]), &[(app, 0)])
            .await?;
        let mut log = String::new();
        let mut kept = Vec::new();
        for entry in std::fs::read_dir(dir.path().join("events/_delta_log"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path)?;
                for action in text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                {
                    let Some(stats) = action.pointer("/add/stats").and_then(|s| s.as_str()) else {
                        continue;
                    };
                    let stats: serde_json::Value = serde_json::from_str(stats)?;
                    if let Some(min) = stats.get("minValues").and_then(|m| m.as_object()) {
                        kept.extend(min.keys().cloned());
                    }
                }
                log.push_str(&text);
            }
        }
        assert_eq!(kept, vec!["ts".to_owned()], "the file's statistics: {log}");
        assert!(!log.contains(pseudonym), "a pseudonym in the Delta log: {log}");
        assert!(!log.contains(session), "a session id in the Delta log: {log}");
        Ok(())
    }

    /// `events` with a checkpoint every 5 versions and `commits` appends of partition 1.
    async fn events_with_checkpoints(
        tables: &TablesLocation,
        commits: u64,
    ) -> std::result::Result<EventsTable, Box<dyn std::error::Error>> {
        let mut events = EventsTable::checkpointing_every(tables, 5).await?;
        let other = crate::offsets::app_id(marsad_schemas::TOPIC_RAW, 1);
        for c in 0..commits {
            let rows = [(format!("w{c}"), format!("t{c}"), c as i64)];
            let refs: Vec<(&str, &str, i64, &str, &str)> = rows
                .iter()
                .map(|(v, s, m)| (v.as_str(), s.as_str(), *m, "cars", "page_view"))
                .collect();
            events.append(test_batch(&refs), &[(other.clone(), c)]).await?;
        }
        Ok(events)
    }

    /// A processor whose partitions were quiet for over an hour while others committed holds
    /// a version whose later commits have left the log: its next commit cannot check them for
    /// conflicts and fails, as lost ownership (it reads its positions again and goes on),
    /// not as an error that stops `marsad up`.
    #[tokio::test]
    async fn a_commit_over_a_version_whose_successors_left_the_log_is_lost_ownership()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let mut quiet = EventsTable::open_or_create(&tables).await?;
        events_with_checkpoints(&tables, 12).await?;
        let removed = remove_expired_log_entries(&tables, Some(chrono::Duration::zero())).await?;
        assert!(removed > 0);
        let failed = append_ten(&mut quiet, 9).await;
        let error = failed
            .err()
            .ok_or("a commit over a version whose successors are gone")?;
        let error = error
            .downcast::<Error>()
            .map_err(|e| format!("not a processor error: {e}"))?;
        assert!(error.is_lost_ownership(), "{error}");
        // read again, it commits
        let mut fresh = EventsTable::open_or_create(&tables).await?;
        append_ten(&mut fresh, 9).await?;
        Ok(())
    }

    /// While a backfill runs (it commits over the version it read at its start, possibly
    /// hours later), the log cleanup removes nothing; once it is done, the cleanup goes on.
    #[tokio::test]
    async fn the_log_cleanup_waits_for_a_long_transaction() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        events_with_checkpoints(&tables, 12).await?;
        let notice = marsad_tables::announce_long_transaction(&tables).await?;
        let removed = remove_expired_log_entries(&tables, Some(chrono::Duration::zero())).await?;
        assert_eq!(removed, 0, "the log was cleaned under a running backfill");
        notice.withdraw().await;
        let removed = remove_expired_log_entries(&tables, Some(chrono::Duration::zero())).await?;
        assert!(removed > 0);
        Ok(())
    }

    /// `events` with checkpoints, 12 commits, and its `delta.logRetentionDuration` set to `retention`.
    async fn events_with_log_retention(
        tables: &TablesLocation,
        retention: &str,
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        events_with_checkpoints(tables, 12).await?;
        let table = open_table(tables, "events").await?.ok_or("events exists")?;
        table
            .set_tbl_properties()
            .with_properties(std::collections::HashMap::from([(
                "delta.logRetentionDuration".to_owned(),
                retention.to_owned(),
            )]))
            .await?;
        Ok(())
    }

    /// A writer on local disk finds the commits after the one it read by their names while that
    /// one is under 10 s old (`marsad_tables::FRESH_COMMIT`), which is sound only while no
    /// cleanup removes such young entries: the maintenance keeps every entry at least
    /// `marsad_tables::CLEANUP_FLOOR`, however short a table's retention is set.
    #[tokio::test]
    async fn the_log_cleanup_keeps_young_entries_whatever_the_retention()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        events_with_log_retention(&tables, "interval 1 second").await?;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let removed = remove_expired_log_entries(&tables, None).await?;
        assert_eq!(
            removed, 0,
            "entries under the floor were removed by the table's retention"
        );
        // they were removable: asked to keep nothing, the cleanup removes them
        let removed = remove_expired_log_entries(&tables, Some(chrono::Duration::zero())).await?;
        assert!(removed > 0);
        Ok(())
    }

    /// An operator may keep the log for as long as they like: a retention past what the
    /// calendar reaches expires nothing, and the cleanup `marsad up` runs does not panic on it.
    #[tokio::test]
    async fn a_retention_past_the_calendar_expires_nothing() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        events_with_log_retention(&tables, "interval 100000000 weeks").await?;
        assert_eq!(remove_expired_log_entries(&tables, None).await?, 0);
        assert_eq!(
            remove_expired_log_entries(&tables, Some(chrono::Duration::MAX)).await?,
            0
        );
        // the same log, asked to keep nothing, had entries to remove
        assert!(remove_expired_log_entries(&tables, Some(chrono::Duration::zero())).await? > 0);
        Ok(())
    }

    /// A replaced file is removed (at most `REPLACED_FILES_KEPT` plus a maintenance interval
    /// after its commit) before the log forgets it (`DELETED_FILE_RETENTION`): after that, no
    /// vacuum that reads the log would find it.
    #[test]
    fn replaced_files_go_before_the_log_forgets_them() {
        let removed_within = REPLACED_FILES_KEPT.num_minutes() + LOG_AND_FILES_MAINTENANCE_EVERY.as_secs() as i64 / 60;
        assert_eq!(crate::table::DELETED_FILE_RETENTION, "interval 60 minutes");
        assert!(
            removed_within + 15 <= 60,
            "{removed_within} minutes leave too little margin"
        );
    }

    /// Files a compaction rewrote keep the processor's column types (`Utf8`, not
    /// DataFusion's `Utf8View`): an engine reading the table's files itself (DataFusion's
    /// Parquet listing, in `benches/engines.py`) refused to merge a table whose files
    /// disagreed.
    #[tokio::test]
    async fn rewritten_files_keep_the_column_types_the_processor_writes()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let mut events = EventsTable::open_or_create(&tables).await?;
        for c in 0..10u64 {
            append_ten(&mut events, c * 10 + 9).await?;
        }
        let compacted = compact_busy_dates(&tables, TableName::Events, 128 << 20, 10).await?;
        assert!(!compacted.is_empty(), "the date was compacted");
        assert_text_is_utf8(dir.path(), &tables, "after the compaction").await
        // (a delete's rewrite still writes Utf8View: delta-rs 1.1's delete scans with view
        // types whatever the session says; the next compaction of the date rewrites it)
    }

    /// Every active `events` file's text columns are `Utf8` in its Parquet schema.
    async fn assert_text_is_utf8(
        dir: &std::path::Path,
        tables: &TablesLocation,
        when: &str,
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let table = open_table(tables, "events").await?.ok_or("events")?;
        let mut files = 0;
        for f in table.snapshot()?.log_data() {
            let path = dir.join("events").join(f.path().as_ref());
            let path = if path.exists() {
                path
            } else {
                dir.join("events")
                    .join(deltalake::Path::from_url_path(f.path().as_ref())?.as_ref())
            };
            let reader = deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(&path)?,
            )?;
            for field in reader.schema().fields() {
                assert_ne!(
                    field.data_type(),
                    &arrow::datatypes::DataType::Utf8View,
                    "{} in {}, {when}",
                    field.name(),
                    path.display()
                );
            }
            files += 1;
        }
        assert!(files > 0);
        Ok(())
    }
}
