//! The local event log: one directory per topic under the log dir, holding
//! segment files named by their first offset. One writer thread per topic
//! takes every append waiting in its bounded queue, writes them, fsyncs once
//! (group commit) and only then acknowledges them.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};

use crate::segment::{MAX_RECORD_LEN, ScanOutcome, frame, parse_frame, scan_segment};
use crate::{Delivered, Error, EventLog, Position, Record, Result, Subscription};

/// Tuning of the local log.
#[derive(Debug, Clone)]
pub struct LocalLogOptions {
    /// Roll to a new segment past this size.
    pub segment_bytes: u64,
    /// Appends queued for the writer before `append` answers [`Error::Busy`].
    pub max_pending_appends: usize,
    /// How long `append` waits for durability before answering [`Error::Busy`].
    pub append_timeout: Duration,
    /// Processed segments older than this are deleted.
    pub retention: Duration,
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
            retention_bytes: 20 * 1024 * 1024 * 1024,
        }
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
    options: LocalLogOptions,
}

struct WriterHandle {
    queue: Option<mpsc::Sender<AppendRequest>>,
    durable: watch::Receiver<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    /// Closes the queue and waits for the writer, so its lock is free when this returns.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct AppendRequest {
    payloads: Vec<Vec<u8>>,
    done: oneshot::Sender<Result<u64>>,
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

impl LocalLog {
    /// Opens (creating if needed) a log under `dir`.
    pub fn open(dir: impl Into<PathBuf>, options: LocalLogOptions) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
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
        std::fs::create_dir_all(dir.join("consumers")).map_err(|e| Error::io(&dir, e))?;
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            dir,
            writer: OnceLock::new(),
            starting: Mutex::new(()),
            options: self.options.clone(),
        });
        topics.insert(name.to_owned(), topic.clone());
        Ok(topic)
    }

    /// Deletes processed segments past the retention age or size of `topic`; returns how many.
    pub fn enforce_retention(&self, topic: &str, now: SystemTime) -> Result<usize> {
        self.topic(topic)?.enforce_retention(now)
    }

    /// The next offset that will be assigned in `topic` (its durable end), recovering the tail first.
    pub fn end_offset(&self, topic: &str) -> Result<u64> {
        let topic = self.topic(topic)?;
        Ok(*topic.writer()?.durable.borrow())
    }
}

impl Topic {
    /// Starts the writer on first use: recovers the tail of the last segment, takes the lock.
    fn writer(&self) -> Result<&WriterHandle> {
        if let Some(w) = self.writer.get() {
            return Ok(w);
        }
        let _starting = self
            .starting
            .lock()
            .map_err(|_| Error::Closed("writer start poisoned".into()))?;
        if let Some(w) = self.writer.get() {
            return Ok(w);
        }
        let lock_path = self.dir.join("writer.lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        lock.try_lock().map_err(|e| {
            Error::Closed(format!(
                "another process is writing topic `{}` ({}): {e}",
                self.name,
                lock_path.display()
            ))
        })?;
        let segment = ActiveSegment::recover(&self.dir)?;
        let (durable_tx, durable_rx) = watch::channel(segment.next_offset);
        let (tx, rx) = mpsc::channel(self.options.max_pending_appends);
        let segment_bytes = self.options.segment_bytes;
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("log-writer-{name}"))
            .spawn(move || writer_loop(segment, rx, durable_tx, segment_bytes, lock))
            .map_err(|e| Error::io(&self.dir, e))?;
        let _ = self.writer.set(WriterHandle {
            queue: Some(tx),
            durable: durable_rx,
            thread: Some(thread),
        });
        self.writer.get().ok_or_else(|| Error::Closed("writer vanished".into()))
    }

    fn durable_end(&self) -> Option<watch::Receiver<u64>> {
        self.writer.get().map(|w| w.durable.clone())
    }

    fn consumer_path(&self, group: &str) -> PathBuf {
        self.dir.join("consumers").join(format!("{group}.offset"))
    }

    fn committed_offsets(&self) -> Result<Vec<u64>> {
        let dir = self.dir.join("consumers");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            if entry.path().extension().is_some_and(|x| x == "offset") {
                let text = std::fs::read_to_string(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                if let Ok(o) = text.trim().parse::<u64>() {
                    out.push(o);
                }
            }
        }
        Ok(out)
    }

    fn enforce_retention(&self, now: SystemTime) -> Result<usize> {
        let bases = list_segments(&self.dir)?;
        if bases.len() < 2 {
            return Ok(0);
        }
        // nothing a consumer has not processed is ever deleted: that would be loss, not retention
        let committed = self.committed_offsets()?;
        let safe_end = if committed.is_empty() {
            u64::MAX
        } else {
            committed.iter().copied().min().unwrap_or(0)
        };
        let mut sizes = Vec::with_capacity(bases.len());
        for base in &bases {
            let path = self.dir.join(segment_name(*base));
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            sizes.push((meta.len(), meta.modified().unwrap_or(now)));
        }
        let mut total: u64 = sizes.iter().map(|(len, _)| len).sum();
        let mut deleted = 0;
        for i in 0..bases.len() - 1 {
            let end = bases[i + 1];
            let (len, modified) = sizes[i];
            let too_old = now.duration_since(modified).unwrap_or_default() > self.options.retention;
            let too_big = total > self.options.retention_bytes;
            if end > safe_end || !(too_old || too_big) {
                break;
            }
            let path = self.dir.join(segment_name(bases[i]));
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            total -= len;
            deleted += 1;
        }
        if deleted > 0 {
            tracing::info!(topic = %self.name, segments = deleted, "deleted processed log segments past retention");
        }
        Ok(deleted)
    }
}

