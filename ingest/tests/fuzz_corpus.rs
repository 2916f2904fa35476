//! The fuzzers' corpora (`fuzz/corpus/…`, crashes included once fixed) replayed through the
//! same checks as the fuzz targets, in the normal suite: a fixed parser stays fixed.

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} holds no inputs", dir.display());
    out
}

#[test]
fn the_batch_decoder_corpus_decodes_to_valid_events_or_reasons() {
    for (path, data) in inputs("batch_decoder") {
        let Some((&mode, body)) = data.split_first() else {
            continue;
        };
        let content_type = [
            Some("application/json"),
            Some("application/x-ndjson"),
            None,
            Some("text/plain"),
        ][usize::from(mode & 3)];
        let encoding = [None, Some("gzip"), Some("identity"), Some("br")][usize::from((mode >> 2) & 3)];
        if let Ok(events) = marsad_ingest::decode::decode_batch(content_type, encoding, body.to_vec(), 64 * 1024) {
            for event in events.into_iter().flatten() {
                assert!(event.validate().is_ok(), "{}", path.display());
            }
        }
    }
}

#[test]
fn the_event_corpus_round_trips_what_it_accepts() {
    for (path, data) in inputs("event_validation") {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&data)
            && let Ok(event) = marsad_ingest::decode::parse_event(value)
        {
            let text = serde_json::to_string(&event).unwrap_or_default();
            let again: marsad_schemas::Event =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(again.validate().is_ok(), "{}", path.display());
        }
    }
}

#[test]
fn the_pixel_corpus_gives_valid_events_or_reasons() {
    for (path, data) in inputs("pixel_query") {
        let Ok(query) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(params) = marsad_ingest::decode::pixel_params(query)
            && let Ok(event) = marsad_ingest::decode::pixel_event(&params, None)
        {
            assert!(event.validate().is_ok(), "{}", path.display());
        }
    }
}
