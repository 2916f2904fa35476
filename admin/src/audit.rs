//! The PII audit behind `marsad audit`: reads every value of every string and
//! binary column of every Parquet file at the tables' location (a directory or
//! object storage), looking for IP addresses, e-mail addresses, phone numbers in
//! every digit form, and the raw cookie and user ids found in the retained raw log.
//!
//! Its checks are its own, not the scrubber's: an audit that asked the
//! scrubber's patterns whether the scrubber missed something could never find
//! what those patterns miss. Phones are found as runs of digits in any of the
//! three digit sets with any separators between them, e-mails by their shape.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use arrow::array::AsArray;
use arrow::datatypes::DataType;
use chrono::{DateTime, Utc};
use deltalake::logstore::object_store::ObjectStoreExt as _;
use futures::TryStreamExt;
use marsad_config::TablesLocation;
use marsad_schemas::{Envelope, TOPIC_DEAD, TOPIC_RAW};
use regex::Regex;
use serde::Serialize;

/// Why the audit could not read something.
#[derive(Debug, thiserror::Error)]
#[error("audit of {path}: {reason}")]
pub struct AuditError {
    /// The file (or location).
    pub path: String,
    /// What failed.
    pub reason: String,
}

/// One finding.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditHit {
    /// The table directory.
    pub table: String,
    /// The column.
    pub column: String,
    /// The Parquet file.
    pub file: String,
    /// `ip`, `email`, `phone` or `identifier`.
    pub kind: &'static str,
    /// The start of the value, enough to find it, not to reuse it.
    pub redacted: String,
}

/// What the audit read and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    /// Parquet files read.
    pub files: usize,
    /// Values read.
    pub values: u64,
    /// Identifiers taken from the raw log to look for.
    pub known_identifiers: usize,
    /// Findings.
    pub hits: Vec<AuditHit>,
}

static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
        .unwrap_or_else(|e| unreachable!("{e}"))
});
/// Hash- and id-shaped runs (hex, UUIDs) that contain digit runs by chance.
static HEXISH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b|\b[0-9a-f]{12,}\b")
        .unwrap_or_else(|e| unreachable!("{e}"))
});

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<(), AuditError> {
    let entries = std::fs::read_dir(dir).map_err(|e| AuditError {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, ext, out)?;
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}

/// What the local raw log still holds: the identifiers to look for in the tables, and the
/// oldest record of each raw topic (to hold against the retention promise).
#[derive(Debug, Default)]
pub struct RawLogContents {
    /// Cookie ids, user ids and IPs of the raw events.
    pub identifiers: HashSet<String>,
    /// Per topic holding raw data (raw events, dead letters): its oldest record.
    pub oldest: Vec<OldestRecord>,
}

/// The oldest record a raw topic holds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OldestRecord {
    /// The topic.
    pub topic: String,
    /// Records it holds.
    pub records: u64,
    /// When the oldest was written (raw events: received; dead letters: refused); `None` when
    /// the topic is empty.
    pub written_at: Option<DateTime<Utc>>,
}

/// When a raw-topic record was written: an envelope's `received_at`, a dead letter's `at`
/// (or, for dead letters written before it was recorded, the envelope inside).
pub fn record_time(payload: &[u8]) -> Option<DateTime<Utc>> {
    if let Ok(env) = Envelope::from_bytes(payload) {
        return Some(env.received_at);
    }
    let letter: serde_json::Value = serde_json::from_slice(payload).ok()?;
    if let Some(at) = letter.get("at").and_then(|a| a.as_str()) {
        return at.parse().ok();
    }
    let inner = letter.get("payload")?.as_str()?;
    Envelope::from_bytes(inner.as_bytes()).ok().map(|e| e.received_at)
}

/// Reads every segment of the local log's raw and dead-letter topics.
pub fn raw_log_contents(log_dir: &Path) -> Result<RawLogContents, AuditError> {
    let mut contents = RawLogContents::default();
    for topic in [TOPIC_RAW, TOPIC_DEAD] {
        let dir = log_dir.join(topic);
        let mut oldest = OldestRecord {
            topic: topic.to_owned(),
            records: 0,
            written_at: None,
        };
        if dir.is_dir() {
            let mut segments = Vec::new();
            files(&dir, "log", &mut segments)?;
            for seg in segments {
                let scan = marsad_eventlog::scan_segment(&seg, |payload| {
                    if topic == TOPIC_RAW {
                        add_identifiers(payload, &mut contents.identifiers);
                    }
                    // a record whose time cannot be read counts as written at the epoch: the
                    // audit then fails loudly rather than pass over it
                    let at = record_time(payload).unwrap_or(DateTime::UNIX_EPOCH);
                    oldest.written_at = Some(oldest.written_at.map_or(at, |o| o.min(at)));
                })
                .map_err(|e| AuditError {
                    path: seg.display().to_string(),
                    reason: e.to_string(),
                })?;
                oldest.records += scan.records;
            }
        }
        contents.oldest.push(oldest);
    }
    Ok(contents)
}

