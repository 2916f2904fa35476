//! Rollups against `events` on a real local log and real Delta tables: the
//! totals agree exactly (events, sessions, bounces, session seconds,
//! impressions, clicks) and visitors within the HLL error, also after the
//! processor dies between the `events` commit and the rollup commits.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use arrow::array::{Array, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
use chrono::{DateTime, Utc};
use marsad_config::Config;
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
use marsad_process::rollup::CrashPoint;
use marsad_process::{ProcessMetrics, Processor};
use marsad_query::TableCatalog;
use marsad_schemas::{ENVELOPE_VERSION, Envelope, TOPIC_RAW};
use tokio_util::sync::CancellationToken;

/// The site's own domain: a session landing from it is `direct`.
const SITE: &str = "kulshi.example";

const BROWSER: &str =
    "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Mobile Safari/537.36";
const CRAWLER: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

/// Sessions of the people in [`population`]: one, plus one per 45-minute pause.
fn expected_sessions() -> i64 {
    (0..60u32)
        .filter(|v| v % 12 != 0)
        .map(|v| 1 + (1..(3 + v % 9)).filter(|e| e % 4 == 3).count() as i64)
        .sum()
}

/// The moment [`population`]'s four hours end: now, or the last minute of yesterday when
/// the four hours would cross midnight UTC. A visitor's pseudonym is keyed by the day, so a
/// visit across midnight is two visitors and two sessions, and the expected counts assume
/// one day (the tests failed between 00:00 and about 04:00 UTC).
fn fixture_now() -> DateTime<Utc> {
    let now = Utc::now();
    let start = now - chrono::Duration::minutes(250);
    if start.date_naive() == now.date_naive() {
        return now;
    }
    now.date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|midnight| midnight.and_utc() - chrono::Duration::minutes(1))
        .unwrap_or(start)
}

/// A deterministic population: 60 visitors (5 of them crawlers) over four hours, with
/// gaps that split sessions, pages of several categories, and ad impressions and clicks.
fn population(now: DateTime<Utc>) -> Vec<Record> {
    population_with_times(now).into_iter().map(|(_, r)| r).collect()
}

/// [`population`] as the site would send it: every visitor's events interleaved in time order,
/// so a cut anywhere leaves sessions open across it.
fn population_in_time_order(now: DateTime<Utc>) -> Vec<Record> {
    let mut timed = population_with_times(now);
    timed.sort_by_key(|(ts, _)| *ts);
    timed.into_iter().map(|(_, r)| r).collect()
}

/// [`population`], each record with its event time.
fn population_with_times(now: DateTime<Utc>) -> Vec<(DateTime<Utc>, Record)> {
    let pages = [
        "/ar/سيارات/كيا",
        "/en/jobs/driver",
        "/en/real-estate/amman",
        "/",
        "/ar/أثاث",
    ];
    let mut out = Vec::new();
    for v in 0..60u32 {
        let ua = if v % 12 == 0 { CRAWLER } else { BROWSER };
        let mut minute = (v * 7 % 40) as i64;
        for e in 0..(3 + v % 9) {
            // a 45-minute pause now and then starts a new session
            minute += if e % 4 == 3 { 45 } else { 1 + (v + e) as i64 % 6 };
            let ts = now - chrono::Duration::minutes(240) + chrono::Duration::minutes(minute);
            let kind = match (v + e) % 10 {
                0 => "ad_impression",
                1 if v % 2 == 0 => "ad_click",
                _ => "page_view",
            };
            let mut event = serde_json::json!({
                "type": kind,
                "url": format!("https://kulshi.example{}", pages[((v + e) % 5) as usize]),
                "cookie_id": format!("c-{v}"),
                "event_id": format!("ev-{v}-{e}"),
                "ts": ts.to_rfc3339(),
                "consent": {"analytics": true, "personalisation": true, "marketing": false},
            });
            // each visitor's first visit lands from somewhere (search, social, an e-mail, a
            // site, nowhere); later sessions and internal navigation are the site's own
            if e == 0 {
                match v % 5 {
                    1 => event["referrer"] = "https://www.google.com.sa/search?q=kia".into(),
                    2 => event["referrer"] = "https://l.facebook.com/".into(),
                    3 => {
                        event["url"] = format!(
                            "https://kulshi.example{}?utm_source=newsletter&utm_medium=email&utm_campaign=nov",
                            pages[(v % 5) as usize]
                        )
                        .into()
                    }
                    4 => event["referrer"] = "https://opensooq.example/cars".into(),
                    _ => {}
                }
            } else {
                event["referrer"] = "https://kulshi.example/".into();
            }
            if kind != "page_view" {
                event["ad"] =
                    serde_json::json!({"ad_id": format!("ad-{}", v % 3), "campaign_id": "cmp-1", "placement": "top"});
            }
            let env = Envelope {
                v: ENVELOPE_VERSION,
                event: serde_json::from_value(event).unwrap_or_else(|e| panic!("fixture event: {e}")),
                received_at: now,
                client_ip: format!("176.29.{}.{}", v % 200, 1 + e % 200).parse().ok(),
                user_agent: Some(ua.into()),
                accept_language: Some("ar-JO,ar;q=0.9".into()),
                dnt: false,
                gpc: false,
            };
            out.push((
                ts,
                Record {
                    key: None,
                    payload: env.to_bytes(),
                },
            ));
        }
    }
    out
}

