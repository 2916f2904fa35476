//! The append path of the local log: one writer thread per topic takes every
//! append waiting in its bounded queue, frames them, writes and fsyncs once
//! (group commit), and only then acknowledges them. On start it recovers the
//! last segment, truncating a torn tail and refusing corruption. A segment is
//! closed when it is full or when its first record is older than the roll age,
//! on a quiet site too (the writer wakes for it), so retention can delete it.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};

use super::{Topic, list_segments, segment_name, sync_dir};
use crate::segment::{ScanOutcome, frame, scan_segment};
use crate::{Error, Result};

pub(super) struct WriterHandle {
    pub(super) queue: Option<mpsc::SyncSender<AppendRequest>>,
    pub(super) durable: watch::Receiver<u64>,
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

pub(super) struct AppendRequest {
    pub(super) payloads: Vec<Vec<u8>>,
    pub(super) done: oneshot::Sender<Result<u64>>,
}

impl Topic {
    /// Starts the writer on first use: recovers the tail of the last segment, takes the lock.
    pub(super) fn writer(&self) -> Result<&WriterHandle> {
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
        let (tx, rx) = mpsc::sync_channel(self.options.max_pending_appends);
        let settings = WriterSettings {
            segment_bytes: self.options.segment_bytes,
            roll_age: self.options.roll_age(),
            #[cfg(test)]
            paused: self.paused.clone(),
        };
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("log-writer-{name}"))
            .spawn(move || writer_loop(segment, rx, durable_tx, settings, lock))
            .map_err(|e| Error::io(&self.dir, e))?;
        let _ = self.writer.set(WriterHandle {
            queue: Some(tx),
            durable: durable_rx,
            thread: Some(thread),
        });
        self.writer.get().ok_or_else(|| Error::Closed("writer vanished".into()))
    }

    pub(super) fn durable_end(&self) -> Option<watch::Receiver<u64>> {
        self.writer.get().map(|w| w.durable.clone())
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
    /// When its first record was written; `None` while it is empty. A segment found on start
    /// holding records counts as old (when they were written is not known): it is closed at once.
    first_write: Option<SystemTime>,
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
            .mode(0o600)
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
            first_write: (scan.valid_len > 0).then_some(SystemTime::UNIX_EPOCH),
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
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.dir)?;
        self.base = self.next_offset;
        self.file = file;
        self.path = path;
        self.len = 0;
        self.first_write = None;
        Ok(())
    }

    /// How long until the segment must be closed for its age; `None` while it is empty.
    fn roll_due_in(&self, roll_age: Duration, now: SystemTime) -> Option<Duration> {
        let first = self.first_write?;
        Some(roll_age.saturating_sub(now.duration_since(first).unwrap_or_default()))
    }

    /// Closes the segment if it holds records older than `roll_age`.
    fn roll_if_old(&mut self, roll_age: Duration) -> Result<()> {
        if self.roll_due_in(roll_age, SystemTime::now()) == Some(Duration::ZERO) {
            self.roll()?;
        }
        Ok(())
    }

    /// Writes `buf` holding `count` framed records and makes them durable.
    fn write_durably(&mut self, buf: &[u8], count: u64, settings: &WriterSettings) -> Result<u64> {
        if self.len > 0 && self.len + buf.len() as u64 > settings.segment_bytes {
            self.roll()?;
        }
        self.roll_if_old(settings.roll_age)?;
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
        self.first_write.get_or_insert_with(SystemTime::now);
        Ok(first)
    }
}

/// What the writer thread is told at start.
struct WriterSettings {
    /// Roll to a new segment past this size.
    segment_bytes: u64,
    /// Roll to a new segment once its first record is this old.
    roll_age: Duration,
    #[cfg(test)]
    paused: std::sync::Arc<std::sync::Mutex<()>>,
}

fn writer_loop(
    mut segment: ActiveSegment,
    queue: mpsc::Receiver<AppendRequest>,
    durable: watch::Sender<u64>,
    settings: WriterSettings,
    _lock: File,
) {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut group = Vec::with_capacity(256);
    loop {
        // wake when the segment comes of age even if nothing is appended (a quiet site)
        let next = match segment.roll_due_in(settings.roll_age, SystemTime::now()) {
            None => queue.recv().map_err(|_| ()),
            Some(wait) => match queue.recv_timeout(wait) {
                Ok(req) => Ok(req),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = segment.roll_if_old(settings.roll_age) {
                        tracing::error!(error = %e, "could not close an old log segment; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
            },
        };
        let Ok(first) = next else { break };
        group.push(first);
        #[cfg(test)]
        let _paused = settings.paused.lock();
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
        match segment.write_durably(&buf, count, &settings) {
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
