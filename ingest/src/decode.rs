//! From request bytes to events, with no I/O: the parsers the internet feeds,
//! kept pure so they can be fuzzed and property-tested on their own.

use std::collections::HashMap;

use marsad_schemas::{Event, EventType};
use serde_json::Value;

use crate::body::{decode_body, utf8};
use crate::error::ApiError;

/// Parses and validates one event; the error is the client's message.
pub fn parse_event(value: Value) -> Result<Event, String> {
    let event: Event = serde_json::from_value(value).map_err(|e| format!("invalid event: {e}"))?;
    event.validate().map_err(|e| format!("invalid event: {e}"))?;
    Ok(event)
}

/// Splits a batch body into its events, keeping each one's index for error reports.
pub fn batch_items(content_type: Option<&str>, text: &str) -> Result<Vec<Result<Value, String>>, ApiError> {
    let content_type = content_type.unwrap_or("").to_ascii_lowercase();
    if content_type.contains("ndjson") || content_type.contains("jsonlines") {
        return Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| serde_json::from_str::<Value>(line).map_err(|e| format!("malformed JSON line: {e}")))
            .collect());
    }
    let value: Value = serde_json::from_str(text).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut map) => {
            if let Some(other) = map.keys().find(|k| *k != "events") {
                return Err(ApiError::BadRequest(format!(
                    "unknown field `{}` in batch; expected `events`",
                    other.chars().take(64).collect::<String>()
                )));
            }
            match map.remove("events") {
                Some(Value::Array(items)) => items,
                Some(_) => return Err(ApiError::BadRequest("`events` must be an array of events".into())),
                None => return Err(ApiError::BadRequest("missing field `events`".into())),
            }
        }
        _ => {
            return Err(ApiError::BadRequest(
                "a batch is {\"events\":[…]}, a JSON array, or NDJSON".into(),
            ));
        }
    };
    Ok(items.into_iter().map(Ok).collect())
}

/// A whole batch body as received (`Content-Type`, `Content-Encoding`, bytes) to its events,
/// each valid or with its reason.
pub fn decode_batch(
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    raw: Vec<u8>,
    limit: usize,
) -> Result<Vec<Result<Event, String>>, ApiError> {
    let bytes = decode_body(content_encoding, raw, limit)?;
    let text = utf8(&bytes)?;
    Ok(batch_items(content_type, text)?
        .into_iter()
        .map(|item| item.and_then(parse_event))
        .collect())
}

/// The event a pixel request's query describes (`t`, `u`, `r`, `e`); `referer` is the
/// page when `u` is absent. The cookie is the caller's business.
pub fn pixel_event(params: &HashMap<String, String>, referer: Option<String>) -> Result<Event, String> {
    let type_name = params.get("t").map(String::as_str).unwrap_or("page_view");
    let event_type = EventType::parse(type_name).ok_or_else(|| {
        format!(
            "unknown event type `{}` in `t`",
            type_name
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(32)
                .collect::<String>()
        )
    })?;
    let event = Event {
        event_type,
        url: params.get("u").cloned().or(referer),
        referrer: params.get("r").cloned().filter(|r| !r.is_empty()),
        cookie_id: None,
        user_id: None,
        identity: None,
        event_id: params.get("e").cloned(),
        ts: None,
        ad: None,
        consent: None,
        demographics: None,
        props: None,
    };
    event.validate().map_err(|e| format!("invalid event: {e}"))?;
    Ok(event)
}

/// A pixel request's query string to its parameters, as the pixel route reads them.
pub fn pixel_params(query: &str) -> Result<HashMap<String, String>, String> {
    serde_urlencoded::from_str(query).map_err(|e| format!("unreadable query string: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_decode_to_an_answer_never_a_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..512),
            ndjson in any::<bool>(),
            gzip in any::<bool>(),
        ) {
            let ct = if ndjson { Some("application/x-ndjson") } else { Some("application/json") };
            let ce = if gzip { Some("gzip") } else { None };
            let _ = decode_batch(ct, ce, raw, 4096);
        }

        #[test]
        fn any_query_string_gives_an_event_or_a_reason(query in ".{0,300}") {
            if let Ok(params) = pixel_params(&query)
                && let Ok(event) = pixel_event(&params, None)
            {
                prop_assert!(event.validate().is_ok());
            }
        }
    }

    #[test]
    fn a_gzip_bomb_is_refused_as_too_large() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 10 * 1024 * 1024]).expect("compress");
        let raw = enc.finish().expect("compress");
        assert!(raw.len() < 20_000);
        assert!(matches!(
            decode_batch(None, Some("gzip"), raw, 1024 * 1024),
            Err(ApiError::TooLarge { .. })
        ));
    }
}