/// Runs a processor until it has written `want` new rows or crashed as told.
async fn run_processor(config: &Config, log: Arc<LocalLog>, want: u64, crash: Option<CrashPoint>) -> Result<()> {
    let metrics = Arc::new(ProcessMetrics::new());
    let mut processor = Processor::new(config, log, Arc::default(), metrics.clone()).await?;
    if let Some(point) = crash {
        processor = processor.crash_at(0, point);
    }
    let stop = CancellationToken::new();
    let run = tokio::spawn(processor.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !run.is_finished() && metrics.events_written.get() < want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    match (run.await?, crash) {
        (Err(marsad_process::Error::SimulatedCrash), Some(_)) => Ok(()),
        (Ok(()), None) => {
            ensure!(
                metrics.events_written.get() >= want,
                "only {} rows written",
                metrics.events_written.get()
            );
            Ok(())
        }
        (other, _) => anyhow::bail!("processor ended with {other:?} (crash point {crash:?})"),
    }
}

async fn query(catalog: &TableCatalog, sql: &str) -> Result<Vec<arrow::record_batch::RecordBatch>> {
    let ctx = catalog.session().await?;
    Ok(ctx.sql(sql).await?.collect().await?)
}

async fn int(catalog: &TableCatalog, sql: &str) -> Result<i64> {
    let b = query(catalog, sql).await?;
    let col = b[0].column(0);
    let col = arrow::compute::cast(col, &arrow::datatypes::DataType::Int64)?;
    let a = col.as_any().downcast_ref::<Int64Array>().context("an integer")?;
    Ok(if a.is_null(0) { 0 } else { a.value(0) })
}

async fn float(catalog: &TableCatalog, sql: &str) -> Result<f64> {
    let b = query(catalog, sql).await?;
    let a = b[0]
        .column(0)
        .as_any()
        .downcast_ref::<Float64Array>()
        .context("a float")?;
    Ok(a.value(0))
}

/// Sessions, bounces and whole session seconds computed from the raw rows.
async fn sessions_from_events(catalog: &TableCatalog) -> Result<(i64, i64, i64)> {
    let batches = query(catalog, "SELECT session_id, ts FROM events WHERE NOT is_bot").await?;
    let mut spans: HashMap<String, (i64, i64, i64)> = HashMap::new();
    for b in &batches {
        let ids = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
        let ids = ids.as_any().downcast_ref::<StringArray>().context("ids")?;
        let ts = b
            .column(1)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .context("ts")?;
        for i in 0..b.num_rows() {
            let e = spans.entry(ids.value(i).to_owned()).or_insert((i64::MAX, i64::MIN, 0));
            e.0 = e.0.min(ts.value(i));
            e.1 = e.1.max(ts.value(i));
            e.2 += 1;
        }
    }
    let bounces = spans.values().filter(|s| s.2 == 1).count() as i64;
    let seconds = spans.values().map(|s| (s.1 - s.0) / 1_000_000).sum();
    Ok((spans.len() as i64, bounces, seconds))
}

/// A processor's config on `dir` that commits often (the rollups with every `events` commit)
/// and counts every event once (the clamp is not what the crash tests are about), and its
/// local log.
fn counting_every_event(dir: &std::path::Path) -> Result<(Config, Arc<LocalLog>)> {
    let mut config = Config {
        data_dir: dir.to_owned(),
        ..Config::default()
    };
    config.process.batch_max_interval_ms = 100;
    config.process.max_events_per_visitor_day = 1_000_000;
    config.process.channels.own_domains = vec![SITE.into()];
    // each `events` commit reaches the rollups at once (where the crash points are)
    config.process.rollup_commit_interval_ms = 0;
    let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    Ok((config, log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_events_across_crashes_between_commits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (config, log) = counting_every_event(dir.path())?;
    let records = population(fixture_now());
    let third = records.len() / 3;
    let mut parts = records.chunks(third + 1);

    // dies right after the events commit: no rollup has counted the first part
    log.append(TOPIC_RAW, parts.next().context("part")?.to_vec()).await?;
    run_processor(&config, log.clone(), 1, Some(CrashPoint::AfterEvents)).await?;
    // catches the first part up, then dies after traffic_hourly counted the second
    log.append(TOPIC_RAW, parts.next().context("part")?.to_vec()).await?;
    run_processor(&config, log.clone(), 1, Some(CrashPoint::AfterRollups(1))).await?;
    // catches the other rollups up and processes the rest normally
    let last = parts.next().context("part")?.to_vec();
    let want = last.len() as u64;
    log.append(TOPIC_RAW, last).await?;
    run_processor(&config, log.clone(), want, None).await?;

    let catalog = TableCatalog::new(config.tables()?);
    check_totals(&catalog, records.len() as i64).await?;

    // compaction merges the partial rows into one per key; every total stays the same
    let compacted = marsad_process::rollup::compact(&config.tables()?, 2).await?;
    assert!(!compacted.is_empty(), "three commits left several files per date");
    for c in &compacted {
        assert!(c.rows_after < c.rows_before, "{c:?}");
    }
    let rows = int(&catalog, "SELECT count(*) FROM traffic_hourly").await?;
    let keys = int(
        &catalog,
        "SELECT count(*) FROM (SELECT DISTINCT hour, country, region, device_type, os, browser, language, \
         page_category, referrer_domain, event_type FROM traffic_hourly)",
    )
    .await?;
    assert_eq!(rows, keys, "one row per key after compaction");
    check_totals(&catalog, records.len() as i64).await?;
    sketches_are_written_for_reports(&config.tables()?)
}

/// Every rollup file, appended or rewritten, holds its visitor sketches as the reports read
/// them fastest: uncompressed, no dictionary.
fn sketches_are_written_for_reports(location: &marsad_config::TablesLocation) -> Result<()> {
    use parquet::basic::{Compression, Encoding};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let root = location.local_dir().context("a local location")?;
    let mut pending = vec![root.to_path_buf()];
    let mut checked = 0;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() && !path.ends_with("events") {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                let reader = SerializedFileReader::new(std::fs::File::open(&path)?)?;
                for group in reader.metadata().row_groups() {
                    for column in group
                        .columns()
                        .iter()
                        .filter(|c| c.column_path().string() == "visitors")
                    {
                        ensure!(
                            column.compression() == Compression::UNCOMPRESSED,
                            "{}: {:?}",
                            path.display(),
                            column.compression()
                        );
                        let dictionary = column
                            .encodings()
                            .any(|e| matches!(e, Encoding::RLE_DICTIONARY | Encoding::PLAIN_DICTIONARY));
                        ensure!(!dictionary, "{}: a dictionary of sketches", path.display());
                        checked += 1;
                    }
                }
            }
        }
    }
    ensure!(checked > 10, "only {checked} sketch columns found");
    Ok(())
}

/// The rollups commit less often than `events` (`process.rollup_commit_interval_ms`): a
/// processor killed between their commits loses nothing (the next one catches them up from
/// `events`), and one stopped commits what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_committed_less_often_than_events_lose_nothing_to_a_kill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut config, log) = counting_every_event(dir.path())?;
    config.process.rollup_commit_interval_ms = 600_000;
    let records = population(fixture_now());
    let half = records.len() / 2;
    let metrics = Arc::new(ProcessMetrics::new());
    let processor = Processor::new(&config, log.clone(), Arc::default(), metrics.clone()).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn(processor.run(stop.clone()));
    // the first half in four parts, each its own `events` commit
    let mut written = 0;
    for part in records[..half].chunks(half.div_ceil(4)) {
        written += part.len() as u64;
        log.append(TOPIC_RAW, part.to_vec()).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while metrics.events_written.get() < written && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(
            metrics.events_written.get() >= written,
            "the first half was not written"
        );
    }
    ensure!(metrics.commits.get() >= 2, "one commit: nothing to defer");
    let catalog = TableCatalog::new(config.tables()?);
    assert_eq!(int(&catalog, "SELECT count(*) FROM events").await?, half as i64);
    assert_eq!(
        int(&catalog, "SELECT count(*) FROM traffic_hourly").await?,
        0,
        "the rollups committed before their interval"
    );
    // killed: no shutdown, nothing flushed (then its log reader, a task of its own, stopped)
    run.abort();
    let _ = run.await;
    stop.cancel();

    let rest = records[half..].to_vec();
    let want = rest.len() as u64;
    log.append(TOPIC_RAW, rest).await?;
    run_processor(&config, log.clone(), want, None).await?;
    check_totals(&TableCatalog::new(config.tables()?), records.len() as i64).await
}

