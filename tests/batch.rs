//! The data engineers' batch jobs on a real data dir: `marsad sql` in every
//! output format, `marsad compact`, `marsad retention` and `marsad backfill`.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use marsad_config::Config;
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
use marsad_process::{ProcessMetrics, Processor};
use marsad_schemas::TOPIC_RAW;
use tokio_util::sync::CancellationToken;

use crate::common::{fixture_envelope, marsad_bin};

/// `per_day` page views on each of the days `ages` days ago, over several commits.
async fn fill(config: &Config, ages: &[i64], per_day: usize) -> Result<usize> {
    fill_with(config, ages, per_day, |i| {
        if i % 2 == 0 {
            "https://kulshi.example/ar/سيارات/1"
        } else {
            "https://kulshi.example/en/jobs"
        }
    })
    .await
}

/// Like [`fill`], with the page of the `i`th event of a day from `url`.
async fn fill_with(
    config: &Config,
    ages: &[i64],
    per_day: usize,
    url: impl Fn(usize) -> &'static str,
) -> Result<usize> {
    let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    let mut total = 0;
    for &age in ages {
        let received = Utc::now() - chrono::Duration::days(age);
        let records: Vec<Record> = (0..per_day)
            .map(|i| {
                let event = serde_json::json!({
                    "type": if i % 5 == 0 { "ad_impression" } else { "page_view" },
                    "url": url(i),
                    "cookie_id": format!("c-{}", i % 40),
                    "event_id": format!("d{age}-{i}"),
                    "ad": {"ad_id": "ad-1", "campaign_id": "cmp-1", "placement": "top"},
                });
                let env = fixture_envelope(event, received);
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

/// The data files of `partition` (`date=…`) in the current version of `table`.
async fn active_files(config: &Config, table: &str, partition: &str) -> Result<usize> {
    let table = marsad_tables::open_table(&config.tables()?, table)
        .await?
        .context("the table exists")?;
    Ok(table
        .get_file_uris()?
        .filter(|uri| uri.contains(&format!("{partition}/")))
        .count())
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
    // every event counted once: the clamp is not what this test is about
    config.process.max_events_per_visitor_day = 1_000_000;
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
    let before = active_files(&config, "events", &today).await?;
    let traffic_before = active_files(&config, "traffic_hourly", &today).await?;
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
    assert!(before > 1 && traffic_before > 1, "several commits wrote several files");
    // the table now reads one file per date (the replaced ones stay on disk for time travel)
    assert_eq!(active_files(&config, "events", &today).await?, 1, "events files: {out}");
    assert_eq!(
        active_files(&config, "traffic_hourly", &today).await?,
        1,
        "traffic_hourly files: {out}"
    );
    assert!(
        parquet_files_of(&events_dir, &today) >= before,
        "nothing vacuumed by a compaction"
    );

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
    // a window reaching before the calendar's first day is an error, not a panic
    let (ok, _, err) = marsad(&["retention", "--keep-days", "4000000000"], &data)?;
    assert!(
        !ok && err.contains("before the calendar's first day") && !err.contains("panicked"),
        "{err}"
    );
    Ok(())
}

/// `marsad sql` writes rows as the query produces them: an export far larger than the memory
/// it is allowed ends with every row written and a small peak.
#[test]
fn marsad_sql_streams_an_export_larger_than_its_memory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let csv = tmp.path().join("big.csv");
    // 1,000,000 rows of about 220 bytes: 220 MB held if collected, and as much again rendered
    let sql = "SELECT value, repeat('x', 200) AS pad FROM generate_series(1, 1000000)";
    let (ok, _, err) = marsad(
        &["sql", "-e", sql, "--format", "csv", "-o", csv.to_str().context("path")?],
        &data,
    )?;
    ensure!(ok, "{err}");
    let peak: u64 = err
        .split("peak memory ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .context(format!("the summary gives the peak memory: {err}"))?;
    let written = std::fs::read_to_string(&csv)?;
    ensure!(written.lines().count() == 1_000_001, "a header and every row");
    ensure!(
        written
            .lines()
            .nth(1_000_000)
            .is_some_and(|l| l.starts_with("1000000,x"))
    );
    ensure!(peak < 150, "peak memory {peak} MiB for a 220 MB export: {err}");
    // the table format shows the first rows and says so
    let (ok, out, err) = marsad(&["sql", "-e", sql], &data)?;
    ensure!(ok && out.lines().count() < 1_100, "{err}");
    ensure!(err.contains("showing the first 1000 of 1000000 rows"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_rebuilds_dates_with_new_rules_idempotently() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let mut config = Config {
        data_dir: data.clone(),
        ..Config::default()
    };
    config.process.batch_max_interval_ms = 100;
    // every event counted once: the clamp is not what this test is about
    config.process.max_events_per_visitor_day = 1_000_000;
    config.privacy.daily_key_grace_hours = 24 * 10;
    // a third of the pages are about pets, a category the built-in rules do not know
    let per_day = 300;
    let total = fill_with(&config, &[3, 1, 0], per_day, |i| match i % 3 {
        0 => "https://kulshi.example/ar/حيوانات/قطط",
        1 => "https://kulshi.example/en/pets/dogs",
        _ => "https://kulshi.example/en/jobs/driver",
    })
    .await?;
    let today = Utc::now().date_naive();
    let day = |age: i64| today - chrono::Duration::days(age);
    assert_eq!(count(&data, "SELECT count(*) FROM events")?, total as i64);
    assert_eq!(
        count(&data, "SELECT count(*) FROM events WHERE page_category = 'pets'")?,
        0
    );
    let visitors_before = count(
        &data,
        &format!(
            "SELECT count(DISTINCT visitor_key) FROM events WHERE date = DATE '{}'",
            day(1)
        ),
    )?;

    // an `all` opt-out recorded since: the backfill leaves that visitor out of the rebuilt dates
    let keys = marsad_privacy::keys::SubjectKeys::load(&config)?;
    let opt_out = marsad_privacy::optout::OptOutRecord::new(
        &keys.optout,
        &keys.targeting,
        marsad_privacy::pseudonym::Subject::Cookie("c-7"),
        marsad_privacy::optout::OptOutScope::All,
    );
    let log = LocalLog::open(config.log_dir(), LocalLogOptions::default())?;
    log.append(
        marsad_schemas::TOPIC_OPTOUTS,
        vec![Record {
            key: Some(opt_out.log_key()),
            payload: opt_out.to_bytes(),
        }],
    )
    .await?;
    drop(log);
    let c7_per_day = (0..per_day).filter(|i| i % 40 == 7).count() as i64;

    // the site names pets a category: the config gains a rule, and the last two days are rebuilt
    let rules = tmp.path().join("pets.toml");
    std::fs::write(
        &rules,
        "[privacy]\ndaily_key_grace_hours = 240\n\n\
         [process]\nbatch_max_events = 100\n\n\
         [[process.page_categories]]\ncategory = \"pets\"\npath_segments = [\"pets\", \"حيوانات\"]\n\n\
         [[process.page_categories]]\ncategory = \"jobs\"\npath_segments = [\"jobs\", \"وظائف\"]\n",
    )?;
    let rules = rules.to_str().context("path")?;
    let range = [
        "backfill",
        "--config",
        rules,
        "--from",
        &day(1).to_string(),
        "--to",
        &today.to_string(),
    ];
    let (ok, out, err) = marsad(&range, &data)?;
    ensure!(ok, "backfill failed: {err}");
    ensure!(out.contains("backfilled"), "summary line: {out}");
    ensure!(
        out.contains(&format!("{} raw records read", total)),
        "reads the whole retained log: {out}"
    );
    // memory is a chunk of `process.batch_max_events`, not the log
    let held: usize = out
        .split("at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .context("the summary says how many events it held")?;
    ensure!(
        held > 0 && held <= 100 && total > 5 * 100,
        "held {held} events at once, of {total}: {out}"
    );
    let rebuilt = 2 * (per_day as i64 - c7_per_day);
    let pets_per_day = (0..per_day).filter(|i| i % 3 != 2 && i % 40 != 7).count() as i64;
    let check = |when: &str| -> Result<()> {
        ensure!(
            count(&data, "SELECT count(*) FROM events")? == per_day as i64 + rebuilt,
            "{when}: the older date untouched, the rebuilt dates without the opted-out visitor"
        );
        ensure!(
            count(&data, "SELECT count(*) - count(DISTINCT event_id) FROM events")? == 0,
            "{when}: no event twice"
        );
        ensure!(
            count(
                &data,
                &format!(
                    "SELECT count(*) FROM events WHERE page_category = 'pets' AND date >= DATE '{}'",
                    day(1)
                )
            )? == 2 * pets_per_day,
            "{when}: pets pages of the rebuilt dates are categorized"
        );
        ensure!(
            count(
                &data,
                &format!(
                    "SELECT count(*) FROM events WHERE page_category = 'pets' AND date = DATE '{}'",
                    day(3)
                )
            )? == 0,
            "{when}: a date outside the range keeps its rows"
        );
        ensure!(
            count(&data, "SELECT sum(events) FROM traffic_hourly")? == count(&data, "SELECT count(*) FROM events")?,
            "{when}: traffic_hourly agrees with events"
        );
        ensure!(
            count(
                &data,
                "SELECT sum(events) FROM traffic_hourly WHERE page_category = 'pets'"
            )? == 2 * pets_per_day,
            "{when}: the rollup has the new category"
        );
        ensure!(
            count(&data, "SELECT sum(impressions) FROM ad_performance_hourly")?
                == count(&data, "SELECT count(*) FROM events WHERE event_type = 'ad_impression'")?,
            "{when}: ad_performance_hourly agrees with events"
        );
        ensure!(
            count(&data, "SELECT sum(events) FROM demographics_daily")? == count(&data, "SELECT count(*) FROM events")?,
            "{when}: demographics_daily agrees with events"
        );
        ensure!(
            count(
                &data,
                &format!(
                    "SELECT count(DISTINCT visitor_key) FROM events WHERE date = DATE '{}'",
                    day(1)
                )
            )? == visitors_before - 1,
            "{when}: the same visitor keys (the day's key still exists), less the opted-out one"
        );
        Ok(())
    };
    check("after the backfill")?;
    // run again: the same rows, nothing twice
    let (ok, out, err) = marsad(&range, &data)?;
    ensure!(ok, "second backfill failed: {err}");
    ensure!(
        out.contains(&format!("events counted {rebuilt} → {rebuilt}")),
        "idempotent: {out}"
    );
    check("after a second backfill")?;

    // refusals, each with its reason
    let (ok, _, err) = marsad(&["backfill", "--config", rules, "--from", &day(30).to_string()], &data)?;
    ensure!(!ok && err.contains("visitor key") && err.contains("destroyed"), "{err}");
    let (ok, _, err) = marsad(
        &[
            "backfill",
            "--config",
            rules,
            "--from",
            &today.to_string(),
            "--to",
            &day(1).to_string(),
        ],
        &data,
    )?;
    ensure!(!ok && err.contains("is after"), "{err}");
    let (ok, _, err) = marsad(&["backfill", "--config", rules, "--from", &day(-1).to_string()], &data)?;
    ensure!(!ok && err.contains("future"), "{err}");
    Ok(())
}

/// `marsad up` compacts on its own while events keep arriving: a date of `events` that
/// gathered small files is rewritten into one, and the rollups' partial rows are merged to
/// one row per key, every count unchanged: what a report reads stays small at any moment,
/// with no operator running `marsad compact`.
#[test]
fn up_compacts_its_tables_without_an_operator() -> Result<()> {
    // the table's files are read with deltalake on a runtime of the test's own
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let config = Config {
        data_dir: data.clone(),
        ..Config::default()
    };
    let m = crate::common::Marsad::start_with_env(
        &data,
        None,
        None,
        &[
            ("MARSAD_PROCESS__BATCH_MAX_INTERVAL_MS", "50".into()),
            ("MARSAD_PROCESS__ROLLUP_COMPACTION_INTERVAL_SECS", "1".into()),
            // the rollups commit with every batch, each a partial row per key to merge
            ("MARSAD_PROCESS__ROLLUP_COMMIT_INTERVAL_MS", "0".into()),
            ("MARSAD_PROCESS__EVENTS_COMPACTION_MIN_FILES", "4".into()),
        ],
    )?;
    let client = reqwest::blocking::Client::new();
    let today = format!("date={}", Utc::now().date_naive());
    let (batches, per_batch): (i64, i64) = (10, 30);
    let (mut most_files, mut most_rollup_rows) = (0, 0);
    for b in 0..batches {
        let events: Vec<serde_json::Value> = (0..per_batch)
            .map(|i| {
                serde_json::json!({"type": "page_view", "url": format!("https://kulshi.example/en/cars/{}", i % 3),
                    "cookie_id": format!("c-{b}-{i}"), "event_id": format!("e-{b}-{i}")})
            })
            .collect();
        let sent = client
            .post(format!("{}/v1/batch", m.ingest))
            .header(
                "user-agent",
                "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0",
            )
            .json(&events)
            .send()?;
        ensure!(sent.status().as_u16() == 202, "{}", sent.status());
        // each batch its own commit, so its own small file
        m.wait_for_count(
            "SELECT count(*) FROM events",
            (b + 1) * per_batch,
            Duration::from_secs(30),
        )?;
        most_files = most_files.max(runtime.block_on(active_files(&config, "events", &today))?);
        most_rollup_rows = most_rollup_rows.max(m.sql_count("SELECT count(*) FROM traffic_hourly")?);
    }
    let total = batches * per_batch;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let files = runtime.block_on(active_files(&config, "events", &today))?;
        let rollup_files = runtime.block_on(active_files(&config, "traffic_hourly", &today))?;
        if files < 4 && rollup_files < 4 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "still {files} events files and {rollup_files} rollup files (most: {most_files}): {}",
            m.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    ensure!(most_files >= 4, "the batches were several commits: {most_files}");
    ensure!(m.sql_count("SELECT count(*) FROM events")? == total, "events kept");
    // (the rollups commit after `events`, and the query service re-reads a table at most every
    // `query.table_refresh_ms`: their total arrives a moment later)
    m.wait_for_count("SELECT sum(events) FROM traffic_hourly", total, Duration::from_secs(30))
        .context("rollup totals kept")?;
    // partial rows merged: a key has one row, plus one per commit since the last merge (a
    // date is merged once it has 4 files), not one per commit of the day
    let keys = m.sql_count(
        "SELECT count(*) FROM (SELECT DISTINCT hour, country, region, device_type, os, browser, language, \
         page_category, referrer_domain, event_type FROM traffic_hourly)",
    )?;
    let rows = m.sql_count("SELECT count(*) FROM traffic_hourly")?;
    ensure!(
        rows <= 3 * keys && rows < most_rollup_rows,
        "{rows} rollup rows for {keys} keys (most: {most_rollup_rows})"
    );
    Ok(())
}
