//! One event: JSON parsing and validation of the event contract.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(event) = marsad_ingest::decode::parse_event(value)
    {
        // what was accepted round-trips through the log's encoding
        let text = serde_json::to_string(&event).expect("an event encodes");
        let again: marsad_schemas::Event = serde_json::from_str(&text).expect("and decodes");
        assert!(again.validate().is_ok());
    }
});