/// The segment the writer appends to.
struct ActiveSegment {
    dir: PathBuf,
    base: u64,
    file: File,
    path: PathBuf,
    len: u64,
    next_offset: u64,
}

impl ActiveSegment {
    /// Opens the last segment, truncating a torn tail; refuses a corrupt one.
    fn recover(dir: &Path) -> Result<Self> {
        let bases = list_segments(dir)?;
        let base = bases.last().copied().unwrap_or(0);
        let path = dir.join(segment_name(base));
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let scan = scan_segment(&path, |_| {})?;
        match scan.outcome {
            ScanOutcome::Clean => {}
            ScanOutcome::TornTail { valid_len } => {
                let total = file.metadata().map_err(|e| Error::io(&path, e))?.len();
                tracing::warn!(
                    segment = %path.display(),
                    kept_bytes = valid_len,
                    dropped_bytes = total - valid_len,
                    "recovered a torn tail: dropping an unacknowledged partial write"
                );
                file.set_len(valid_len).map_err(|e| Error::io(&path, e))?;
                file.sync_all().map_err(|e| Error::io(&path, e))?;
            }
            ScanOutcome::Corrupt { byte_offset, reason } => {
                return Err(Error::Corrupt {
                    path,
                    byte_offset,
                    reason,
                });
            }
        }
        if bases.is_empty() {
            sync_dir(dir)?;
        }
        let mut seg = ActiveSegment {
            dir: dir.to_owned(),
            base,
            file,
            path,
            len: scan.valid_len,
            next_offset: base + scan.records,
        };
        seg.file
            .seek(SeekFrom::Start(seg.len))
            .map_err(|e| Error::io(&seg.path, e))?;
        Ok(seg)
    }

    fn roll(&mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        let path = self.dir.join(segment_name(self.next_offset));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.dir)?;
        self.base = self.next_offset;
        self.file = file;
        self.path = path;
        self.len = 0;
        Ok(())
    }

    /// Writes `buf` holding `count` framed records and makes them durable.
    fn write_durably(&mut self, buf: &[u8], count: u64, segment_bytes: u64) -> Result<u64> {
        if self.len > 0 && self.len + buf.len() as u64 > segment_bytes {
            self.roll()?;
        }
        let first = self.next_offset;
        let written = self.file.write_all(buf).and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            // leave no half-written group behind for the next append to build on
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(Error::io(&self.path, e));
        }
        self.len += buf.len() as u64;
        self.next_offset += count;
        Ok(first)
    }
}

