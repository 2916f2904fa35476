//! The segment reader fuzzer's corpus replayed in the normal suite: every byte string is
//! classified, and valid records are exactly what is handed out.

use std::path::PathBuf;

#[test]
fn the_segment_corpus_is_classified_never_misread() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/segment_reader");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.map(|e| e.path()).unwrap_or_default();
        let Ok(data) = std::fs::read(&path) else { continue };
        let (mut payloads, mut bytes) = (0u64, 0u64);
        let scan = marsad_eventlog::scan_bytes(&data, &mut |p| {
            payloads += 1;
            bytes += (p.len() + marsad_eventlog::FRAME_HEADER_LEN) as u64;
        });
        assert_eq!(scan.records, payloads, "{}", path.display());
        assert_eq!(scan.valid_len, bytes, "{}", path.display());
        assert!(scan.valid_len <= data.len() as u64, "{}", path.display());
        replayed += 1;
    }
    assert!(replayed > 0, "{} holds no inputs", dir.display());
}
