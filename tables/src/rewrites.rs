//! Rewrites that lose: a compaction (Delta optimize) and an erasure (Delta delete) of the
//! same files never both commit, since Delta takes either order as a conflict. But the
//! loser has already written its new files, and nothing references them: a compaction's may
//! hold rows an erasure has just removed, an erasure's hold the rows of everyone else in the
//! files it rewrote (among them a later erasure's subject, which vacuums only files a
//! commit removed). So each rewrite marks the files it writes with its run's id in the
//! Parquet footer, and when it fails, removes the files of its run that no version
//! references. A writer's files not committed yet carry no mark and are never touched.

use std::collections::HashSet;

use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::metadata::{FooterTail, KeyValue, ParquetMetaDataReader};
use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesBuilder};
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::{DeltaTableError, ObjectStore, Path};
use futures::TryStreamExt;
use marsad_config::TablesLocation;
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::{Result, delta, open_table};

/// The Parquet footer key a rewrite marks its files with; the value is the run's id.
pub const REWRITE_RUN_KEY: &str = "marsad.rewrite_run";

/// A marked file no version references is left over from a rewrite that died before its
/// commit once it is this old: a rewrite commits at least every ten minutes (see
/// `process::maintenance`), so no live run's file is this old.
pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Any data file no version references is left over once it is this old, marked or not: a
/// writer that died between writing and committing (a processor's append, a backfill), or a
/// replaced file the log forgot before a vacuum removed it (its tombstone expired while the
/// maintenance was not running). Such a file may hold rows an erasure or retention removed
/// from every committed file. Marsad's writers commit within minutes, except a backfill,
/// whose files are left alone while it announces itself ([`announce_long_transaction`]);
/// another tool's writer that takes a day between writing a file and committing it would
/// lose it.
pub const UNREFERENCED_KEPT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Rows per row group of a rewrite (a compaction, an erasure). A Parquet writer holds the row
/// group it is writing in memory, and Parquet's default is about a million rows.
pub const REWRITE_ROW_GROUP_ROWS: usize = 64 * 1024;

/// One run of a rewrite (a compaction, an erasure's delete): what marks its files.
#[derive(Debug, Clone)]
pub struct RewriteRun {
    id: String,
    started: std::time::SystemTime,
}

impl Default for RewriteRun {
    fn default() -> Self {
        Self::new()
    }
}

impl RewriteRun {
    /// A run with a fresh random id.
    pub fn new() -> Self {
        RewriteRun {
            id: format!("{:032x}", rand::random::<u128>()),
            started: std::time::SystemTime::now(),
        }
    }

    /// The run's id, as the footers of its files say it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Parquet writer settings that mark the files with this run (zstd, as Delta optimize's
    /// default; the sketches as [`sketch_column_settings`] says), in row groups of
    /// [`REWRITE_ROW_GROUP_ROWS`].
    pub fn writer_properties(&self) -> WriterProperties {
        let builder = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(4).unwrap_or_default()))
            .set_max_row_group_row_count(Some(REWRITE_ROW_GROUP_ROWS))
            .set_key_value_metadata(Some(vec![KeyValue::new(REWRITE_RUN_KEY.to_owned(), self.id.clone())]));
        sketch_column_settings(builder).build()
    }
}

/// The rollups' column of visitor sketches.
pub const SKETCH_COLUMN: &str = "visitors";

/// How the rollups' visitor sketches are written: every report reads all of the ones it
/// merges, so uncompressed (LZ4, the codec that read fastest, was still 12-15 % of a computed geo
/// report's samples; without it the report took 9.3 ms against 10.3, BENCHMARKS.md, "Sparse
/// sketches merged as coupons, sketches stored plain"), at about one and a half times LZ4's size
/// (6.8 against 4.5 MB of `traffic_hourly`'s sketches after a million simulated events);
/// without a dictionary (every sketch differs) and with statistics of the column chunk only (a
/// sketch's bytes prune nothing). Other tables have no such column, and the settings do
/// nothing there.
pub fn sketch_column_settings(builder: WriterPropertiesBuilder) -> WriterPropertiesBuilder {
    let column = ColumnPath::from(SKETCH_COLUMN);
    builder
        .set_column_compression(column.clone(), Compression::UNCOMPRESSED)
        .set_column_dictionary_enabled(column.clone(), false)
        .set_column_statistics_enabled(column, EnabledStatistics::Chunk)
}