fn writer_loop(
    mut segment: ActiveSegment,
    mut queue: mpsc::Receiver<AppendRequest>,
    durable: watch::Sender<u64>,
    segment_bytes: u64,
    _lock: File,
) {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut group = Vec::with_capacity(256);
    while let Some(first) = queue.blocking_recv() {
        group.push(first);
        while group.len() < 4096 && buf.len() < (8 << 20) {
            match queue.try_recv() {
                Ok(req) => group.push(req),
                Err(_) => break,
            }
        }
        buf.clear();
        let mut count = 0u64;
        for req in &group {
            for p in &req.payloads {
                frame(p, &mut buf);
                count += 1;
            }
        }
        match segment.write_durably(&buf, count, segment_bytes) {
            Ok(first_offset) => {
                let _ = durable.send(segment.next_offset);
                let mut offset = first_offset;
                for req in group.drain(..) {
                    let n = req.payloads.len() as u64;
                    let _ = req.done.send(Ok(offset));
                    offset += n;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event log write failed; appends are refused until it succeeds");
                for req in group.drain(..) {
                    let _ = req.done.send(Err(Error::Busy(format!("durable write failed: {e}"))));
                }
            }
        }
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
            mpsc::error::TrySendError::Full(_) => Error::Busy("append queue full".into()),
            mpsc::error::TrySendError::Closed(_) => Error::Closed("writer stopped".into()),
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

struct Cursor {
    base: u64,
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    consumed: usize,
    file_pos: u64,
}

impl Cursor {
    /// Reads more bytes of the segment; returns how many arrived.
    fn fill(&mut self) -> Result<usize> {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + (1 << 20), 0);
        let n = self
            .file
            .read(&mut self.buf[old..])
            .map_err(|e| Error::io(&self.path, e));
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(old);
                return Err(e);
            }
        };
        self.buf.truncate(old + n);
        self.file_pos += n as u64;
        Ok(n)
    }
}

struct LocalSubscription {
    topic: Arc<Topic>,
    group: String,
    next_offset: u64,
    cursor: Option<Cursor>,
}

impl LocalSubscription {
    fn open_cursor(&mut self) -> Result<()> {
        let bases = list_segments(&self.topic.dir)?;
        let Some(&base) = bases.iter().rev().find(|b| **b <= self.next_offset) else {
            if bases.is_empty() {
                return Err(Error::OutOfRange {
                    partition: 0,
                    offset: self.next_offset,
                    reason: "no segments yet".into(),
                });
            }
            return Err(Error::OutOfRange {
                partition: 0,
                offset: self.next_offset,
                reason: format!("deleted by retention; oldest retained offset is {}", bases[0]),
            });
        };
        let path = self.topic.dir.join(segment_name(base));
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut cursor = Cursor {
            base,
            path,
            file,
            buf: Vec::new(),
            consumed: 0,
            file_pos: 0,
        };
        // skip to the wanted record
        let mut offset = base;
        while offset < self.next_offset {
            match parse_frame(&cursor.buf[cursor.consumed..]) {
                Ok(Some((_, used))) => {
                    cursor.consumed += used;
                    offset += 1;
                }
                Ok(None) => {
                    if cursor.fill()? == 0 {
                        return Err(Error::OutOfRange {
                            partition: 0,
                            offset: self.next_offset,
                            reason: format!("the log ends at offset {offset}"),
                        });
                    }
                }
                Err(reason) => {
                    return Err(Error::Corrupt {
                        path: cursor.path,
                        byte_offset: cursor.file_pos - (cursor.buf.len() - cursor.consumed) as u64,
                        reason,
                    });
                }
            }
        }
        self.cursor = Some(cursor);
        Ok(())
    }

