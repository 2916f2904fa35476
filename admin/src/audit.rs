//! The PII audit behind `marsad audit`: reads every value of every string and
//! binary column of every Parquet file at the tables' location (a directory or
//! object storage), looking for IP addresses, e-mail addresses, phone numbers in
//! every digit form, and the raw cookie and user ids found in the retained raw log.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use arrow::array::AsArray;
use arrow::datatypes::DataType;
use deltalake::logstore::object_store::ObjectStoreExt as _;
use futures::TryStreamExt;
use marsad_config::TablesLocation;
use marsad_schemas::{Envelope, TOPIC_RAW};
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

/// Cookie ids, user ids and IPs of the events still in the raw log.
pub fn raw_log_identifiers(log_dir: &Path) -> Result<HashSet<String>, AuditError> {
    let mut ids = HashSet::new();
    let dir = log_dir.join(TOPIC_RAW);
    if !dir.is_dir() {
        return Ok(ids);
    }
    let mut segments = Vec::new();
    files(&dir, "log", &mut segments)?;
    for seg in segments {
        marsad_eventlog::scan_segment(&seg, |payload| add_identifiers(payload, &mut ids)).map_err(|e| AuditError {
            path: seg.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(ids)
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
    marsad_privacy::scrub::find_pii(&cleaned)
}

fn redact(v: &str) -> String {
    let head: String = v.chars().take(4).collect();
    format!("{head}… ({} chars)", v.chars().count())
}

/// Scans every Parquet file at `tables` for personal data, and for the `known`
/// identifiers of the raw log ([`raw_log_identifiers`] on the local log).
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
    let store =
        deltalake::logstore::store_for(tables.url(), tables.storage_options()).map_err(|e| at("", e.to_string()))?;
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
    }
}
