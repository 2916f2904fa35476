//! Retention of the local log: processed segments past the retention age or
//! size are deleted; nothing a consumer has not processed ever is.

use std::os::unix::fs::OpenOptionsExt;
use std::time::SystemTime;

use super::{Topic, list_segments, segment_name};
use crate::{Error, Result};

impl Topic {
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

    /// Closes the last segment of a topic nobody writes to (no writer holds its lock, as
    /// with dead letters on a quiet site), so its records can age out: a running writer closes
    /// its own segments on its timer.
    fn close_unwritten_segment(&self) -> Result<()> {
        // a writer of this process starting meanwhile would find the lock file taken: hold
        // off its start while the segment is closed
        let _starting = self
            .starting
            .lock()
            .map_err(|_| Error::Closed("writer start poisoned".into()))?;
        if self.writer.get().is_some() {
            return Ok(());
        }
        let Some(&base) = list_segments(&self.dir)?.last() else {
            return Ok(());
        };
        let path = self.dir.join(segment_name(base));
        if std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len() == 0 {
            return Ok(());
        }
        let lock_path = self.dir.join("writer.lock");
        let lock = std::fs::File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        if lock.try_lock().is_err() {
            // another process writes it, and closes it on its own timer
            return Ok(());
        }
        let scan = crate::segment::scan_segment(&path, |_| {})?;
        if scan.records == 0 || scan.outcome != crate::segment::ScanOutcome::Clean {
            // a torn tail is the next writer's to recover, in place
            return Ok(());
        }
        let next = self.dir.join(segment_name(base + scan.records));
        std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&next)
            .map_err(|e| Error::io(&next, e))?;
        super::sync_dir(&self.dir)?;
        tracing::debug!(topic = %self.name, closed = base, "closed the segment of a topic nobody writes to");
        Ok(())
    }

    pub(super) fn enforce_retention(&self, now: SystemTime) -> Result<usize> {
        self.close_unwritten_segment()?;
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
            let too_old = now.duration_since(modified).unwrap_or_default() > self.options.retention_of(&self.name);
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