/// Which unreferenced marked files [`remove_unreferenced_rewrites`] deletes.
#[derive(Debug, Clone, Copy)]
pub enum Unreferenced<'a> {
    /// Those of one run, which has failed.
    Of(&'a RewriteRun),
    /// Those of any run, older than [`ABANDONED_AFTER`] (runs that died before committing),
    /// and any unreferenced file older than [`UNREFERENCED_KEPT`], marked or not.
    Abandoned,
}

/// Deletes the data files of table `name` (under `prefix`, such as `date=2026-11-28`) that
/// the latest version does not reference and `which` names; returns how many.
pub async fn remove_unreferenced_rewrites(
    location: &TablesLocation,
    name: &str,
    prefix: Option<&str>,
    which: Unreferenced<'_>,
) -> Result<usize> {
    // a backfill writes its files as it reads the raw log and commits them at its end: they
    // may be a day old and still be its (checked before the snapshot: a backfill that commits
    // and withdraws after it has its files in no version this sweep sees)
    let long_transaction_running =
        matches!(which, Unreferenced::Abandoned) && long_transaction_in_progress(location).await?;
    let Some(table) = open_table(location, name).await? else {
        return Ok(0);
    };
    // an active file's path as the log has it, encoded and not: never taken for unreferenced
    // (`active`: those the latest version references, and for the sweep those it remembers
    // as replaced)
    let mut active: HashSet<Path> = HashSet::new();
    for f in table.snapshot().map_err(delta(name))?.log_data() {
        let raw = f.path();
        active.insert(Path::from(raw.as_ref()));
        if let Ok(decoded) = Path::from_url_path(raw.as_ref()) {
            active.insert(decoded);
        }
    }
    // a file a commit replaced is the vacuum's after `REPLACED_FILES_KEPT` (queries may still
    // read the version before), however old the file itself is
    if matches!(which, Unreferenced::Abandoned) {
        let log_store = table.log_store();
        let mut tombstones = table
            .snapshot()
            .map_err(delta(name))?
            .all_tombstones(log_store.as_ref());
        while let Some(tombstone) = tombstones.try_next().await.map_err(delta(name))? {
            let raw = tombstone.path();
            active.insert(Path::from(raw.as_ref()));
            if let Ok(decoded) = Path::from_url_path(raw.as_ref()) {
                active.insert(decoded);
            }
        }
    }
    let store = table.object_store();
    let listed: Vec<ObjectMeta> = store
        .list(prefix.map(Path::from).as_ref())
        .try_collect()
        .await
        .map_err(|e| delta(name)(e.into()))?;
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for meta in listed {
        let path = meta.location.as_ref();
        if !path.ends_with(".parquet") || path.starts_with("_delta_log") || active.contains(&meta.location) {
            continue;
        }
        let written = std::time::SystemTime::from(meta.last_modified);
        let candidate = match which {
            Unreferenced::Abandoned => now.duration_since(written).is_ok_and(|age| age > ABANDONED_AFTER),
            // (a minute's slack for the clocks of the store and of this process)
            Unreferenced::Of(run) => written + std::time::Duration::from_secs(60) >= run.started,
        };
        if !candidate {
            continue;
        }
        let forgotten = matches!(which, Unreferenced::Abandoned)
            && !long_transaction_running
            && now.duration_since(written).is_ok_and(|age| age > UNREFERENCED_KEPT);
        // a file gone meanwhile (a vacuum beside) or unreadable is skipped, not the end of
        // the sweep: the files after it may be the ones holding erased rows
        if !forgotten {
            let mark = match rewrite_mark(store.as_ref(), name, &meta).await {
                Ok(Some(mark)) => mark,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(table = name, path, error = %e, "could not read a footer; skipped");
                    continue;
                }
            };
            if let Unreferenced::Of(run) = which
                && mark != run.id
            {
                continue;
            }
        }
        match store.delete(&meta.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
            Err(e) => {
                tracing::warn!(table = name, path, error = %e, "could not remove a file; the next sweep tries again")
            }
        }
    }
    Ok(removed)
}

