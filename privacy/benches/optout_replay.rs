//! How long a service takes to load the opt-outs before it serves: 10 million distinct
//! opt-outs in a local opt-out log, replayed into a fresh registry as every stage does at
//! start. Run: `cargo bench -p marsad-privacy --bench optout_replay` (OPTOUTS=n to change
//! the count). Prints the replay time, the rate, and the registry's size.

use std::sync::Arc;
use std::time::Instant;

use marsad_eventlog::{EventLog, Followed, LocalLog, LocalLogOptions, Record};
use marsad_privacy::keys::SubjectKeys;
use marsad_privacy::optout::{OptOutRecord, OptOutRegistry, OptOutScope};
use marsad_privacy::pseudonym::Subject;
use marsad_schemas::TOPIC_OPTOUTS;

/// Reads the opt-out log from the start until it is caught up, handing each record's payload
/// to `on_record`; returns the seconds it took.
async fn replay(log: &LocalLog, mut on_record: impl FnMut(&[u8]) + Send) -> Result<f64, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop_tx = Some(stop_tx);
    marsad_eventlog::follow(
        log as &dyn EventLog,
        TOPIC_OPTOUTS,
        |f| match f {
            Followed::Record(r) => on_record(&r.payload),
            Followed::CaughtUp => {
                if let Some(tx) = stop_tx.take() {
                    let _ = tx.send(());
                }
            }
        },
        async {
            let _ = stop_rx.await;
        },
    )
    .await?;
    Ok(started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: u64 = std::env::var("OPTOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let dir = tempfile::tempdir()?;
    let log = Arc::new(LocalLog::open(dir.path(), LocalLogOptions::default())?);
    let keys = SubjectKeys::from_seed(3);
    let started = Instant::now();
    let mut bytes = 0u64;
    for chunk in 0..total.div_ceil(10_000) {
        let records: Vec<Record> = (chunk * 10_000..((chunk + 1) * 10_000).min(total))
            .map(|i| {
                let cookie = format!("c-{i:032x}");
                let scope = if i % 3 == 0 {
                    OptOutScope::All
                } else {
                    OptOutScope::Personalisation
                };
                let rec = OptOutRecord::new(&keys.optout, &keys.targeting, Subject::Cookie(&cookie), scope);
                let payload = rec.to_bytes();
                bytes += payload.len() as u64;
                Record {
                    key: Some(rec.log_key()),
                    payload,
                }
            })
            .collect();
        log.append(TOPIC_OPTOUTS, records).await?;
    }
    println!(
        "wrote {total} opt-outs ({:.0} MiB of records) in {:.1} s",
        bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    drop(log);

    // the baseline, in the same run: reading the records from the log, applying nothing
    let log = LocalLog::open(dir.path(), LocalLogOptions::default())?;
    let mut read = 0u64;
    let baseline = replay(&log, |_| read += 1).await?;
    println!("baseline: read {read} records without applying them in {baseline:.1} s");

    // a service starting: a new log handle, a new registry, read from the start
    let log = LocalLog::open(dir.path(), LocalLogOptions::default())?;
    let registry = OptOutRegistry::default();
    let mut failed = 0u64;
    let secs = replay(&log, |payload| {
        if registry.apply_bytes(payload).is_err() {
            failed += 1;
        }
    })
    .await?;
    println!(
        "replayed {total} opt-outs in {secs:.1} s ({:.2} M/s, {:.1}x the baseline); registry holds {} prints; {failed} undecodable",
        total as f64 / secs / 1e6,
        secs / baseline,
        registry.len()
    );
    Ok(())
}
