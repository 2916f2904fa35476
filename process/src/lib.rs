//! Marsad's stream processor: reads the raw event log, anonymizes each event
//! (GeoIP on the full address, then the address is gone; keyed pseudonyms
//! instead of cookie and user ids; scrubbed page paths), and writes Arrow
//! batches into the Delta table `events`, exactly once: each commit records
//! the log position it covers in the same Delta transaction, and a restart
//! resumes from there. After the `events` commits (at most every
//! `process.rollup_commit_interval_ms`) it appends the partial aggregates of
//! the same events to the rollup tables, recording the same log positions,
//! and catches a lagging rollup up from `events` after a crash or a handover.
//!
//! It must not keep an IP address, cookie id or user id in anything it
//! writes, and never drops an event silently: what it cannot handle goes to
//! the dead-letter topic with the reason.

#![deny(missing_docs)]

pub mod anonymize;
pub mod backfill;
pub mod category;
pub mod channel;
pub mod dead_letters;
pub mod dedup;
pub mod events_batch;
pub mod maintenance;
pub mod metrics;
pub mod offsets;
pub mod rollup;
pub mod segment_push;
pub mod segments;
pub mod sessions;
pub mod table;

mod pipeline;

pub use metrics::ProcessMetrics;
pub use pipeline::{Processor, run};

/// Why the processor stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The event log failed.
    #[error("event log: {0}")]
    Log(#[from] marsad_eventlog::Error),
    /// A Delta table could not be opened, read or committed.
    #[error("delta table {table}: {source}")]
    Delta {
        /// Which table.
        table: &'static str,
        /// What failed.
        source: deltalake::DeltaTableError,
    },
    /// A table could not be opened or its log read.
    #[error(transparent)]
    Table(#[from] marsad_tables::Error),
    /// A query over a table failed.
    #[error("query over {table}: {source}")]
    Query {
        /// Which table.
        table: &'static str,
        /// What failed.
        source: datafusion::error::DataFusionError,
    },
    /// Building an Arrow batch failed.
    #[error("arrow batch: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A privacy mechanism (keys, GeoIP) failed.
    #[error("privacy: {0}")]
    Privacy(#[from] marsad_privacy::Error),
    /// Asked to stop while waiting for a resource (the daily key store).
    #[error("stopped while waiting")]
    Interrupted,
    /// A backfill was asked for something it must not or cannot do.
    #[error("backfill refused: {0}")]
    BackfillRefused(String),
    /// A crash simulated by a test between two commits.
    #[error("simulated crash between commits")]
    SimulatedCrash,
    /// Segment changes could not be pushed (a channel, its state file).
    #[error("segment push, {what}: {reason}")]
    Push {
        /// What failed.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The tables' location in the configuration is unusable.
    #[error("{0}")]
    Location(#[from] marsad_config::ConfigError),
    /// A directory could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether a data file of the table version read was gone from storage: replaced by a
    /// later commit (a compaction, an erasure) and vacuumed. Reading a newer version helps.
    pub fn is_vanished_file(&self) -> bool {
        marsad_tables::is_vanished_file(self)
    }

    /// Whether a commit failed because another writer committed positions of the same
    /// partition first: the partition moved (a rebalance, or this processor was presumed dead),
    /// so what this processor buffered must be dropped and the positions read again.
    ///
    /// A commit over a version whose later commits left the log (the cleanup removes entries
    /// over an hour old, and this processor's partitions were quiet longer while others
    /// committed) fails the same way and is handled the same way: the positions are read again
    /// from a fresh snapshot, and nothing is committed twice.
    pub fn is_lost_ownership(&self) -> bool {
        use deltalake::kernel::transaction::TransactionError;
        matches!(
            self,
            Error::Delta {
                source: deltalake::DeltaTableError::Transaction {
                    source: TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_)
                } | deltalake::DeltaTableError::InvalidVersion(_),
                ..
            }
        )
    }
}
