//! The local event log: one directory per topic under the log dir, holding
//! segment files named by their first offset. One writer thread per topic
//! takes every append waiting in its bounded queue, writes them, fsyncs once
//! (group commit) and only then acknowledges them.//!
//! [`writer`] owns the append path (group commit, torn-tail recovery),
//! [`reader`] the subscriptions, [`retention`] what may be deleted and when.

mod reader;
mod retention;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::segment::MAX_RECORD_LEN;
use crate::{Error, EventLog, Position, Record, Result, Subscription};
use reader::LocalSubscription;
use writer::{AppendRequest, WriterHandle};

/// Tuning of the local log.
#[derive(Debug, Clone)]
pub struct LocalLogOptions {
    /// Roll to a new segment past this size.
    pub segment_bytes: u64,
    /// Appends queued for the writer before `append` answers [`Error::Busy`].
    pub max_pending_appends: usize,
    /// How long `append` waits for durability before answering [`Error::Busy`].
    pub append_timeout: Duration,
    /// Processed segments older than this are deleted; a segment is closed when its first
    /// record is a quarter of this old, so every record is gone within 1.25 × this (plus
    /// the interval retention is enforced at, [`LocalLogOptions::retention_check_interval`]).
    pub retention: Duration,
    /// Retention of topics that keep their own (the dead-letter topic), by topic name.
    pub topic_retention: Vec<(String, Duration)>,
    /// The oldest processed segments are deleted while a topic is larger than this.
    pub retention_bytes: u64,
}

impl Default for LocalLogOptions {
    fn default() -> Self {
        LocalLogOptions {
            segment_bytes: 64 * 1024 * 1024,
            max_pending_appends: 4096,
            append_timeout: Duration::from_secs(5),
            retention: Duration::from_secs(72 * 3600),
            topic_retention: Vec::new(),
            retention_bytes: 20 * 1024 * 1024 * 1024,
        }
    }
}

impl LocalLogOptions {
    /// The retention of `topic`.
    pub fn retention_of(&self, topic: &str) -> Duration {
        self.topic_retention
            .iter()
            .find(|(t, _)| t == topic)
            .map_or(self.retention, |(_, r)| *r)
    }

    /// The shortest retention of any topic.
    fn shortest_retention(&self) -> Duration {
        self.topic_retention
            .iter()
            .map(|(_, r)| *r)
            .fold(self.retention, Duration::min)
    }

    /// A segment is closed once its first record is this old: a quarter of the shortest
    /// retention (at least 10 ms).
    pub fn roll_age(&self) -> Duration {
        (self.shortest_retention() / 4).max(Duration::from_millis(10))
    }

    /// How often retention should be enforced for its bound to hold: a quarter of the roll
    /// age, at most a minute.
    pub fn retention_check_interval(&self) -> Duration {
        (self.roll_age() / 4).clamp(Duration::from_millis(10), Duration::from_secs(60))
    }

    /// Longest a record of `topic` outlives its retention: the roll age and one check.
    pub fn retention_slack(&self) -> Duration {
        self.roll_age() + self.retention_check_interval()
    }
}

/// The embedded event log: segment files under one directory.
pub struct LocalLog {
    dir: PathBuf,
    options: LocalLogOptions,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
}

struct Topic {
    name: String,
    dir: PathBuf,
    writer: OnceLock<WriterHandle>,
    starting: Mutex<()>,
    /// Held by a test to stop the writer between groups, as a stalled disk would.
    #[cfg(test)]
    paused: Arc<Mutex<()>>,
    options: LocalLogOptions,
}

