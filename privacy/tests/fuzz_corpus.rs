//! The `scrub_url` fuzzer's corpus replayed in the normal suite: in what scrubbing keeps,
//! the scrubber finds nothing more to remove.

use std::path::PathBuf;

use marsad_privacy::scrub::{QueryAllowList, scrub_text, scrub_url};

#[test]
fn the_scrub_url_corpus_leaves_nothing_to_scrub() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/scrub_url");
    let allow = QueryAllowList::new(&["utm_*".into(), "category".into(), "page".into()]);
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.map(|e| e.path()).unwrap_or_default();
        let Ok(raw) = std::fs::read_to_string(&path) else {
            continue;
        };
        let page = scrub_url(&raw, &allow);
        assert_eq!(scrub_text(&page.page_path), page.page_path, "{}", path.display());
        for kept in [&page.utm_source, &page.utm_medium, &page.utm_campaign]
            .into_iter()
            .flatten()
        {
            assert_eq!(&scrub_text(kept), kept, "{}", path.display());
        }
        replayed += 1;
    }
    assert!(replayed > 0, "{} holds no inputs", dir.display());
}