/// On a quiet site the rollups still commit within their interval: no later event is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_commit_on_a_quiet_site_without_a_later_event() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut config, log) = counting_every_event(dir.path())?;
    config.process.rollup_commit_interval_ms = 1_500;
    let records = population(fixture_now());
    log.append(TOPIC_RAW, records.clone()).await?;
    let metrics = Arc::new(ProcessMetrics::new());
    let processor = Processor::new(&config, log.clone(), Arc::default(), metrics.clone()).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn(processor.run(stop.clone()));
    let catalog = TableCatalog::new(config.tables()?);
    // every event written, then no event more: the rollups commit on their timer
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        ensure!(!run.is_finished(), "the processor stopped");
        ensure!(tokio::time::Instant::now() < deadline, "the rollups never committed");
        if metrics.events_written.get() >= records.len() as u64 {
            let people = int(&catalog, "SELECT count(*) FROM events WHERE NOT is_bot").await?;
            let counted = int(&catalog, "SELECT sum(events) FROM traffic_hourly").await?;
            if counted == people {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    run.await??;
    check_totals(&catalog, records.len() as i64).await
}

/// Every total of the rollups equals the same total over `events`.
async fn check_totals(catalog: &TableCatalog, records: i64) -> Result<()> {
    let stored = int(catalog, "SELECT count(*) FROM events").await?;
    assert_eq!(stored, records, "every event stored once");
    let people = int(catalog, "SELECT count(*) FROM events WHERE NOT is_bot").await?;
    assert!(people < stored, "the fixture has crawlers");

    assert_eq!(int(catalog, "SELECT sum(events) FROM traffic_hourly").await?, people);
    assert_eq!(
        int(catalog, "SELECT sum(events) FROM demographics_daily").await?,
        people
    );
    for (kind, column) in [("ad_impression", "impressions"), ("ad_click", "clicks")] {
        let raw = int(
            catalog,
            &format!("SELECT count(*) FROM events WHERE NOT is_bot AND event_type = '{kind}'"),
        )
        .await?;
        assert!(raw > 0, "the fixture has {kind}s");
        let rolled = int(catalog, &format!("SELECT sum({column}) FROM ad_performance_hourly")).await?;
        assert_eq!(rolled, raw, "{column}");
    }
    let per_category = query(
        catalog,
        "SELECT e.page_category, e.n, r.n FROM \
         (SELECT page_category, count(*) AS n FROM events WHERE NOT is_bot GROUP BY page_category) e \
         JOIN (SELECT page_category, sum(events) AS n FROM traffic_hourly GROUP BY page_category) r \
         ON e.page_category = r.page_category",
    )
    .await?;
    let rows: usize = per_category.iter().map(|b| b.num_rows()).sum();
    assert!(rows >= 4, "categories in Arabic and English paths");
    for b in &per_category {
        let (e, r) = (b.column(1), b.column(2));
        let e = arrow::compute::cast(e, &arrow::datatypes::DataType::Int64)?;
        let r = arrow::compute::cast(r, &arrow::datatypes::DataType::Int64)?;
        assert_eq!(e.as_ref(), r.as_ref(), "per-category totals");
    }
    let hours = int(catalog, "SELECT count(DISTINCT hour) FROM traffic_hourly").await?;
    assert!(hours >= 3, "the fixture spans several hours: {hours}");

    let (sessions, bounces, seconds) = sessions_from_events(catalog).await?;
    assert_eq!(
        int(catalog, "SELECT sum(sessions) FROM traffic_hourly").await?,
        sessions
    );
    assert_eq!(int(catalog, "SELECT sum(bounces) FROM traffic_hourly").await?, bounces);
    assert_eq!(
        int(catalog, "SELECT sum(session_seconds) FROM traffic_hourly").await?,
        seconds
    );
    // a visitor whose events straddle a processor restart keeps one session
    assert_eq!(sessions, expected_sessions(), "sessions continue across restarts");

    check_sources_and_pages(catalog, (sessions, bounces, seconds)).await?;

    let visitors = int(
        catalog,
        "SELECT count(DISTINCT visitor_key) FROM events WHERE NOT is_bot",
    )
    .await?;
    for table in [
        "traffic_hourly",
        "ad_performance_hourly",
        "demographics_daily",
        "sources_hourly",
        "pages_hourly",
    ] {
        let estimate = float(
            catalog,
            &format!("SELECT hll_estimate(hll_merge(visitors)) FROM {table}"),
        )
        .await?;
        let exact = if table == "ad_performance_hourly" {
            int(
                catalog,
                "SELECT count(DISTINCT visitor_key) FROM events WHERE NOT is_bot AND event_type IN ('ad_impression', 'ad_click')",
            )
            .await?
        } else {
            visitors
        };
        // lg_k 12 is exact-ish at this size (list/set mode); 3 sigma of 1.6% is the bound in general
        let bound = (exact as f64 * 0.05).max(1.0);
        assert!(
            (estimate - exact as f64).abs() <= bound,
            "{table}: estimate {estimate} vs {exact} distinct visitors"
        );
    }
    Ok(())
}

/// Every rollup's rows summed per key (dimensions and time), as text, leaving out keys whose
/// sums are all zero (a moved exit leaves a -1/+1 pair in the cell it left).
async fn sums_per_key(catalog: &TableCatalog) -> Result<std::collections::BTreeMap<&'static str, String>> {
    let mut out = std::collections::BTreeMap::new();
    for table in marsad_schemas::TableName::ROLLUPS {
        let schema = table.schema();
        let (mut keys, mut sums) = (Vec::new(), Vec::new());
        for f in schema.fields() {
            match f.data_type() {
                arrow::datatypes::DataType::Int64 => sums.push(f.name().clone()),
                arrow::datatypes::DataType::Binary => {}
                _ => keys.push(f.name().clone()),
            }
        }
        let sql = format!(
            "SELECT {k}, {s} FROM {t} GROUP BY {k} HAVING {nonzero} ORDER BY {k}",
            k = keys.join(", "),
            s = sums
                .iter()
                .map(|m| format!("sum({m}) AS {m}"))
                .collect::<Vec<_>>()
                .join(", "),
            t = table.as_str(),
            nonzero = sums
                .iter()
                .map(|m| format!("sum({m}) <> 0"))
                .collect::<Vec<_>>()
                .join(" OR "),
        );
        let batches = query(catalog, &sql).await?;
        out.insert(
            table.as_str(),
            arrow::util::pretty::pretty_format_batches(&batches)?.to_string(),
        );
    }
    Ok(out)
}

