//! The opt-out registry's memory, measured with a counting allocator (dhat in testing mode;
//! one test in this binary, so nothing else allocates meanwhile): every service holds every
//! opt-out ever made, so each must cost a fixed few bytes, not its identifier's text.

use chrono::Utc;
use marsad_privacy::optout::{OptOutRecord, OptOutRegistry, OptOutScope, Purpose};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[test]
fn an_opt_out_costs_a_fixed_few_bytes() {
    let _profiler = dhat::Profiler::builder().testing().build();
    const SUBJECTS: u128 = 200_000;
    // keyed hashes as the log holds them: 32 hex characters
    let subject = |i: u128| format!("{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
    let registry = OptOutRegistry::default();
    let before = dhat::HeapStats::get().curr_bytes;
    for i in 0..SUBJECTS {
        registry.apply(&OptOutRecord {
            subject: subject(i),
            // the audience_id of the time is kept too (rows stored under it stay covered)
            audience_id: Some(subject(i + (1 << 100))),
            scope: if i % 2 == 0 {
                OptOutScope::Personalisation
            } else {
                OptOutScope::All
            },
            at: Utc::now(),
        });
    }
    let held = dhat::HeapStats::get().curr_bytes - before;
    let per_subject = held as f64 / SUBJECTS as f64;
    println!("{SUBJECTS} opt-outs hold {held} bytes: {per_subject:.1} bytes each");
    // the 2 × 32 characters of the two hashes alone take more than this as Strings
    assert!(per_subject <= 32.0, "{per_subject:.1} bytes per opt-out");
    assert_eq!(
        registry.len() as u128,
        2 * SUBJECTS,
        "a print per subject key and per audience_id"
    );
    assert!(registry.is_opted_out(&subject(4 + (1 << 100)), Purpose::Personalisation));
    assert!(registry.is_opted_out(&subject(4), Purpose::Personalisation));
    assert!(!registry.is_opted_out(&subject(4), Purpose::Analytics));
    assert!(registry.is_opted_out(&subject(5), Purpose::Analytics));
    assert!(!registry.is_opted_out(&subject(SUBJECTS + 1), Purpose::Personalisation));
}
