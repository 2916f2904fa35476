//! The processor against a real local log and a real Delta table: dead letters,
//! duplicates, and resuming exactly once from the offset recorded in the table.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use datafusion::prelude::SessionContext;
use marsad_config::Config;
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
use marsad_process::{ProcessMetrics, Processor};
use marsad_schemas::{ENVELOPE_VERSION, Envelope, TOPIC_DEAD, TOPIC_RAW};
use tokio_util::sync::CancellationToken;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn envelope(event_id: &str) -> Record {
    let event = serde_json::from_value(serde_json::json!({
        "type": "page_view",
        "url": "https://kulshi.example/en/cars/kia",
        "cookie_id": "c-1",
        "event_id": event_id,
    }))
    .unwrap_or_else(|e| panic!("test event: {e}"));
    let env = Envelope {
        v: ENVELOPE_VERSION,
        event,
        received_at: Utc::now(),
        client_ip: "176.29.10.1".parse().ok(),
        user_agent: None,
        accept_language: None,
        dnt: false,
        gpc: false,
    };
    Record {
        key: None,
        payload: env.to_bytes(),
    }
}

async fn count_events(config: &Config) -> Result<i64> {
    let table = deltalake::open_table(config.tables()?.table_url("events")).await?;
    let ctx = SessionContext::new();
    ctx.register_table("events", table.table_provider().await?)?;
    let batches = ctx.sql("SELECT count(*) AS n FROM events").await?.collect().await?;
    let col = batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .ok_or("count type")?;
    Ok(col.value(0))
}

/// Runs a processor until it has written `want` rows (or 30 s pass), then stops it.
async fn process_until(config: &Config, log: Arc<LocalLog>, want: u64) -> Result<Arc<ProcessMetrics>> {
    let metrics = Arc::new(ProcessMetrics::new());
    let processor = Processor::new(config, log, Arc::default(), metrics.clone()).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn(processor.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metrics.events_written.get() < want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // give duplicates or dead letters behind the last row a moment to be read too
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    run.await??;
    Ok(metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_duplicates_and_restarts() -> Result {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    config.process.batch_max_interval_ms = 100;
    let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);

    let mut first = vec![envelope("a"), envelope("b")];
    first.push(Record {
        key: None,
        payload: b"{not an envelope".to_vec(),
    });
    first.push(envelope("a")); // a client's retry
    first.push(envelope("c"));
    log.append(TOPIC_RAW, first).await?;
    let m = process_until(&config, log.clone(), 3).await?;
    assert_eq!(m.events_written.get(), 3);
    assert_eq!(m.duplicates_dropped.get(), 1);
    assert_eq!(m.dead_letters.get(), 1);
    assert_eq!(count_events(&config).await?, 3);

    let mut dead = log.subscribe(TOPIC_DEAD, "test").await?;
    let letters = dead.poll(10, Duration::from_millis(500)).await?;
    assert_eq!(letters.len(), 1);
    let letter: serde_json::Value = serde_json::from_slice(&letters[0].payload)?;
    assert_eq!(letter["offset"], 2);
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("undecodable envelope"),
        "{letter}"
    );

    // a restart resumes after the recorded offset and still knows the stored ids
    log.append(TOPIC_RAW, vec![envelope("b"), envelope("d")]).await?;
    let m = process_until(&config, log.clone(), 1).await?;
    assert_eq!(m.events_written.get(), 1, "only the new event");
    assert_eq!(m.duplicates_dropped.get(), 1, "the retried `b` from before the restart");
    assert_eq!(count_events(&config).await?, 4);
    Ok(())
}