fn segment_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// Segment base offsets in `dir`, ascending.
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(bases),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(base) = name.strip_suffix(".log").and_then(|b| b.parse::<u64>().ok()) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Creates `dir` and its missing parents readable by this user only (0700).
pub(crate) fn private_dir_all(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

impl LocalLog {
    /// Opens (creating if needed) a log under `dir`.
    pub fn open(dir: impl Into<PathBuf>, options: LocalLogOptions) -> Result<Self> {
        let dir = dir.into();
        private_dir_all(&dir)?;
        // raw events hold IP addresses and cookies: only this user may list or read them
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(LocalLog {
            dir,
            options,
            topics: Mutex::new(HashMap::new()),
        })
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(Error::Closed(format!("invalid topic name `{name}`")));
        }
        let mut topics = self
            .topics
            .lock()
            .map_err(|_| Error::Closed("topic table poisoned".into()))?;
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        let dir = self.dir.join(name);
        private_dir_all(&dir.join("consumers"))?;
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            dir,
            writer: OnceLock::new(),
            starting: Mutex::new(()),
            #[cfg(test)]
            paused: Arc::default(),
            options: self.options.clone(),
        });
        topics.insert(name.to_owned(), topic.clone());
        Ok(topic)
    }

    /// Deletes processed segments past the retention age or size of `topic`; returns how many.
    pub fn enforce_retention(&self, topic: &str, now: SystemTime) -> Result<usize> {
        self.topic(topic)?.enforce_retention(now)
    }

    /// Its tuning (retention, roll age).
    pub fn options(&self) -> &LocalLogOptions {
        &self.options
    }

    /// The next offset that will be assigned in `topic` (its durable end), recovering the tail first.
    pub fn end_offset(&self, topic: &str) -> Result<u64> {
        let topic = self.topic(topic)?;
        Ok(*topic.writer()?.durable.borrow())
    }
}

