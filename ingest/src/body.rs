//! Reading request bodies within the limit, gzip included, so neither a large
//! body nor a small zip bomb can exhaust memory.

use std::io::Read;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::http::header;
use http_body_util::BodyExt;

use crate::error::ApiError;

/// How much of an oversized body is read and discarded before answering 413, so the
/// client finishes sending and sees the answer instead of a broken connection.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Reads the whole body, inflating `Content-Encoding: gzip`, refusing more than `limit` bytes.
pub async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut body = body;
    let mut raw = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= limit && declared.is_none_or(|d| d <= limit) {
                raw.extend_from_slice(&data);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
    }
    if seen > limit || declared.is_some_and(|d| d > limit) {
        return Err(ApiError::TooLarge { limit });
    }
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    decode_body(encoding, raw, limit)
}

/// Inflates a body by its `Content-Encoding`, refusing more than `limit` bytes once inflated.
pub fn decode_body(encoding: Option<&str>, raw: Vec<u8>, limit: usize) -> Result<Vec<u8>, ApiError> {
    let encoding = encoding.map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("") | Some("identity") => Ok(raw),
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&raw[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| ApiError::BadRequest(format!("body is not valid gzip: {e}")))?;
            if out.len() > limit {
                return Err(ApiError::TooLarge { limit });
            }
            Ok(out)
        }
        Some(other) => Err(ApiError::Unsupported(format!(
            "Content-Encoding `{}` is not supported; send gzip or nothing",
            other
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(32)
                .collect::<String>()
        ))),
    }
}

/// Checks the body is UTF-8, naming where it is not.
pub fn utf8(bytes: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(bytes).map_err(|e| {
        ApiError::BadRequest(format!(
            "body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })
}
