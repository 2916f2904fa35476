//! The data engineers' batch jobs on a real data dir: `marsad sql` in every
//! output format, `marsad compact` and `marsad retention`.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use marsad_config::Config;
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
use marsad_process::{ProcessMetrics, Processor};
use marsad_schemas::{ENVELOPE_VERSION, Envelope, TOPIC_RAW};
use tokio_util::sync::CancellationToken;

use crate::common::marsad_bin;

/// `per_day` page views on each of the days `ages` days ago, over several commits.
async fn fill(config: &Config, ages: &[i64], per_day: usize) -> Result<usize> {
    let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    let mut total = 0;
    for &age in ages {
        let received = Utc::now() - chrono::Duration::days(age);
        let records: Vec<Record> = (0..per_day)
            .map(|i| {
                let event = serde_json::json!({
                    "type": if i % 5 == 0 { "ad_impression" } else { "page_view" },
                    "url": if i % 2 == 0 { "https://kulshi.example/ar/سيارات/1" } else { "https://kulshi.example/en/jobs" },
                    "cookie_id": format!("c-{}", i % 40),
                    "event_id": format!("d{age}-{i}"),
                    "ad": {"ad_id": "ad-1", "campaign_id": "cmp-1", "placement": "top"},
                });
                let env = Envelope {
                    v: ENVELOPE_VERSION,
                    event: serde_json::from_value(event).unwrap_or_else(|e| panic!("fixture: {e}")),
                    received_at: received,
                    client_ip: "176.29.1.1".parse().ok(),
                    user_agent: None,
                    accept_language: None,
                    dnt: false,
                    gpc: false,
                };
                Record {
                    key: None,
                    payload: env.to_bytes(),
                }
            })
            .collect();
        total += records.len();
        // one processor run per hundred: several commits, several files per date
        for chunk in records.chunks(100) {
            log.append(TOPIC_RAW, chunk.to_vec()).await?;
            let metrics = Arc::new(ProcessMetrics::new());
            let processor = Processor::new(config, log.clone(), Arc::default(), metrics.clone()).await?;
            let stop = CancellationToken::new();
            let run = tokio::spawn(processor.run(stop.clone()));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while metrics.events_written.get() < chunk.len() as u64 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.cancel();
            run.await??;
        }
    }
    Ok(total)
}

fn marsad(args: &[&str], data: &std::path::Path) -> Result<(bool, String, String)> {
    let out = Command::new(marsad_bin())
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn count(data: &std::path::Path, sql: &str) -> Result<i64> {
    let (ok, out, err) = marsad(&["sql", "-e", sql, "--format", "csv"], data)?;
    ensure!(ok, "{sql}: {err}");
    out.lines().nth(1).context("a value line")?.trim().parse().context(out)
}

fn parquet_files_of(dir: &std::path::Path, partition: &str) -> usize {
    std::fs::read_dir(dir.join(partition))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_compact_and_retention_on_a_real_data_dir() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let mut config = Config {
        data_dir: data.clone(),
        ..Config::default()
    };
    config.process.batch_max_interval_ms = 100;
    config.privacy.daily_key_grace_hours = 24 * 10;
    let total = fill(&config, &[5, 3, 0], 400).await?;

    // sql: csv, ndjson, table, parquet, a file, and a refusal
    assert_eq!(count(&data, "SELECT count(*) AS n FROM events")?, total as i64);
    let (ok, out, err) = marsad(
        &[
            "sql",
            "-e",
            "SELECT event_type, count(*) AS n FROM events GROUP BY 1 ORDER BY 1",
            "--format",
            "ndjson",
        ],
        &data,
    )?;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(err.contains("2 rows"), "summary line: {err}");
    let (ok, out, _) = marsad(&["sql", "-e", "SELECT 1 AS one"], &data)?;
    assert!(ok && out.contains("| one |"), "{out}");
    let file = tmp.path().join("q.sql");
    std::fs::write(
        &file,
        "SELECT page_category, visitor_key FROM events WHERE event_type = 'page_view'",
    )?;
    let parquet = tmp.path().join("out.parquet");
    let (ok, _, err) = marsad(
        &[
            "sql",
            "-f",
            file.to_str().context("path")?,
            "--format",
            "parquet",
            "-o",
            parquet.to_str().context("path")?,
        ],
        &data,
    )?;
    assert!(ok, "{err}");
    let reader = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&parquet)?)?;
    let rows = parquet::file::reader::FileReader::metadata(&reader)
        .file_metadata()
        .num_rows();
    assert_eq!(
        rows,
        count(&data, "SELECT count(*) FROM events WHERE event_type = 'page_view'")?
    );
    let (ok, _, err) = marsad(&["sql", "-e", "DROP TABLE events"], &data)?;
    assert!(!ok && err.contains("read-only"), "{err}");

    // compact: fewer files, same totals
    let events_dir = data.join("tables/events");
    let today = format!("date={}", Utc::now().date_naive());
    let before = parquet_files_of(&events_dir, &today);
    let rollup_rows = count(&data, "SELECT count(*) FROM traffic_hourly")?;
    let views = count(&data, "SELECT sum(events) FROM traffic_hourly")?;
    let (ok, out, err) = marsad(&["compact"], &data)?;
    assert!(ok, "{err}");
    assert!(out.contains("compacted: rollup rows"), "{out}");
    assert_eq!(count(&data, "SELECT count(*) FROM events")?, total as i64);
    assert_eq!(count(&data, "SELECT sum(events) FROM traffic_hourly")?, views);
    let merged_rows = count(&data, "SELECT count(*) FROM traffic_hourly")?;
    assert!(
        merged_rows < rollup_rows,
        "rollup rows merged: {rollup_rows} -> {merged_rows}: {out}"
    );
    assert!(before > 1, "several commits wrote several files");

    // retention: keep two days; the older dates are gone from every table and from disk
    let five_days_ago = format!("date={}", Utc::now().date_naive() - chrono::Duration::days(5));
    assert!(parquet_files_of(&events_dir, &five_days_ago) > 0);
    let (ok, out, err) = marsad(&["retention", "--keep-days", "2"], &data)?;
    assert!(ok, "{err}");
    assert!(out.contains("retention: kept"), "{out}");
    assert_eq!(
        count(&data, "SELECT count(*) FROM events")?,
        400,
        "only today's rows remain"
    );
    assert_eq!(views, total as i64, "no crawlers in the fixture");
    assert_eq!(count(&data, "SELECT sum(events) FROM traffic_hourly")?, 400);
    assert_eq!(
        count(
            &data,
            &format!(
                "SELECT count(*) FROM demographics_daily WHERE date < DATE '{}'",
                Utc::now().date_naive() - chrono::Duration::days(1)
            )
        )?,
        0
    );
    assert_eq!(
        parquet_files_of(&events_dir, &five_days_ago),
        0,
        "files removed from storage"
    );
    let (ok, _, err) = marsad(&["retention", "--keep-days", "0"], &data)?;
    assert!(!ok && err.contains("at least 1"), "{err}");
    Ok(())
}
