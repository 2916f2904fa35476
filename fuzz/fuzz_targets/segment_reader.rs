//! The local log's segment reader: any bytes on disk are classified, never misread.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut payloads = 0u64;
    let mut bytes = 0u64;
    let scan = marsad_eventlog::scan_bytes(data, &mut |p| {
        payloads += 1;
        bytes += p.len() as u64 + marsad_eventlog::FRAME_HEADER_LEN as u64;
    });
    assert_eq!(scan.records, payloads);
    assert_eq!(scan.valid_len, bytes, "valid records are exactly what was handed out");
    assert!(scan.valid_len <= data.len() as u64);
});