/// A goal and a funnel the population reaches, so their tables have rows to compare.
fn with_goals_and_funnels(config: &mut Config) {
    let step = |event_type: &str, category: Option<&str>| marsad_config::EventMatch {
        event_type: Some(event_type.into()),
        page_category: category.map(str::to_owned),
        ..Default::default()
    };
    config.process.goals = vec![marsad_config::GoalDefinition {
        id: "clicked".into(),
        description: String::new(),
        event_type: Some("ad_click".into()),
        page_category: None,
        path: None,
        campaign_id: None,
    }];
    config.process.funnels = vec![marsad_config::FunnelDefinition {
        id: "cars-ad-click".into(),
        description: String::new(),
        steps: vec![
            step("page_view", Some("cars")),
            step("ad_impression", None),
            step("ad_click", None),
        ],
    }];
}

/// Sessions open across a stop and across a crash between two rollups' commits count once in
/// every rollup: the rollups of three processors (stopped, crashed after the second rollup
/// committed, then run to the end) equal those of one processor that saw everything, key by
/// key, in every table (sessions, bounces, durations, channels, entries, exits, funnel steps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_open_across_a_stop_and_a_crash_count_once_in_every_rollup() -> Result<()> {
    let records = population_in_time_order(fixture_now());
    let once_dir = tempfile::tempdir()?;
    let (mut config, log) = counting_every_event(once_dir.path())?;
    with_goals_and_funnels(&mut config);
    log.append(TOPIC_RAW, records.clone()).await?;
    run_processor(&config, log, records.len() as u64, None).await?;
    let once = sums_per_key(&TableCatalog::new(config.tables()?)).await?;

    let split_dir = tempfile::tempdir()?;
    let (mut config, log) = counting_every_event(split_dir.path())?;
    with_goals_and_funnels(&mut config);
    let third = records.len() / 3;
    let mut parts = records.chunks(third + 1);
    let first = parts.next().context("part")?.to_vec();
    let want = first.len() as u64;
    log.append(TOPIC_RAW, first).await?;
    run_processor(&config, log.clone(), want, None).await?;
    log.append(TOPIC_RAW, parts.next().context("part")?.to_vec()).await?;
    run_processor(&config, log.clone(), 1, Some(CrashPoint::AfterRollups(2))).await?;
    let last = parts.next().context("part")?.to_vec();
    let want = last.len() as u64;
    log.append(TOPIC_RAW, last).await?;
    run_processor(&config, log.clone(), want, None).await?;
    let catalog = TableCatalog::new(config.tables()?);
    assert_eq!(
        int(&catalog, "SELECT count(*) FROM events").await?,
        records.len() as i64
    );
    let split = sums_per_key(&catalog).await?;
    for (table, rows) in &once {
        assert!(rows.lines().count() > 4, "{table} has rows: {rows}");
        assert_eq!(split.get(table), Some(rows), "{table}: three processors against one");
    }
    Ok(())
}

