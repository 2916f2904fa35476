//! Marsad's Delta tables as storage: how a table at the configured location
//! (a directory or `s3://…`) is opened, how it is made known to a DataFusion
//! session, and how one commit of its log is read back as typed actions.
//!
//! Every stage, batch job and admin tool opens tables through [`open_table`]
//! (or [`table_handle`] to create one), so a location and its object-store
//! settings mean the same thing everywhere. This crate must not decide what a
//! table holds or who may read it: schemas live in `schemas`, writers in
//! `process`, access rules in `query`.

#![deny(missing_docs)]

pub mod commits;
mod latest_commit;
mod local_log;
pub mod rewrites;
mod s3;

use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use marsad_config::TablesLocation;

pub use commits::{Commit, read_commit};
pub use latest_commit::{CLEANUP_FLOOR, FRESH_COMMIT, holds_latest_version};
pub use rewrites::{
    ErasureNotice, LongTransactionNotice, REWRITE_ROW_GROUP_ROWS, RewriteRun, SKETCH_COLUMN, Unreferenced,
    announce_erasure, announce_long_transaction, erasure_in_progress, is_vanished_file, long_transaction_in_progress,
    remove_replaced_files, remove_unreferenced_rewrites, sketch_column_settings,
};

/// Why a table could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Delta (or the object store under it) failed.
    #[error("delta table {table}: {source}")]
    Delta {
        /// Which table.
        table: String,
        /// What failed.
        source: Box<DeltaTableError>,
    },
    /// A local table directory could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: std::path::PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

impl Error {
    /// The Delta error underneath, for callers that tell conflicts from failures.
    pub fn delta(&self) -> Option<&DeltaTableError> {
        match self {
            Error::Delta { source, .. } => Some(source.as_ref()),
            Error::Io { .. } => None,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn delta(table: &str) -> impl Fn(DeltaTableError) -> Error + '_ {
    move |source| Error::Delta {
        table: table.to_owned(),
        source: Box::new(source),
    }
}

/// A handle on table `name` at `location`, not loaded (a local directory is created if missing):
/// what a writer creates the table through.
pub fn table_handle(location: &TablesLocation, name: &str) -> Result<DeltaTable> {
    if let Some(dir) = location.local_dir() {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir, source })?;
    }
    build(location, name).map_err(delta(name))
}

/// How every table at `location` is opened: on local disk through [`local_log::LocalTables`]
/// (the log's listing from an offset reads names, not every entry), in S3 through
/// object_store's S3 client ([`s3`]), with the location's settings.
fn builder(location: &TablesLocation, name: &str) -> Result<DeltaTableBuilder, DeltaTableError> {
    register_stores(location);
    let url = location.table_url(name);
    let builder = DeltaTableBuilder::from_url(url.clone())?;
    let builder = match location.local_dir() {
        Some(_) => builder.with_storage_backend(std::sync::Arc::new(local_log::LocalTables::new()), url),
        None => builder,
    };
    Ok(builder.with_storage_options(location.storage_options()))
}

/// A handle on table `name` at `location`, not loaded: on a file system of this host its
/// writers find the latest version by the names of the commits after the one they read
/// ([`latest_commit::LatestByName`]), elsewhere (object storage, NFS) as delta-rs does.
fn build(location: &TablesLocation, name: &str) -> Result<DeltaTable, DeltaTableError> {
    let builder = builder(location, name)?;
    match location.local_dir() {
        // the table's own directory (it may be a link or a mount of its own); a table not
        // created yet is opened as delta-rs does
        Some(dir) if latest_commit::on_local_file_system(&dir.join(name)) => Ok(DeltaTable::new(std::sync::Arc::new(
            latest_commit::LatestByName::new(builder.build_storage()?),
        ))),
        _ => builder.build(),
    }
}

/// Makes Marsad's S3 client the one delta-rs opens a bucket with, once, when `location` is
/// not local (a local one never needs it, nor its warnings about the AWS environment).
fn register_stores(location: &TablesLocation) {
    if location.local_dir().is_none() {
        s3::register();
    }
}

/// The object store of the whole `location` (every table under it), for tools that read its
/// files themselves (`marsad audit`).
pub fn location_store(location: &TablesLocation) -> Result<deltalake::logstore::ObjectStoreRef> {
    register_stores(location);
    let name = location.to_string();
    deltalake::logstore::store_for(location.url(), location.storage_options()).map_err(delta(&name))
}

/// Table `name` at `location` at its latest version, or `None` while it has no commit.
pub async fn open_table(location: &TablesLocation, name: &str) -> Result<Option<DeltaTable>> {
    // probe a local directory first: loading an empty location makes the kernel log an error
    let local_log = location.local_dir().map(|dir| dir.join(name).join("_delta_log"));
    if let Some(log) = &local_log
        && !log.is_dir()
    {
        return Ok(None);
    }
    let mut table = build(location, name).map_err(delta(name))?;
    // (on object storage: one listing request. Locally that check lists and stats the log, a
    // cost that grows with the table's age: skipped when the first commit or a checkpoint's
    // hint shows a table; a log without either, cleaned up by another engine, is still checked)
    let known = local_log.as_deref().is_some_and(has_commit_or_checkpoint);
    if !known && !table.verify_deltatable_existence().await.map_err(delta(name))? {
        return Ok(None);
    }
    table.load().await.map_err(delta(name))?;
    Ok(Some(table))
}

/// Whether a local `_delta_log` directory holds a commit or a checkpoint, read without listing
/// it (the log can hold many thousand entries): the last checkpoint's hint, or the first
/// commit (a log cleaned up past version 0 has a checkpoint).
fn has_commit_or_checkpoint(log: &std::path::Path) -> bool {
    log.join("_last_checkpoint").is_file() || log.join(format!("{:020}.json", 0)).is_file()
}

/// The DataFusion session a rewrite of a table's files (a compaction, an erasure's delete)
/// reads and writes with: text stays `Utf8`. DataFusion reads Parquet text as `Utf8View` by
/// default, and delta-rs writes the rewritten files with the schema it read, so files of one
/// table disagreed on their columns' types (`Utf8` as the processor writes them, `Utf8View`
/// after a compaction): engines reading the files themselves (DataFusion's own Parquet
/// listing, among the peers `benches/engines.py` runs) then refuse to merge their schemas.
pub fn rewrite_session() -> std::sync::Arc<dyn datafusion::catalog::Session> {
    use deltalake::delta_datafusion::{DeltaSessionConfig, planner::DeltaPlanner};
    // delta-rs's own session (its planner runs the custom nodes of a delete), text as Utf8
    let config: datafusion::prelude::SessionConfig = DeltaSessionConfig::default().into();
    let config = config.set_bool("datafusion.execution.parquet.schema_force_view_types", false);
    let state = datafusion::execution::SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_query_planner(DeltaPlanner::new())
        .build();
    std::sync::Arc::new(state)
}

/// Registers `table` in `ctx` as `name`, its object store (`s3://…`) made known to the session first.
pub async fn register(ctx: &datafusion::prelude::SessionContext, name: &str, table: &DeltaTable) -> Result<()> {
    table.update_datafusion_session(&ctx.state()).map_err(delta(name))?;
    let provider = table
        .table_provider()
        .await
        .map_err(|e| delta(name)(DeltaTableError::Generic(e.to_string())))?;
    ctx.deregister_table(name)
        .and_then(|_| ctx.register_table(name, provider))
        .map_err(|e| delta(name)(DeltaTableError::Generic(e.to_string())))?;
    Ok(())
}