#[async_trait]
impl EventLog for LocalLog {
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(r) = records
            .iter()
            .find(|r| r.payload.len() > MAX_RECORD_LEN || r.payload.is_empty())
        {
            return Err(Error::TooLarge {
                len: r.payload.len(),
                max: MAX_RECORD_LEN,
            });
        }
        let topic = self.topic(topic)?;
        let writer = topic.writer()?;
        let n = records.len() as u64;
        let (done, wait) = oneshot::channel();
        let req = AppendRequest {
            payloads: records.into_iter().map(|r| r.payload).collect(),
            done,
        };
        let queue = writer
            .queue
            .as_ref()
            .ok_or_else(|| Error::Closed("writer stopped".into()))?;
        queue.try_send(req).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => Error::Busy("append queue full".into()),
            std::sync::mpsc::TrySendError::Disconnected(_) => Error::Closed("writer stopped".into()),
        })?;
        let first = tokio::time::timeout(self.options.append_timeout, wait)
            .await
            .map_err(|_| Error::Busy("durable write took longer than the append timeout".into()))?
            .map_err(|_| Error::Closed("writer stopped".into()))??;
        Ok((first..first + n)
            .map(|offset| Position { partition: 0, offset })
            .collect())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>> {
        if group.is_empty() || group.contains(['/', '\\']) {
            return Err(Error::Closed(format!("invalid consumer group `{group}`")));
        }
        let topic = self.topic(topic)?;
        Ok(Box::new(LocalSubscription {
            topic,
            group: group.to_owned(),
            next_offset: 0,
            cursor: None,
        }))
    }

    fn is_ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;

    use super::*;
    use crate::segment::frame;

    fn opts() -> LocalLogOptions {
        LocalLogOptions {
            segment_bytes: 4096,
            ..LocalLogOptions::default()
        }
    }

    fn recs(range: std::ops::Range<u32>) -> Vec<Record> {
        range
            .map(|i| Record {
                key: None,
                payload: format!("event-{i:05}").into_bytes(),
            })
            .collect()
    }

    async fn read_all(log: &LocalLog, topic: &str, from: u64) -> Result<Vec<Vec<u8>>> {
        let mut sub = log.subscribe(topic, "test").await?;
        sub.seek(0, from).await?;
        let mut out = Vec::new();
        loop {
            let got = sub.poll(1000, Duration::from_millis(50)).await?;
            if got.is_empty() {
                return Ok(out);
            }
            out.extend(got.into_iter().map(|d| d.payload));
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn appends_read_back_across_segments_and_restarts() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        {
            let log = LocalLog::open(dir.path(), opts())?;
            for chunk in 0..10 {
                let pos = log.append("t", recs(chunk * 100..(chunk + 1) * 100)).await?;
                assert_eq!(pos[0].offset, u64::from(chunk) * 100);
            }
            assert!(list_segments(&dir.path().join("t"))?.len() > 3, "rolled segments");
            let all = read_all(&log, "t", 0).await?;
            assert_eq!(all.len(), 1000);
            assert_eq!(all[999], b"event-00999");
            let tail = read_all(&log, "t", 995).await?;
            assert_eq!(tail.len(), 5);
        }
        // a new writer (a restart) continues the offsets
        let log = LocalLog::open(dir.path(), opts())?;
        let pos = log.append("t", recs(1000..1001)).await?;
        assert_eq!(pos[0].offset, 1000);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn segments_and_their_directories_are_private_to_this_user() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let root = dir.path().join("log");
        let log = LocalLog::open(&root, opts())?;
        for chunk in 0..5 {
            log.append("t", recs(chunk * 100..(chunk + 1) * 100)).await?;
        }
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode(&root).map_err(|e| Error::io(&root, e))?, 0o700);
        let topic = root.join("t");
        assert_eq!(mode(&topic).map_err(|e| Error::io(&topic, e))?, 0o700);
        let segments = list_segments(&topic)?;
        assert!(segments.len() > 1, "rolled at least once");
        for base in segments {
            let path = topic.join(segment_name(base));
            assert_eq!(
                mode(&path).map_err(|e| Error::io(&path, e))?,
                0o600,
                "{}",
                path.display()
            );
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_torn_tail_is_dropped_on_restart() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let seg = dir.path().join("t").join(segment_name(0));
        {
            let log = LocalLog::open(dir.path(), LocalLogOptions::default())?;
            log.append("t", recs(0..10)).await?;
        }
        // a crash in the middle of the next group commit: header and half a payload
        let mut partial = Vec::new();
        frame(b"never-acknowledged", &mut partial);
        partial.truncate(13);
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .and_then(|mut f| f.write_all(&partial))
            .map_err(|e| Error::io(&seg, e))?;
        let log = LocalLog::open(dir.path(), LocalLogOptions::default())?;
        assert_eq!(log.end_offset("t")?, 10);
        log.append("t", recs(10..12)).await?;
        let all = read_all(&log, "t", 0).await?;
        assert_eq!(all.len(), 12);
        assert_eq!(all[11], b"event-00011");
        Ok(())
    }

    /// Writes ten records, flips one byte of the fourth (at `within` bytes into it), reopens.
    async fn corrupt_fourth_record(within: usize) -> Result<(tempfile::TempDir, LocalLog)> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let seg = dir.path().join("t").join(segment_name(0));
        {
            let log = LocalLog::open(dir.path(), LocalLogOptions::default())?;
            log.append("t", recs(0..10)).await?;
        }
        let record_len = crate::FRAME_HEADER_LEN + b"event-00000".len();
        let mut bytes = std::fs::read(&seg).map_err(|e| Error::io(&seg, e))?;
        bytes[record_len * 3 + within] ^= 0x40;
        std::fs::write(&seg, &bytes).map_err(|e| Error::io(&seg, e))?;
        let log = LocalLog::open(dir.path(), LocalLogOptions::default())?;
        Ok((dir, log))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bad_checksum_is_reported_not_skipped() -> Result<()> {
        let (_dir, log) = corrupt_fourth_record(crate::FRAME_HEADER_LEN + 2).await?;
        let err = read_all(&log, "t", 0).await.expect_err("corrupt");
        assert!(matches!(err, Error::Corrupt { byte_offset: 57, .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        let err = log
            .append("t", recs(10..11))
            .await
            .expect_err("writer refuses a corrupt tail");
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bad_length_is_corruption_not_a_torn_tail() -> Result<()> {
        let (_dir, log) = corrupt_fourth_record(1).await?;
        let err = log
            .append("t", recs(10..11))
            .await
            .expect_err("acknowledged records follow");
        assert!(matches!(err, Error::Corrupt { byte_offset: 57, .. }), "{err}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retention_deletes_only_processed_segments() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let options = LocalLogOptions {
            segment_bytes: 4096,
            retention: Duration::ZERO,
            ..LocalLogOptions::default()
        };
        let log = LocalLog::open(dir.path(), options)?;
        for chunk in 0..10 {
            log.append("t", recs(chunk * 100..(chunk + 1) * 100)).await?;
        }
        let mut sub = log.subscribe("t", "proc").await?;
        sub.commit(0, 500).await?;
        let later = SystemTime::now() + Duration::from_secs(1);
        let deleted = log.enforce_retention("t", later)?;
        assert!(deleted > 0);
        let oldest = list_segments(&dir.path().join("t"))?[0];
        assert!(
            oldest <= 500,
            "kept unprocessed data: oldest segment starts at {oldest}"
        );
        let err = read_all(&log, "t", 0).await.expect_err("retained away");
        assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
        assert_eq!(read_all(&log, "t", 500).await?.len(), 500);
        assert_eq!(sub.retained_from(0).await?, oldest, "where the retained history starts");
        assert_eq!(read_all(&log, "t", oldest).await?.len() as u64, 1000 - oldest);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_quiet_site_loses_its_records_to_retention_too() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let options = LocalLogOptions {
            retention: Duration::from_millis(800),
            ..LocalLogOptions::default()
        };
        let log = LocalLog::open(dir.path(), options.clone())?;
        assert_eq!(options.roll_age(), Duration::from_millis(200));
        log.append("t", recs(0..5)).await?;
        let mut sub = log.subscribe("t", "proc").await?;
        sub.commit(0, 5).await?;
        // nothing more is ever appended: the writer closes the segment on its own
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            list_segments(&dir.path().join("t"))?,
            vec![0, 5],
            "the segment was closed at the roll age"
        );
        // no deletion before retention
        assert_eq!(log.enforce_retention("t", SystemTime::now())?, 0);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(log.enforce_retention("t", SystemTime::now())?, 1);
        let err = read_all(&log, "t", 0).await.expect_err("nothing retained");
        assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
        // what a restart finds in the active segment is closed at once (its age is unknown)
        log.append("t", recs(5..6)).await?;
        drop(sub);
        drop(log);
        let log = LocalLog::open(dir.path(), options)?;
        log.append("t", recs(6..7)).await?;
        assert_eq!(list_segments(&dir.path().join("t"))?, vec![5, 6]);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dead_letters_keep_their_own_retention() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let options = LocalLogOptions {
            retention: Duration::from_secs(3600),
            topic_retention: vec![("dead".into(), Duration::from_millis(400))],
            ..LocalLogOptions::default()
        };
        let log = LocalLog::open(dir.path(), options)?;
        log.append("raw", recs(0..3)).await?;
        log.append("dead", recs(0..3)).await?;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(log.enforce_retention("dead", SystemTime::now())?, 1);
        assert_eq!(log.enforce_retention("raw", SystemTime::now())?, 0);
        assert_eq!(read_all(&log, "raw", 0).await?.len(), 3);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    // the guard stops the writer thread (as a stalled disk would), not a task of this runtime
    #[allow(clippy::await_holding_lock)]
    async fn a_full_queue_answers_busy() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let options = LocalLogOptions {
            max_pending_appends: 1,
            append_timeout: Duration::from_secs(30),
            ..LocalLogOptions::default()
        };
        let log = Arc::new(LocalLog::open(dir.path(), options)?);
        log.append("t", recs(0..1)).await?;
        // a stalled disk: the writer takes one group and waits; one more append fits the queue
        let topic = log.topic("t")?;
        let paused = topic.paused.lock().map_err(|_| Error::Closed("poisoned".into()))?;
        let mut tasks = Vec::new();
        for i in 1..33 {
            let log = log.clone();
            tasks.push(tokio::spawn(
                async move { log.append("t", recs(i * 10..i * 10 + 10)).await },
            ));
        }
        // every append has either queued or been refused before the disk recovers
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(paused);
        let (mut busy, mut ok) = (0, 0);
        for t in tasks {
            match t.await.map_err(|e| Error::Closed(e.to_string()))? {
                Ok(_) => ok += 1,
                Err(Error::Busy(reason)) => {
                    assert!(reason.contains("queue full"), "{reason}");
                    busy += 1
                }
                Err(e) => return Err(e),
            }
        }
        assert!(
            ok <= 2,
            "one group in the writer and one in the queue: {ok} acknowledged"
        );
        assert_eq!(busy, 32 - ok, "the rest were refused at once");
        assert_eq!(
            read_all(&log, "t", 0).await?.len(),
            1 + ok * 10,
            "busy appends wrote nothing"
        );
        Ok(())
    }
}