/// `(text key, count)` rows of `sql` as a map.
async fn counts(catalog: &TableCatalog, sql: &str) -> Result<std::collections::BTreeMap<String, i64>> {
    let mut out = std::collections::BTreeMap::new();
    for b in query(catalog, sql).await? {
        let keys = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
        let keys = keys.as_any().downcast_ref::<StringArray>().context("keys")?;
        let n = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Int64)?;
        let n = n.as_any().downcast_ref::<Int64Array>().context("counts")?;
        for i in 0..b.num_rows() {
            let key = if keys.is_null(i) {
                "NULL".to_owned()
            } else {
                keys.value(i).to_owned()
            };
            *out.entry(key).or_default() += n.value(i);
        }
    }
    Ok(out)
}

/// `sources_hourly` and `pages_hourly` against what `events` says: sessions, bounces and
/// durations as traffic counts them; each session in the channel of its landing event (the
/// grouping applied here to the landing events read back from `events`); entries and exits on
/// the first and last page view of every session.
async fn check_sources_and_pages(catalog: &TableCatalog, (sessions, bounces, seconds): (i64, i64, i64)) -> Result<()> {
    for (measure, want) in [
        ("sessions", sessions),
        ("bounces", bounces),
        ("session_seconds", seconds),
    ] {
        let got = int(catalog, &format!("SELECT sum({measure}) FROM sources_hourly")).await?;
        assert_eq!(got, want, "sources_hourly {measure}");
    }
    let people = int(catalog, "SELECT count(*) FROM events WHERE NOT is_bot").await?;
    assert_eq!(int(catalog, "SELECT sum(events) FROM sources_hourly").await?, people);
    let page_views = int(
        catalog,
        "SELECT count(*) FROM events WHERE NOT is_bot AND event_type = 'page_view'",
    )
    .await?;
    assert_eq!(
        int(catalog, "SELECT sum(page_views) FROM sources_hourly").await?,
        page_views
    );
    assert_eq!(
        int(catalog, "SELECT sum(page_views) FROM pages_hourly").await?,
        page_views
    );

    // the landing event of each session, and the channel the documented rules give it
    let landings = query(
        catalog,
        "SELECT referrer_domain, utm_source, utm_medium FROM (SELECT referrer_domain, utm_source, utm_medium, \
         row_number() OVER (PARTITION BY session_id ORDER BY ts, event_id) AS n FROM events WHERE NOT is_bot) WHERE n = 1",
    )
    .await?;
    let rules = marsad_config::ChannelRules {
        own_domains: vec![SITE.into()],
        ..Default::default()
    };
    let grouping = marsad_process::channel::ChannelGrouping::new(&rules);
    let mut by_channel: std::collections::BTreeMap<String, i64> = Default::default();
    for b in &landings {
        let text = |c: usize| -> Result<StringArray> {
            let a = arrow::compute::cast(b.column(c), &arrow::datatypes::DataType::Utf8)?;
            Ok(a.as_any().downcast_ref::<StringArray>().context("text")?.clone())
        };
        let (referrer, source, medium) = (text(0)?, text(1)?, text(2)?);
        let get = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_owned());
        for i in 0..b.num_rows() {
            let (r, s, m) = (get(&referrer, i), get(&source, i), get(&medium, i));
            let channel = grouping.channel(marsad_process::channel::Source {
                referrer_domain: r.as_deref(),
                utm_source: s.as_deref(),
                utm_medium: m.as_deref(),
            });
            *by_channel.entry(channel.to_owned()).or_default() += 1;
        }
    }
    let rolled = counts(
        catalog,
        "SELECT channel, sum(sessions) FROM sources_hourly GROUP BY channel",
    )
    .await?;
    let rolled: std::collections::BTreeMap<String, i64> = rolled.into_iter().filter(|(_, n)| *n != 0).collect();
    assert_eq!(rolled, by_channel, "sessions per channel");
    for channel in ["organic_search", "social", "email", "referral", "direct"] {
        assert!(
            by_channel.contains_key(channel),
            "the fixture lands from {channel}: {by_channel:?}"
        );
    }
    let email = int(
        catalog,
        "SELECT sum(sessions) FROM sources_hourly WHERE utm_campaign = 'nov' AND utm_source = 'newsletter'",
    )
    .await?;
    assert_eq!(
        Some(&email),
        by_channel.get("email"),
        "the UTM tags are kept with the channel"
    );
    // a session that began on a tab left open lands from the site itself: direct, not a referral
    let from_the_site = int(
        catalog,
        "SELECT coalesce(sum(sessions), 0) FROM sources_hourly WHERE referrer_domain = 'kulshi.example' AND channel = 'direct'",
    )
    .await?;
    assert!(from_the_site > 0, "the fixture has sessions after a pause");
    assert_eq!(
        int(
            catalog,
            "SELECT coalesce(sum(sessions), 0) FROM sources_hourly WHERE referrer_domain = 'kulshi.example' AND channel <> 'direct'"
        )
        .await?,
        0
    );

    let first_or_last = |order: &str| {
        format!(
            "SELECT page_path, count(*) FROM (SELECT page_path, row_number() OVER (PARTITION BY session_id \
             ORDER BY ts {order}, event_id {order}) AS n FROM events WHERE NOT is_bot AND event_type = 'page_view') \
             WHERE n = 1 GROUP BY page_path"
        )
    };
    let nonzero = |m: std::collections::BTreeMap<String, i64>| -> std::collections::BTreeMap<String, i64> {
        m.into_iter().filter(|(_, n)| *n != 0).collect()
    };
    for (measure, order) in [("entries", "ASC"), ("exits", "DESC")] {
        let truth = counts(catalog, &first_or_last(order)).await?;
        let rolled = counts(
            catalog,
            &format!("SELECT page_path, sum({measure}) FROM pages_hourly GROUP BY page_path"),
        )
        .await?;
        assert_eq!(nonzero(rolled), truth, "{measure} per page");
    }
    let views = counts(
        catalog,
        "SELECT page_path, count(*) FROM events WHERE NOT is_bot AND event_type = 'page_view' GROUP BY page_path",
    )
    .await?;
    let rolled = counts(
        catalog,
        "SELECT page_path, sum(page_views) FROM pages_hourly GROUP BY page_path",
    )
    .await?;
    assert_eq!(nonzero(rolled), views, "page views per page");
    assert!(views.len() >= 4, "Arabic and English paths: {views:?}");
    Ok(())
}