    fn read_available(&mut self, max: usize, durable_end: u64) -> Result<Vec<Delivered>> {
        let mut out = Vec::new();
        while out.len() < max && self.next_offset < durable_end {
            if self.cursor.is_none() {
                match self.open_cursor() {
                    Ok(()) => {}
                    Err(Error::OutOfRange { reason, .. }) if reason == "no segments yet" => break,
                    Err(e) => return Err(e),
                }
            }
            let Some(cursor) = self.cursor.as_mut() else { break };
            match parse_frame(&cursor.buf[cursor.consumed..]) {
                Ok(Some((payload, used))) => {
                    out.push(Delivered {
                        position: Position {
                            partition: 0,
                            offset: self.next_offset,
                        },
                        payload: payload.to_vec(),
                    });
                    cursor.consumed += used;
                    self.next_offset += 1;
                }
                Ok(None) => {
                    if cursor.fill()? > 0 {
                        continue;
                    }
                    if durable_end != u64::MAX {
                        // the writer says more is durable, yet the file cannot frame it
                        let later = list_segments(&self.topic.dir)?.into_iter().any(|b| b > cursor.base);
                        if !later && cursor.buf.len() > cursor.consumed {
                            return Err(Error::Corrupt {
                                path: cursor.path.clone(),
                                byte_offset: cursor.file_pos - (cursor.buf.len() - cursor.consumed) as u64,
                                reason: format!(
                                    "record {} is unreadable though durable (bad length)",
                                    self.next_offset
                                ),
                            });
                        }
                    }
                    // end of this segment for now; it is sealed once a later one exists
                    let later = list_segments(&self.topic.dir)?.into_iter().find(|b| *b > cursor.base);
                    let Some(next_base) = later else { break };
                    if cursor.fill()? > 0 {
                        continue;
                    }
                    if cursor.buf.len() > cursor.consumed || next_base != self.next_offset {
                        return Err(Error::Corrupt {
                            path: cursor.path.clone(),
                            byte_offset: cursor.file_pos - (cursor.buf.len() - cursor.consumed) as u64,
                            reason: format!(
                                "sealed segment ends at offset {} but the next segment starts at {next_base}",
                                self.next_offset
                            ),
                        });
                    }
                    self.cursor = None;
                }
                Err(reason) => {
                    return Err(Error::Corrupt {
                        path: cursor.path.clone(),
                        byte_offset: cursor.file_pos - (cursor.buf.len() - cursor.consumed) as u64,
                        reason,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Subscription for LocalSubscription {
    fn assignment(&self) -> Vec<u32> {
        vec![0]
    }

    async fn seek(&mut self, partition: u32, offset: u64) -> Result<()> {
        if partition != 0 {
            return Err(Error::OutOfRange {
                partition,
                offset,
                reason: "the local log has one partition".into(),
            });
        }
        self.next_offset = offset;
        self.cursor = None;
        Ok(())
    }

    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let durable = self.topic.durable_end();
            let end = durable.as_ref().map_or(u64::MAX, |d| *d.borrow());
            let out = tokio::task::block_in_place(|| self.read_available(max, end))?;
            if !out.is_empty() {
                return Ok(out);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(out);
            }
            match durable {
                Some(mut d) => {
                    if *d.borrow_and_update() <= self.next_offset {
                        let _ = tokio::time::timeout_at(deadline, d.changed()).await;
                    }
                }
                // another process writes: look again shortly
                None => tokio::time::sleep((deadline - now).min(Duration::from_millis(20))).await,
            }
        }
    }

    async fn retained_from(&mut self, partition: u32) -> Result<u64> {
        if partition != 0 {
            return Err(Error::OutOfRange {
                partition,
                offset: 0,
                reason: "the local log has one partition".into(),
            });
        }
        Ok(list_segments(&self.topic.dir)?.first().copied().unwrap_or(0))
    }

    async fn commit(&mut self, partition: u32, next_offset: u64) -> Result<()> {
        if partition != 0 {
            return Ok(());
        }
        let path = self.topic.consumer_path(&self.group);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, next_offset.to_string())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    async fn a_full_queue_answers_busy() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let options = LocalLogOptions {
            max_pending_appends: 1,
            ..LocalLogOptions::default()
        };
        let log = Arc::new(LocalLog::open(dir.path(), options)?);
        let mut tasks = Vec::new();
        for i in 0..64 {
            let log = log.clone();
            tasks.push(tokio::spawn(
                async move { log.append("t", recs(i * 10..i * 10 + 10)).await },
            ));
        }
        let mut busy = 0;
        let mut ok = 0;
        for t in tasks {
            match t.await.map_err(|e| Error::Closed(e.to_string()))? {
                Ok(_) => ok += 1,
                Err(Error::Busy(_)) => busy += 1,
                Err(e) => return Err(e),
            }
        }
        assert!(ok > 0);
        assert_eq!(
            read_all(&log, "t", 0).await?.len(),
            ok * 10,
            "busy appends wrote nothing"
        );
        let _ = busy;
        Ok(())
    }
}