/// The rewrite run a Parquet file's footer names, if a rewrite wrote it.
async fn rewrite_mark(store: &dyn ObjectStore, name: &str, meta: &ObjectMeta) -> Result<Option<String>> {
    let size = meta.size;
    if size < 12 {
        return Ok(None);
    }
    let read = |e: object_store::Error| delta(name)(DeltaTableError::from(e));
    let tail = match store.get_range(&meta.location, size - 8..size).await {
        Ok(tail) => tail,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    let Ok(tail) = <[u8; 8]>::try_from(tail.as_ref()) else {
        return Ok(None);
    };
    let Ok(footer) = FooterTail::try_new(&tail) else {
        return Ok(None);
    };
    let length = footer.metadata_length() as u64;
    if footer.is_encrypted_footer() || length + 8 > size {
        return Ok(None);
    }
    let bytes = store
        .get_range(&meta.location, size - 8 - length..size - 8)
        .await
        .map_err(read)?;
    let Ok(metadata) = ParquetMetaDataReader::decode_metadata(&bytes) else {
        return Ok(None);
    };
    Ok(metadata
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == REWRITE_RUN_KEY))
        .and_then(|k| k.value.clone()))
}

/// An erasure announces itself in storage for as long as it runs, so that the background
/// compaction holds off: each would otherwise keep failing the other's commit on a busy date.
/// Correctness never rests on it (Delta's conflicts do that); progress does.
#[derive(Debug)]
pub struct ErasureNotice {
    store: deltalake::logstore::ObjectStoreRef,
    path: Path,
}

