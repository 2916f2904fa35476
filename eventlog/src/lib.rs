//! Marsad's event log: the durable buffer between ingest and the processor.
//!
//! [`EventLog`] appends batches and resolves only once they are durable;
//! [`Subscription`] reads from a position and records how far a consumer got.
//! [`LocalLog`] is the embedded implementation (segment files with length +
//! CRC32C framing, group commit with fsync, torn-tail recovery, retention);
//! [`KafkaLog`] runs the same contract on a Kafka cluster.
//!
//! This crate moves opaque bytes. It must not decode events or know about
//! privacy: what a record means is the business of `schemas` and the stages.

#![deny(missing_docs)]

mod kafka;
mod local;
mod segment;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

pub use kafka::{KafkaLog, KafkaLogOptions, TopicSpec};
pub use local::{LocalLog, LocalLogOptions};
pub use segment::{FRAME_HEADER_LEN, Scan, ScanOutcome, frame, scan_bytes, scan_segment};

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log cannot take more right now (queue full or durable write too slow); retry later.
    #[error("event log busy: {0}")]
    Busy(String),
    /// The log has stopped (shutdown or a failed writer).
    #[error("event log closed: {0}")]
    Closed(String),
    /// A file could not be read or written.
    #[error("event log I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A record's checksum or length is wrong where no torn write can explain it.
    #[error("event log corrupt: {path} at byte {byte_offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where the bad record starts.
        byte_offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A record larger than the framing allows.
    #[error("record of {len} bytes is larger than the {max} a log record may hold")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The requested offset is no longer retained or does not exist yet.
    #[error("offset {offset} of partition {partition} is out of range ({reason})")]
    OutOfRange {
        /// The partition.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// Why.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partitioning key (the cookie id's hash on Kafka, so a visitor stays on one partition).
    pub key: Option<Vec<u8>>,
    /// The encoded envelope.
    pub payload: Vec<u8>,
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The partition (always 0 on the local log).
    pub partition: u32,
    /// The offset within the partition.
    pub offset: u64,
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Where it is.
    pub position: Position,
    /// The payload as appended.
    pub payload: Vec<u8>,
}

/// A durable, ordered, partitioned log of opaque records.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Appends `records` to `topic`; resolves only once all are durable.
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>>;

    /// Starts reading `topic` as consumer `group`; the caller seeks each assigned partition.
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>>;

    /// Reads every partition of `topic` from its start, outside any consumer group: how a
    /// service loads a whole table-like topic (opt-outs) or a job replays the log.
    async fn read_all(&self, topic: &str) -> Result<Box<dyn Subscription>> {
        self.subscribe(topic, "marsad-reader").await
    }

    /// Whether appends can be expected to succeed now (for `/readyz`).
    fn is_ready(&self) -> bool;
}

/// One consumer's view of a topic.
#[async_trait]
pub trait Subscription: Send {
    /// The partitions this consumer currently owns.
    fn assignment(&self) -> Vec<u32>;

    /// Counts the changes of [`assignment`](Subscription::assignment): a consumer that sees it
    /// move must stop using what it buffered and re-read its positions.
    fn assignment_generation(&self) -> u64 {
        0
    }

    /// Moves the read position of `partition` to `offset` (the next record to read).
    async fn seek(&mut self, partition: u32, offset: u64) -> Result<()>;

    /// Returns up to `max` durable records, waiting at most `timeout` for the first.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>>;

    /// Records that everything before `next_offset` of `partition` is processed (allows retention).
    async fn commit(&mut self, partition: u32, next_offset: u64) -> Result<()>;

    /// The oldest offset of `partition` still retained: records before it were deleted by
    /// retention, so a job replaying the log knows where its history starts.
    async fn retained_from(&mut self, partition: u32) -> Result<u64>;

    /// Where `partition` ends now, if the log can say without reading it (`None`: a read that
    /// returns nothing means the end).
    async fn end_offset(&mut self, _partition: u32) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// What [`follow`] hands to its callback.
#[derive(Debug)]
pub enum Followed<'a> {
    /// The next record.
    Record(&'a Delivered),
    /// Everything written so far has been handed over (sent once per [`follow`]).
    CaughtUp,
}

/// Reads every partition of `topic` from its start and keeps following it until `stop`
/// resolves, handing each record to `apply`: how every service keeps a table (such as
/// the opt-out registry) in step with a log.
pub async fn follow(
    log: &dyn EventLog,
    topic: &str,
    mut apply: impl FnMut(Followed<'_>) + Send,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let mut sub = log.read_all(topic).await?;
    // where each partition ended when we started: caught up once read that far
    let mut ends = std::collections::BTreeMap::new();
    for p in sub.assignment() {
        sub.seek(p, 0).await?;
        if let Some(end) = sub.end_offset(p).await?
            && end > sub.retained_from(p).await?
        {
            ends.insert(p, end);
        }
    }
    let mut caught_up = false;
    tokio::pin!(stop);
    loop {
        let polled = tokio::select! {
            _ = &mut stop => return Ok(()),
            r = sub.poll(1000, Duration::from_millis(200)) => r?,
        };
        for rec in &polled {
            if ends
                .get(&rec.position.partition)
                .is_some_and(|e| rec.position.offset + 1 >= *e)
            {
                ends.remove(&rec.position.partition);
            }
            apply(Followed::Record(rec));
        }
        if polled.is_empty() && !caught_up && ends.is_empty() {
            caught_up = true;
            apply(Followed::CaughtUp);
        }
    }
}
