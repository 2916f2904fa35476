//! The duplicate filter's memory, measured with a counting allocator (dhat in testing mode;
//! one test in this binary, so nothing else allocates meanwhile): the processor remembers
//! millions of recent events, so each must cost a fixed few bytes however long its id.

use marsad_process::dedup::RecentEventIds;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[test]
fn a_remembered_event_costs_a_fixed_few_bytes() {
    let _profiler = dhat::Profiler::builder().testing().build();
    const EVENTS: usize = 200_000;
    let before = dhat::HeapStats::get().curr_bytes;
    let mut recent = RecentEventIds::new(EVENTS);
    for i in 0..EVENTS {
        // a client-made id as long as a UUID, and the visitor's key
        let id = format!("0190a3c2-7d4e-7b3a-9f21-{i:012}");
        assert!(recent.insert(Some(&format!("{:032x}", i % 5_000)), &id));
    }
    let held = dhat::HeapStats::get().curr_bytes - before;
    let per_event = held as f64 / EVENTS as f64;
    println!("{EVENTS} remembered events hold {held} bytes: {per_event:.1} bytes each");
    // one copy of the id alone would take 36 bytes of text plus its String
    assert!(per_event <= 32.0, "{per_event:.1} bytes per remembered event");
    assert_eq!(recent.len(), EVENTS);
    assert!(!recent.insert(Some(&format!("{:032x}", 7)), "0190a3c2-7d4e-7b3a-9f21-000000000007"));
    // full: the oldest is forgotten to make room, memory stays where it was
    assert!(recent.insert(Some("v"), "one more"));
    assert_eq!(recent.len(), EVENTS);
    let full = dhat::HeapStats::get().curr_bytes - before;
    // (a few KiB of slack: the test harness's own threads may allocate meanwhile)
    assert!(full <= held + 16 * 1024, "grew past its capacity: {held} -> {full}");
}