/// The clamp: one visitor adds at most `max_events_per_visitor_day` events a day to each
/// rollup (every event stays in `events`), also across a restart of the processor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_visitor_adds_at_most_the_clamp_to_the_rollups() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    config.process.batch_max_interval_ms = 100;
    config.process.max_events_per_visitor_day = 3;
    let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    // (its events, 30 and 20 minutes old, on one day: the clamp is per visitor and day)
    let now = fixture_now();
    let event = |cookie: &str, i: usize, kind: &str, minutes_ago: i64| -> Record {
        let mut event = serde_json::json!({
            "type": kind, "url": "https://kulshi.example/ar/سيارات/1", "cookie_id": cookie,
            "event_id": format!("{cookie}-{i}"),
            "ts": (now - chrono::Duration::minutes(minutes_ago)).to_rfc3339(),
        });
        if kind != "page_view" {
            event["ad"] = serde_json::json!({"ad_id": "ad-1", "campaign_id": "cmp-1", "placement": "top"});
        }
        Record {
            key: None,
            payload: crate::common::fixture_envelope(event, now).to_bytes(),
        }
    };
    // a busy visitor: 8 page views and 4 impressions; a quiet one: 2 page views
    let mut records: Vec<Record> = (0..8).map(|i| event("busy", i, "page_view", 30)).collect();
    records.extend((8..12).map(|i| event("busy", i, "ad_impression", 30)));
    records.extend((0..2).map(|i| event("quiet", i, "page_view", 30)));
    log.append(TOPIC_RAW, records).await?;
    run_processor(&config, log.clone(), 14, None).await?;
    let catalog = TableCatalog::new(config.tables()?);
    let check = |when: &'static str| {
        let catalog = &catalog;
        async move {
            ensure!(
                int(catalog, "SELECT count(*) FROM events").await? >= 14,
                "{when}: every event is in events"
            );
            // traffic and demographics: 3 of the busy visitor's 12, both of the quiet one's
            for table in ["traffic_hourly", "demographics_daily", "sources_hourly"] {
                let counted = int(catalog, &format!("SELECT sum(events) FROM {table}")).await?;
                ensure!(counted == 5, "{when}: {table} counts {counted}, not 3 + 2");
            }
            // pages: the busy visitor's first 3 events are page views
            let views = int(catalog, "SELECT sum(page_views) FROM pages_hourly").await?;
            ensure!(views == 5, "{when}: pages_hourly counts {views} page views, not 3 + 2");
            // the ad rollup clamps ad events of its own: 3 of the 4 impressions
            let impressions = int(catalog, "SELECT sum(impressions) FROM ad_performance_hourly").await?;
            ensure!(impressions == 3, "{when}: {impressions} impressions, not 3");
            Ok(())
        }
    };
    check("first run").await?;
    // after a restart the busy visitor's day is still full: more events count nowhere
    log.append(TOPIC_RAW, (20..25).map(|i| event("busy", i, "page_view", 20)).collect())
        .await?;
    run_processor(&config, log.clone(), 5, None).await?;
    check("after a restart").await?;
    Ok(())
}