/// Adds the cookie id, user id and IP of a raw-log record (an envelope) to `ids`.
pub fn add_identifiers(payload: &[u8], ids: &mut HashSet<String>) {
    if let Ok(env) = Envelope::from_bytes(payload) {
        ids.extend(env.event.cookie_id);
        ids.extend(env.event.user_id);
        ids.extend(env.client_ip.map(|i| i.to_string()));
    }
}

fn classify(value: &str, known: &HashSet<String>) -> Option<&'static str> {
    if known.contains(value)
        || value
            .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_' || c == '.' || c == ':'))
            .any(|t| !t.is_empty() && known.contains(t))
    {
        return Some("identifier");
    }
    if IPV4.is_match(value)
        || value
            .split(|c: char| c.is_whitespace() || c == '/' || c == ',')
            .any(|t| t.matches(':').count() >= 2 && t.parse::<IpAddr>().is_ok())
    {
        return Some("ip");
    }
    let cleaned = HEXISH.replace_all(value, "");
    if looks_like_email(&cleaned) {
        return Some("email");
    }
    (longest_digit_run(&cleaned) >= PHONE_DIGITS).then_some("phone")
}

/// Digits a run must have to be taken for a phone (or another national number): the shortest
/// subscriber numbers of the region have seven.
pub const PHONE_DIGITS: usize = 7;

/// The value of a digit of any of the three digit sets people type here: Latin `0-9`,
/// Arabic-Indic `٠-٩` and Eastern Arabic-Indic (Persian) `۰-۹`.
pub fn digit_value(c: char) -> Option<u32> {
    match c {
        '0'..='9' => Some(c as u32 - '0' as u32),
        '\u{0660}'..='\u{0669}' => Some(c as u32 - 0x0660),
        '\u{06F0}'..='\u{06F9}' => Some(c as u32 - 0x06F0),
        _ => None,
    }
}

/// `text` with every digit written in Latin and everything else kept.
pub fn normalise_digits(text: &str) -> String {
    text.chars()
        .map(|c| digit_value(c).and_then(|d| char::from_digit(d, 10)).unwrap_or(c))
        .collect()
}

/// The most digits in one run of `text`, where a run may be broken by the separators people
/// type in phone numbers (spaces, `-`, `.`, `(`, `)`, `/`, `+`, no-break space and the
/// direction marks), in any digit set, percent-encoded or not.
pub fn longest_digit_run(text: &str) -> usize {
    let decoded = percent_decode_twice(text);
    let (mut longest, mut run) = (0, 0);
    for c in decoded.chars() {
        if digit_value(c).is_some() {
            run += 1;
            longest = longest.max(run);
        } else if !matches!(
            c,
            ' ' | '-' | '.' | '(' | ')' | '/' | '+' | '\u{00A0}' | '\u{200E}' | '\u{200F}' | '\t'
        ) {
            run = 0;
        }
    }
    longest
}

/// Whether `text` holds something shaped like an e-mail address (`local@domain.tld`), also
/// percent-encoded once or twice.
pub fn looks_like_email(text: &str) -> bool {
    let decoded = percent_decode_twice(text);
    decoded.match_indices('@').any(|(at, _)| {
        let before = decoded[..at].chars().next_back();
        let domain: String = decoded[at + 1..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '.' || *c == '-')
            .collect();
        let tld = domain.rsplit('.').next().unwrap_or_default();
        before.is_some_and(|c| c.is_alphanumeric() || "._%+-".contains(c))
            && domain.contains('.')
            && tld.chars().count() >= 2
            && tld.chars().all(char::is_alphabetic)
    })
}

fn percent_decode_twice(text: &str) -> String {
    let once = percent_encoding_decode(text);
    percent_encoding_decode(&once)
}

