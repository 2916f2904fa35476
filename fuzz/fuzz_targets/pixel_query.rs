//! The pixel's query string: parameters, then the event they describe.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else { return };
    if let Ok(params) = marsad_ingest::decode::pixel_params(query)
        && let Ok(event) = marsad_ingest::decode::pixel_event(&params, None)
    {
        assert!(event.validate().is_ok());
    }
});