/// A notice older than this is from an erasure that died: it no longer holds compaction off.
pub const ERASURE_NOTICE_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Where erasure notices live: a directory beside the tables (no table's).
const NOTICES: &str = "_erasures_in_progress";

/// Where the notices of long transactions live (see [`announce_long_transaction`]).
const LONG_TRANSACTIONS: &str = "_long_transactions_in_progress";

/// A long transaction's notice not renewed for this long is from a process that died.
/// (Generous beside the minute between renewals: the store's clock and this host's may differ.)
pub const LONG_TRANSACTION_NOTICE_TTL: std::time::Duration = std::time::Duration::from_secs(900);

/// How often a long transaction renews its notice.
const LONG_TRANSACTION_RENEWAL: std::time::Duration = std::time::Duration::from_secs(60);

fn notices(location: &TablesLocation, dir: &str) -> Result<deltalake::logstore::ObjectStoreRef> {
    Ok(crate::table_handle(location, dir)?.object_store())
}

/// Writes (or renews) notice `path` in `dir`.
async fn put_notice(store: &dyn ObjectStore, dir: &str, path: &Path, text: &'static [u8]) -> Result<()> {
    store
        .put(path, bytes::Bytes::from_static(text).into())
        .await
        .map(|_| ())
        .map_err(|e| delta(dir)(e.into()))
}

/// Whether `dir` holds a notice written less than `ttl` ago.
async fn fresh_notice(location: &TablesLocation, dir: &str, ttl: std::time::Duration) -> Result<bool> {
    let store = notices(location, dir)?;
    let listed: Vec<ObjectMeta> = store.list(None).try_collect().await.map_err(|e| delta(dir)(e.into()))?;
    let now = std::time::SystemTime::now();
    Ok(listed
        .iter()
        .filter(|m| m.location.as_ref().ends_with(".notice"))
        .any(|m| {
            let written = std::time::SystemTime::from(m.last_modified);
            // (a notice dated in the future counts as written now: it still expires)
            now.duration_since(written).map_or(true, |age| age < ttl) && written < now + ttl
        }))
}

/// Announces an erasure until [`ErasureNotice::withdraw`] (or [`ERASURE_NOTICE_TTL`]).
pub async fn announce_erasure(location: &TablesLocation) -> Result<ErasureNotice> {
    let store = notices(location, NOTICES)?;
    let path = Path::from(format!("{}.notice", RewriteRun::new().id()));
    put_notice(store.as_ref(), NOTICES, &path, b"erasure in progress\n").await?;
    Ok(ErasureNotice { store, path })
}

impl ErasureNotice {
    /// Ends the announcement.
    pub async fn withdraw(self) {
        if let Err(e) = self.store.delete(&self.path).await {
            tracing::warn!(error = %e, "an erasure notice could not be removed; it expires");
        }
    }
}

/// Whether an erasure announced itself less than [`ERASURE_NOTICE_TTL`] ago and is not done.
pub async fn erasure_in_progress(location: &TablesLocation) -> Result<bool> {
    fresh_notice(location, NOTICES, ERASURE_NOTICE_TTL).await
}

/// A transaction that commits long after the version it read (a backfill) announces itself
/// for as long as it runs, renewing its notice every minute: the log cleanup removes nothing
/// meanwhile, since its commit must read every commit after its version to check for
/// conflicts (a missing one fails it).
#[derive(Debug)]
pub struct LongTransactionNotice {
    store: deltalake::logstore::ObjectStoreRef,
    path: Path,
    renewal: tokio::task::JoinHandle<()>,
}

/// Announces a long transaction until [`LongTransactionNotice::withdraw`] (or its process
/// dies, and the notice is [`LONG_TRANSACTION_NOTICE_TTL`] old).
pub async fn announce_long_transaction(location: &TablesLocation) -> Result<LongTransactionNotice> {
    let store = notices(location, LONG_TRANSACTIONS)?;
    let path = Path::from(format!("{}.notice", RewriteRun::new().id()));
    const TEXT: &[u8] = b"a transaction reading an older version is in progress\n";
    put_notice(store.as_ref(), LONG_TRANSACTIONS, &path, TEXT).await?;
    let renewal = {
        let (store, path) = (store.clone(), path.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LONG_TRANSACTION_RENEWAL).await;
                if let Err(e) = put_notice(store.as_ref(), LONG_TRANSACTIONS, &path, TEXT).await {
                    tracing::warn!(error = %e, "a long transaction's notice could not be renewed; trying again");
                }
            }
        })
    };
    Ok(LongTransactionNotice { store, path, renewal })
}

impl LongTransactionNotice {
    /// Ends the announcement.
    pub async fn withdraw(self) {
        self.renewal.abort();
        if let Err(e) = self.store.delete(&self.path).await {
            tracing::warn!(error = %e, "a long transaction's notice could not be removed; it expires");
        }
    }
}

impl Drop for LongTransactionNotice {
    fn drop(&mut self) {
        // (withdrawn or not, the renewal stops with the transaction)
        self.renewal.abort();
    }
}

/// Whether a long transaction announced itself and renewed its notice within
/// [`LONG_TRANSACTION_NOTICE_TTL`].
pub async fn long_transaction_in_progress(location: &TablesLocation) -> Result<bool> {
    fresh_notice(location, LONG_TRANSACTIONS, LONG_TRANSACTION_NOTICE_TTL).await
}

/// Removes from storage the files commits of `table` removed more than `kept` ago (zero: all
/// of them, however recent); returns how many. Delta's vacuum in Lite mode: it removes only
/// files the log lists as removed, never a writer's files not committed yet.
pub async fn remove_replaced_files(
    table: deltalake::DeltaTable,
    kept: chrono::Duration,
) -> Result<usize, DeltaTableError> {
    let (_, vacuumed) = table
        .vacuum()
        .with_mode(deltalake::operations::vacuum::VacuumMode::Lite)
        .with_retention_period(kept)
        .with_enforce_retention_duration(false)
        .await?;
    Ok(vacuumed.files_deleted.len())
}

