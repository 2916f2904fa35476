use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::Marsad;

/// Events per request.
const BATCH: usize = 20;
/// Senders at once.
const SENDERS: usize = 8;

/// What the test's own clients saw: the ids of every event ingest answered 2xx for, and how
/// many sends had to be repeated (no answer, or 503).
#[derive(Default)]
struct Seen {
    acknowledged: Mutex<Vec<String>>,
    sent: Mutex<HashSet<String>>,
    retries: AtomicU64,
}

/// Sends batch after batch until `stop`, each batch repeated with the same event ids until
/// ingest acknowledges it (as a client that did not see an answer must), for at most 90 s.
fn sender(ingest: String, n: usize, seen: Arc<Seen>, stop: Arc<AtomicBool>) -> Result<()> {
    let client = Client::builder().timeout(Duration::from_secs(5)).build()?;
    let mut batch_no = 0;
    while !stop.load(Ordering::Relaxed) {
        let ids: Vec<String> = (0..BATCH).map(|i| format!("crash-{n}-{batch_no}-{i}")).collect();
        batch_no += 1;
        let events: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                json!({"type": "page_view", "url": format!("https://kulshi.example/ar/سيارات/{i}"),
                       "cookie_id": format!("c-{n}-{}", i % 7), "event_id": id})
            })
            .collect();
        seen.sent
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .extend(ids.iter().cloned());
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut backoff = Duration::from_millis(50);
        loop {
            let answer = client
                .post(format!("{ingest}/v1/batch"))
                .header("x-forwarded-for", "176.29.10.10")
                .json(&events)
                .send();
            match answer {
                Ok(resp) if resp.status().is_success() => {
                    let body: Value = resp.json()?;
                    ensure!(
                        body["accepted"] == BATCH && body["rejected"] == json!([]),
                        "partly refused: {body}"
                    );
                    seen.acknowledged
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .extend(ids);
                    break;
                }
                Ok(resp) if resp.status().as_u16() != 503 => bail!("refused: {}", resp.status()),
                // no answer (the server is down) or 503: the same events again, later
                _ => {
                    ensure!(Instant::now() < deadline, "not acknowledged within 90 s");
                    seen.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The ground truth is what this test's clients were answered: every event acknowledged with
/// 2xx is stored exactly once after a `kill -9` and a restart, and nothing else is.
#[test]
fn kill_nine_while_traffic_flows_loses_and_duplicates_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let mut m = Marsad::start(&data, None)?;
    let (ingest_port, query_port) = (m.ingest_port, m.query_port);

    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..SENDERS)
        .map(|n| {
            let (ingest, seen, stop) = (m.ingest.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || sender(ingest, n, seen, stop))
        })
        .collect();

    std::thread::sleep(Duration::from_secs(3));
    m.kill_hard()?;
    let acked_before_restart = seen.acknowledged.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.len();
    std::thread::sleep(Duration::from_millis(800));
    let m = Marsad::start_on(&data, None, ingest_port, query_port)?;
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().map_err(|_| anyhow::anyhow!("a sender panicked"))??;
    }

    let acked = seen
        .acknowledged
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let sent = seen.sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let acked_set: HashSet<&str> = acked.iter().map(String::as_str).collect();
    let retries = seen.retries.load(Ordering::Relaxed);
    ensure!(retries > 0, "the crash did not interrupt any send");
    assert!(
        acked_before_restart > 500 && acked.len() > acked_before_restart,
        "traffic before and after the crash: {acked_before_restart} then {}",
        acked.len()
    );
    assert_eq!(acked_set.len(), acked.len(), "each event acknowledged once");
    assert_eq!(acked.len(), sent.len(), "every event sent was acknowledged in the end");

    m.wait_for_count(
        "SELECT count(DISTINCT event_id) FROM events",
        acked.len() as i64,
        Duration::from_secs(120),
    )?;
    assert_eq!(
        m.sql_count("SELECT count(*) FROM events")?,
        acked.len() as i64,
        "no duplicates"
    );
    let stored: HashSet<String> = m
        .sql("SELECT event_id FROM events")?
        .iter()
        .filter_map(|r| r["event_id"].as_str().map(str::to_owned))
        .collect();
    let missing = acked_set.iter().filter(|id| !stored.contains(**id)).count();
    assert_eq!(missing, 0, "acknowledged events lost");
    let unknown = stored.iter().filter(|id| !acked_set.contains(id.as_str())).count();
    assert_eq!(unknown, 0, "stored events that were never acknowledged");
    Ok(())
}