fn percent_encoding_decode(text: &str) -> String {
    if !text.contains('%') {
        return text.to_owned();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn redact(v: &str) -> String {
    let head: String = v.chars().take(4).collect();
    format!("{head}… ({} chars)", v.chars().count())
}

/// Scans every Parquet file at `tables` for personal data, and for the `known`
/// identifiers of the raw log ([`raw_log_contents`] on the local log).
pub async fn audit(tables: &TablesLocation, known: HashSet<String>) -> Result<AuditReport, AuditError> {
    let mut report = AuditReport {
        known_identifiers: known.len(),
        ..AuditReport::default()
    };
    if tables.local_dir().is_some_and(|dir| !dir.is_dir()) {
        return Ok(report);
    }
    let at = |path: &str, reason: String| AuditError {
        path: format!("{tables}{path}"),
        reason,
    };
    let store = marsad_tables::location_store(tables).map_err(|e| at("", e.to_string()))?;
    let mut parquet_files: Vec<String> = store
        .list(None)
        .map_ok(|meta| meta.location.to_string())
        .try_filter(|path| std::future::ready(path.ends_with(".parquet")))
        .try_collect()
        .await
        .map_err(|e| at("", e.to_string()))?;
    parquet_files.sort();
    for file in parquet_files {
        let err = |reason: String| at(&file, reason);
        let table = file.split('/').next().unwrap_or_default().to_owned();
        let bytes = match store.get(&file.as_str().into()).await {
            Ok(got) => got.bytes().await.map_err(|e| err(e.to_string()))?,
            // removed by a vacuum since the listing: nothing left to audit
            Err(deltalake::ObjectStoreError::NotFound { .. }) => continue,
            Err(e) => return Err(err(e.to_string())),
        };
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| err(e.to_string()))?;
        report.files += 1;
        let file_name = format!("{tables}{file}");
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            for (i, field) in batch.schema().fields().iter().enumerate() {
                let col = batch.column(i);
                let values: Vec<String> = match field.data_type() {
                    DataType::Utf8 => col.as_string::<i32>().iter().flatten().map(str::to_owned).collect(),
                    DataType::LargeUtf8 => col.as_string::<i64>().iter().flatten().map(str::to_owned).collect(),
                    DataType::Utf8View => col.as_string_view().iter().flatten().map(str::to_owned).collect(),
                    // bytes that are text are read as text; opaque bytes (HLL sketches) are
                    // hashes, and their random bytes would now and then look like an address
                    DataType::Binary => col
                        .as_binary::<i32>()
                        .iter()
                        .flatten()
                        .filter_map(|b| std::str::from_utf8(b).ok().map(str::to_owned))
                        .collect(),
                    DataType::BinaryView => col
                        .as_binary_view()
                        .iter()
                        .flatten()
                        .filter_map(|b| std::str::from_utf8(b).ok().map(str::to_owned))
                        .collect(),
                    _ => continue,
                };
                for v in values {
                    report.values += 1;
                    if let Some(kind) = classify(&v, &known) {
                        report.hits.push(AuditHit {
                            table: table.clone(),
                            column: field.name().clone(),
                            file: file_name.clone(),
                            kind,
                            redacted: redact(&v),
                        });
                    }
                }
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_what_must_not_be_stored() {
        let known: HashSet<String> = ["c-secret-1".to_owned()].into_iter().collect();
        assert_eq!(classify("176.29.1.2", &known), Some("ip"));
        assert_eq!(classify("2001:db8::7", &known), Some("ip"));
        assert_eq!(classify("/u/someone@example.com", &known), Some("email"));
        assert_eq!(classify("/call/٠٧٩١٢٣٤٥٦٧", &known), Some("phone"));
        assert_eq!(classify("c-secret-1", &known), Some("identifier"));
        assert_eq!(
            classify("ff2c769044eb474f25150b999c6abe90", &known),
            None,
            "hashes are not phones"
        );
        assert_eq!(classify("0190a3c2-7d4e-7b3a-9f21-1234567890ab", &known), None);
        assert_eq!(classify("/ar/سيارات/[phone]", &known), None);
        assert_eq!(
            classify("/call/+962 ۷۹-۱۲۳-۴۵۶۷", &known),
            Some("phone"),
            "Eastern digits, separators"
        );
        assert_eq!(
            classify("/x/%D9%A0%D9%A7%D9%A9%D9%A1%D9%A2%D9%A3%D9%A4%D9%A5%D9%A6", &known),
            Some("phone")
        );
        assert_eq!(
            classify("/u/someone%2540example.com", &known),
            Some("email"),
            "encoded twice"
        );
        assert_eq!(
            classify("/ar/cars/ad-123456?page=2", &known),
            None,
            "six digits are a listing"
        );
        assert_eq!(classify("a@b", &known), None, "no domain");
    }
}
