//! Reading the local log: a subscription keeps a cursor into one segment at a
//! time, follows the writer's durable end, and records its consumer position.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Topic, list_segments, segment_name};
use crate::segment::parse_frame;
use crate::{Delivered, Error, Position, Result, Subscription};

impl Topic {
    pub(super) fn consumer_path(&self, group: &str) -> PathBuf {
        self.dir.join("consumers").join(format!("{group}.offset"))
    }
}

pub(super) struct Cursor {
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

pub(super) struct LocalSubscription {
    pub(super) topic: Arc<Topic>,
    pub(super) group: String,
    pub(super) next_offset: u64,
    pub(super) cursor: Option<Cursor>,
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
