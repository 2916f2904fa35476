//! The batch body decoder: JSON object, array or NDJSON, plain or gzip, any bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let content_type = [Some("application/json"), Some("application/x-ndjson"), None, Some("text/plain")][usize::from(mode & 3)];
    let encoding = [None, Some("gzip"), Some("identity"), Some("br")][usize::from((mode >> 2) & 3)];
    if let Ok(events) = marsad_ingest::decode::decode_batch(content_type, encoding, body.to_vec(), 64 * 1024) {
        for event in events.into_iter().flatten() {
            assert!(event.validate().is_ok(), "a decoded event is valid");
        }
    }
});
