//! The on-disk framing of a segment file: `[len: u32 LE][crc32c(payload): u32 LE][payload]`.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Bytes before each payload.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest payload a frame may hold; anything bigger is a corrupt length.
pub const MAX_RECORD_LEN: usize = 16 * 1024 * 1024;

/// Appends one framed record to `out`.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// How a scan of a segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanOutcome {
    /// Every byte is a valid record.
    Clean,
    /// The file ends in an incomplete or unchecksummed record that no later valid record
    /// follows: a write the crash interrupted, never acknowledged. Truncate at `valid_len`.
    TornTail {
        /// Bytes of valid records.
        valid_len: u64,
    },
    /// A bad record with data after it: not a torn write.
    Corrupt {
        /// Where the bad record starts.
        byte_offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Result of scanning a whole segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Valid records in order, with their byte offsets.
    pub records: u64,
    /// Bytes covered by valid records.
    pub valid_len: u64,
    /// How it ended.
    pub outcome: ScanOutcome,
}

/// Parses one frame at the start of `buf`; `Ok(None)` when `buf` is too short to hold it.
pub(crate) fn parse_frame(buf: &[u8]) -> std::result::Result<Option<(&[u8], usize)>, String> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len == 0 || len > MAX_RECORD_LEN {
        return Err(format!("impossible record length {len}"));
    }
    if buf.len() < FRAME_HEADER_LEN + len {
        return Ok(None);
    }
    let payload = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    if crc32c::crc32c(payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(Some((payload, FRAME_HEADER_LEN + len)))
}

/// Reads a segment from the start and classifies how it ends, calling `each` per valid payload.
pub fn scan_segment(path: &Path, mut each: impl FnMut(&[u8])) -> Result<Scan> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    Ok(scan_bytes(&bytes, &mut each))
}

/// Classifies a segment's bytes as [`scan_segment`] does a file's (for fuzzing and tests).
pub fn scan_bytes(bytes: &[u8], each: &mut dyn FnMut(&[u8])) -> Scan {
    let mut pos = 0usize;
    let mut records = 0u64;
    loop {
        match parse_frame(&bytes[pos..]) {
            Ok(Some((payload, used))) => {
                each(payload);
                pos += used;
                records += 1;
            }
            Ok(None) => {
                let outcome = if pos == bytes.len() {
                    ScanOutcome::Clean
                } else if any_valid_frame_after(bytes, pos + 1) {
                    ScanOutcome::Corrupt {
                        byte_offset: pos as u64,
                        reason: "bad record length".into(),
                    }
                } else {
                    ScanOutcome::TornTail { valid_len: pos as u64 }
                };
                return Scan {
                    records,
                    valid_len: pos as u64,
                    outcome,
                };
            }
            Err(reason) => {
                let outcome = if any_valid_frame_after(bytes, pos + 1) {
                    ScanOutcome::Corrupt {
                        byte_offset: pos as u64,
                        reason,
                    }
                } else {
                    ScanOutcome::TornTail { valid_len: pos as u64 }
                };
                return Scan {
                    records,
                    valid_len: pos as u64,
                    outcome,
                };
            }
        }
    }
}

/// Whether a valid frame starts anywhere at or after `from`: if so, a bad frame before it
/// cannot be a torn tail (a crash only ever tears the end of the file).
fn any_valid_frame_after(bytes: &[u8], from: usize) -> bool {
    (from..bytes.len().saturating_sub(FRAME_HEADER_LEN))
        .any(|p| matches!(parse_frame(&bytes[p..]), Ok(Some((_, used))) if used > FRAME_HEADER_LEN + 3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            frame(p, &mut out);
        }
        out
    }

    #[test]
    fn clean_segments_read_back() {
        let bytes = framed(&[b"one", b"two", b"three"]);
        let mut seen = Vec::new();
        let scan = scan_bytes(&bytes, &mut |p| seen.push(p.to_vec()));
        assert_eq!(scan.outcome, ScanOutcome::Clean);
        assert_eq!(seen, vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
    }

    #[test]
    fn a_cut_last_record_is_a_torn_tail() {
        let full = framed(&[b"alpha-record", b"beta-record"]);
        let first_len = (FRAME_HEADER_LEN + b"alpha-record".len()) as u64;
        for cut in first_len as usize + 1..full.len() {
            let scan = scan_bytes(&full[..cut], &mut |_| {});
            assert_eq!(
                scan.outcome,
                ScanOutcome::TornTail { valid_len: first_len },
                "cut {cut}"
            );
            assert_eq!(scan.records, 1);
        }
        let mut zero_tail = full.clone();
        zero_tail.extend_from_slice(&[0u8; 100]);
        let scan = scan_bytes(&zero_tail, &mut |_| {});
        assert_eq!(
            scan.outcome,
            ScanOutcome::TornTail {
                valid_len: full.len() as u64
            }
        );
    }

    #[test]
    fn a_flipped_byte_before_valid_data_is_corruption() {
        let mut bytes = framed(&[b"first-record", b"second-record", b"third-record"]);
        let second = FRAME_HEADER_LEN + b"first-record".len();
        bytes[second + FRAME_HEADER_LEN + 2] ^= 0x40;
        let scan = scan_bytes(&bytes, &mut |_| {});
        assert!(
            matches!(scan.outcome, ScanOutcome::Corrupt { byte_offset, .. } if byte_offset == second as u64),
            "{scan:?}"
        );
        assert_eq!(scan.records, 1);
    }

    proptest! {
        #[test]
        fn any_prefix_of_a_valid_log_recovers_to_a_record_boundary(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..20),
            cut_frac in 0.0f64..1.0,
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
            let bytes = framed(&refs);
            let cut = (bytes.len() as f64 * cut_frac) as usize;
            let mut seen = Vec::new();
            let scan = scan_bytes(&bytes[..cut], &mut |p| seen.push(p.to_vec()));
            let corrupt = matches!(scan.outcome, ScanOutcome::Corrupt { .. });
            prop_assert!(!corrupt, "{:?}", scan.outcome);
            prop_assert_eq!(&payloads[..seen.len()], &seen[..]);
        }
    }
}