/// Whether `error` (or one it wraps) says a file was not in storage: a data file of the table
/// version read, replaced by a later commit and vacuumed. Reading the table again helps.
pub fn is_vanished_file(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(object_store::Error::NotFound { .. }) = e.downcast_ref::<object_store::Error>() {
            return true;
        }
        source = e.source();
    }
    // errors that carry the object store's only as text (DataFusion's external errors)
    let text = error.to_string();
    text.contains("Object at location") && text.contains("not found")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use deltalake::kernel::{DataType as DeltaType, PrimitiveType, StructField};

    use super::*;

    /// A data file written and never committed by a writer that died (no rewrite mark) is
    /// removed by the sweep once a day old: it may hold rows erased from every committed
    /// file. A younger one may be a live writer's and stays, as do the committed files and a
    /// day-old file a commit replaced moments ago (queries may still read it).
    #[tokio::test]
    async fn a_day_old_file_no_version_references_is_removed_marked_or_not() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let location = TablesLocation::local(dir.path())?;
        let table = crate::table_handle(&location, "t")?
            .create()
            .with_columns([StructField::new("n", DeltaType::Primitive(PrimitiveType::Long), true)])
            .await?;
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2, 3]))])?;
        let table = table.write(vec![batch.clone()]).await?;
        // a day-old file a commit has just replaced: the vacuum's, 30 minutes later
        let replaced: Vec<String> = table
            .snapshot()?
            .log_data()
            .into_iter()
            .map(|f| f.path().to_string())
            .collect();
        table
            .write(vec![batch.clone()])
            .with_save_mode(deltalake::protocol::SaveMode::Overwrite)
            .await?;
        let replaced = dir.path().join("t").join(replaced.first().ok_or("a file")?);
        std::fs::File::options()
            .write(true)
            .open(&replaced)?
            .set_modified(std::time::SystemTime::now() - UNREFERENCED_KEPT * 2)?;
        let stray = |name: &str, age: std::time::Duration| -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
            let path = dir.path().join("t").join(name);
            let file = std::fs::File::create(&path)?;
            let mut writer = deltalake::parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)?;
            writer.write(&batch)?;
            writer.close()?;
            std::fs::File::options()
                .write(true)
                .open(&path)?
                .set_modified(std::time::SystemTime::now() - age)?;
            Ok(path)
        };
        let dead = stray(
            "part-dead-writer.parquet",
            UNREFERENCED_KEPT + std::time::Duration::from_secs(60),
        )?;
        let live = stray("part-live-writer.parquet", ABANDONED_AFTER * 2)?;
        // a backfill running (it commits its day-old files at its end): nothing unmarked goes
        let backfill = announce_long_transaction(&location).await?;
        let removed = remove_unreferenced_rewrites(&location, "t", None, Unreferenced::Abandoned).await?;
        assert_eq!(removed, 0, "a running backfill's files were removed");
        backfill.withdraw().await;
        let removed = remove_unreferenced_rewrites(&location, "t", None, Unreferenced::Abandoned).await?;
        assert_eq!(removed, 1);
        assert!(!dead.exists(), "the dead writer's file stays");
        assert!(
            live.exists(),
            "a live writer's file (unmarked, under a day old) was removed"
        );
        let table = crate::open_table(&location, "t").await?.ok_or("t")?;
        let committed = table.snapshot()?.log_data().into_iter().count();
        assert_eq!(committed, 1);
        for f in table.snapshot()?.log_data() {
            assert!(
                dir.path().join("t").join(f.path().as_ref()).exists(),
                "a committed file was removed"
            );
        }
        Ok(())
    }
}