/// The processor dies after an `events` commit, before the rollups count it; then that commit
/// leaves the Delta log (a checkpoint is written and the log cleaned up before it, as Delta's
/// log retention does). The next processor cannot read what the rollups missed commit by
/// commit: it rebuilds the rollups from `events`, and every total still equals `events`'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_after_the_log_was_cleaned_counts_every_event_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (config, log) = counting_every_event(dir.path())?;
    let records = population(fixture_now());
    let third = records.len() / 3;
    let mut parts = records.chunks(third + 1);
    let first = parts.next().context("part")?.to_vec();
    let want = first.len() as u64;
    log.append(TOPIC_RAW, first).await?;
    run_processor(&config, log.clone(), want, None).await?;
    log.append(TOPIC_RAW, parts.next().context("part")?.to_vec()).await?;
    run_processor(&config, log.clone(), 1, Some(CrashPoint::AfterEvents)).await?;

    // a later commit (a compaction of the small files), a checkpoint at it, and every commit
    // before it gone from the log, as Delta's log cleanup leaves it
    let table = marsad_tables::open_table(&config.tables()?, "events")
        .await?
        .context("events")?;
    let uncounted = table.version().context("a version")?;
    let (table, _) = table.optimize().await?;
    let newest = table.version().context("a version")?;
    ensure!(newest > uncounted, "the compaction committed");
    deltalake::checkpoints::create_checkpoint(&table, None).await?;
    let log_dir = dir.path().join("tables").join("events").join("_delta_log");
    for version in 0..newest {
        std::fs::remove_file(log_dir.join(format!("{version:020}.json")))?;
    }

    let last = parts.next().context("part")?.to_vec();
    let want = last.len() as u64;
    log.append(TOPIC_RAW, last).await?;
    run_processor(&config, log.clone(), want, None).await?;
    let catalog = TableCatalog::new(config.tables()?);
    check_totals(&catalog, records.len() as i64).await
}
