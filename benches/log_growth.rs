//! Costs as a table ages (not criterion: one long run).
//!
//! `cargo bench --bench log_growth` drives a fresh `events` table to `LOG_COMMITS` commits
//! (20,000) the way the processor does — one append per batch of `LOG_BATCH` anonymous
//! events (100), recording its log position in the same commit — with the background
//! maintenance `marsad up` runs beside it: the events compaction of any date with 10 small
//! files, every `LOG_COMPACT_EVERY` commits (20: the 20 s timer at a commit per second); and
//! every `LOG_CLEANUP_EVERY` commits (a sixth of an hour: `marsad up` runs it every ten
//! minutes) the replaced files removed from storage and the log entries past the table's
//! retention removed from `_delta_log`.
//!
//! Time: Marsad keeps an hour of log and of replaced-file tombstones. An hour is
//! `LOG_HOUR_COMMITS` commits (3,600: a commit a second); this run commits faster than
//! that, so after 100 commits it sets both retentions to the wall time `LOG_HOUR_COMMITS`
//! of its commits take. Events are spread over dates, 300 commits a day, so a day's query
//! reads as much at the end as at the start.
//!
//! It measures at the start (versions 100–300), after two hours of commits (when the run
//! is at least three hours long) and at the end (each over the 200 commits before it):
//! - the commit latency (p50, p95) of the appends;
//! - the latency of queries through the query service's catalog, which checks the table for
//!   new commits on every query (median of 15): a count, distinct visitors per country on
//!   one full day, and the same over every date (which reads ~66x more rows at the end);
//! - the time to open the table cold (a service starting, an erasure's position check);
//! - the size of the Delta log.
//!
//! Each figure is shown as a ratio of the end to the middle and to the start of the same
//! run. Knobs: `LOG_COMMITS`, `LOG_BATCH`, `LOG_COMPACT_EVERY`, `LOG_CLEANUP_EVERY` (0:
//! never), `LOG_HOUR_COMMITS`, and `LOG_PROPERTIES` (Delta table properties set at the
//! 100th commit, `key=value;key=value`; `delta.enableExpiredLogCleanup=true` gives back
//! delta-rs's cleanup on every commit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{TimeZone, Utc};
use marsad_config::TablesLocation;
use marsad_process::anonymize::AnonymousEvent;
use marsad_process::events_batch::EventsBatchBuilder;
use marsad_process::table::EventsTable;
use marsad_query::TableCatalog;
use marsad_schemas::TableName;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const COUNTRIES: [&str; 6] = ["JO", "SA", "AE", "EG", "IQ", "PS"];
const PATHS: [&str; 4] = [
    "/ar/سيارات/تويوتا",
    "/en/jobs/sales",
    "/en/real-estate/amman",
    "/ar/أثاث/كنب",
];

/// Commits of events a day holds.
const COMMITS_A_DAY: u64 = 300;

/// The day the events start.
fn first_day() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0)
        .single()
        .unwrap_or_else(Utc::now)
}

/// Event `i` of `a_day` a day: a page view of one of 50,000 visitors, evenly over the day.
fn event(i: u64, a_day: u64) -> AnonymousEvent {
    let visitor = i * 7_919 % 50_000;
    let ts = first_day() + chrono::Duration::milliseconds((i as f64 * 86_400_000.0 / a_day as f64) as i64);
    AnonymousEvent {
        event_id: format!("e-{i}"),
        event_type: "page_view",
        ts,
        date: ts.date_naive(),
        visitor_key: Some(format!("{:064x}", visitor * 0x9E37_79B9_7F4A_7C15)),
        audience_id: None,
        session_id: Some(format!("s-{visitor}-{}", i / 5_000)),
        country: Some(COUNTRIES[(visitor % 6) as usize].to_owned()),
        region: None,
        city: None,
        device_type: if visitor.is_multiple_of(3) { "desktop" } else { "mobile" },
        os: Some("Android".to_owned()),
        browser: Some("Chrome".to_owned()),
        browser_version: Some("130".to_owned()),
        language: Some("ar".to_owned()),
        page_path: Some(PATHS[(i % 4) as usize].to_owned()),
        page_category: Some(Arc::from("cars")),
        referrer_domain: None,
        utm_source: None,
        utm_medium: None,
        utm_campaign: None,
        ad_id: None,
        campaign_id: None,
        placement: None,
        age_band: None,
        gender: None,
        is_bot: false,
        consent_marketing: false,
    }
}

/// p50 and p95 of `samples`, in milliseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    (at(0.5), at(0.95))
}

/// What one measuring point found.
struct Point {
    version: u64,
    commit_p50: f64,
    commit_p95: f64,
    count_ms: f64,
    day_ms: f64,
    day_rows: u64,
    by_country_ms: f64,
    open_ms: f64,
    log_files: usize,
    active_files: usize,
}

async fn measure(
    tables: &TablesLocation,
    dir: &std::path::Path,
    commits: &mut [Duration],
    version: u64,
    day: chrono::NaiveDate,
) -> Result<Point> {
    let (commit_p50, commit_p95) = percentiles(commits);
    let catalog = TableCatalog::new(tables.clone()).with_refresh_interval(Duration::ZERO);
    let timed = |sql: String| {
        let catalog = &catalog;
        async move {
            let mut runs = Vec::new();
            for _ in 0..15 {
                let started = Instant::now();
                let ctx = catalog.session().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                ctx.sql(&sql).await?.collect().await?;
                runs.push(started.elapsed());
            }
            anyhow::Ok(percentiles(&mut runs).0)
        }
    };
    let count_ms = timed("SELECT count(*) FROM events".to_owned()).await?;
    let one_day = format!("WHERE date = DATE '{day}'");
    let day_ms = timed(format!(
        "SELECT country, count(DISTINCT visitor_key) FROM events {one_day} GROUP BY country ORDER BY country"
    ))
    .await?;
    let by_country_ms =
        timed("SELECT country, count(DISTINCT visitor_key) FROM events GROUP BY country ORDER BY country".to_owned())
            .await?;
    let ctx = catalog.session().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let counted = ctx
        .sql(&format!("SELECT count(*) FROM events {one_day}"))
        .await?
        .collect()
        .await?;
    let day_rows =
        arrow::array::cast::as_primitive_array::<arrow::datatypes::Int64Type>(counted[0].column(0)).value(0) as u64;
    let mut opens = Vec::new();
    let mut active_files = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let table = marsad_tables::open_table(tables, "events")
            .await?
            .context("events exists")?;
        opens.push(started.elapsed());
        active_files = table.snapshot()?.log_data().into_iter().count();
    }
    let log_files = std::fs::read_dir(dir.join("events/_delta_log"))?.count();
    Ok(Point {
        version,
        commit_p50,
        commit_p95,
        count_ms,
        day_ms,
        day_rows,
        by_country_ms,
        open_ms: percentiles(&mut opens).0,
        log_files,
        active_files,
    })
}

/// A Delta table property value of `seconds`.
fn interval(seconds: f64) -> String {
    format!("interval {} seconds", seconds.ceil().max(1.0) as u64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let hour = env_or("LOG_HOUR_COMMITS", 3_600).max(60);
    let total = env_or("LOG_COMMITS", 20_000).max(600);
    let batch = env_or("LOG_BATCH", 100);
    let compact_every = env_or("LOG_COMPACT_EVERY", 20).max(1);
    let cleanup_every = env_or("LOG_CLEANUP_EVERY", hour / 6);
    let a_day = COMMITS_A_DAY * batch;
    // the middle point, once the table has an hour's commits behind it (when the run is long
    // enough for three points)
    let mid = (total >= 3 * hour).then_some(2 * hour);
    let dir = tempfile::tempdir()?;
    let tables = TablesLocation::local(dir.path())?;
    let mut events = EventsTable::open_or_create(&tables).await?;
    // Delta table properties to try, e.g. LOG_PROPERTIES="delta.deletedFileRetentionDuration=interval 1 minute"
    let properties: std::collections::HashMap<String, String> = std::env::var("LOG_PROPERTIES")
        .unwrap_or_default()
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let app = marsad_process::offsets::app_id(marsad_schemas::TOPIC_RAW, 0);
    println!(
        "log growth: {total} commits of {batch} events to a fresh `events`, the events compaction every {compact_every} \
         commits, the log and replaced-file maintenance every {cleanup_every}; an hour is {hour} commits"
    );
    let started = Instant::now();
    let mut window = Vec::new();
    let mut points = Vec::new();
    let mut compactions = 0;
    let (mut recent, mut compacting) = (Vec::new(), Duration::ZERO);
    for n in 1..=total {
        let mut builder = EventsBatchBuilder::new();
        for i in 0..batch {
            builder.push(&event((n - 1) * batch + i, a_day));
        }
        let rows = builder.finish()?;
        let began = Instant::now();
        let version = events.append(rows, &[(app.clone(), n * batch - 1)]).await?;
        let took = began.elapsed();
        recent.push(took);
        let in_mid = mid.is_some_and(|m| n > m - 200 && n <= m);
        if (100..300).contains(&n) || in_mid || n > total - 200 {
            window.push(took);
        }
        // Marsad keeps an hour of log and of replaced files' tombstones (by the clock): at a
        // commit a second, `hour` commits. This run commits faster, so its hour is shorter:
        // the wall time its first 100 commits took, scaled to `hour` of them.
        if n == 100 {
            let seconds = started.elapsed().as_secs_f64() / 100.0 * hour as f64;
            let mut set = std::collections::HashMap::from([
                ("delta.logRetentionDuration".to_owned(), interval(seconds)),
                ("delta.deletedFileRetentionDuration".to_owned(), interval(seconds)),
            ]);
            set.extend(properties.clone());
            println!("an hour of commits takes {seconds:.0} s here: table properties {set:?}");
            let table = marsad_tables::open_table(&tables, "events")
                .await?
                .context("events exists")?;
            table.set_tbl_properties().with_properties(set).await?;
            events = EventsTable::open_or_create(&tables).await?;
        }
        if n == 300 || Some(n) == mid {
            points.push(measure(&tables, dir.path(), &mut window, version, day_done_at(n)).await?);
            window.clear();
        }
        if n % compact_every == 0 {
            let began = Instant::now();
            let done =
                marsad_process::maintenance::compact_busy_dates(&tables, TableName::Events, 128 << 20, 10).await?;
            compacting += began.elapsed();
            compactions += done.len();
        }
        // the maintenance `marsad up` runs every ten minutes: the files compactions replaced
        // removed from storage (there 30 minutes later; here at once, or a run of 20,000
        // commits fills tens of GB), and the log entries past the table's retention
        if cleanup_every > 0 && n % cleanup_every == 0 {
            let table = marsad_tables::open_table(&tables, "events")
                .await?
                .context("events exists")?;
            marsad_tables::remove_replaced_files(table, chrono::Duration::zero()).await?;
            marsad_process::maintenance::remove_expired_log_entries(&tables, None).await?;
        }
        if n % 1_000 == 0 {
            let (p50, p95) = percentiles(&mut recent);
            recent.clear();
            eprintln!(
                "  {n} commits (version {version}) in {:.0} s: the last 1000 commit p50 {p50:.1} ms p95 {p95:.1} ms; \
                 {compactions} compactions took {:.0} s in all",
                started.elapsed().as_secs_f64(),
                compacting.as_secs_f64()
            );
        }
    }
    let version = events.sink().version().unwrap_or_default();
    points.push(measure(&tables, dir.path(), &mut window, version, day_done_at(total)).await?);
    let first = &points[0];
    let last = &points[points.len() - 1];
    let mut header = format!("{:<34}", "");
    for p in &points {
        header.push_str(&format!(" {:>14}", format!("v{}", p.version)));
    }
    if points.len() == 3 {
        header.push_str(&format!(" {:>9}", "last/mid"));
    }
    header.push_str(&format!(" {:>9}", "last/1st"));
    println!("{header}");
    let row = |what: &str, value: &dyn Fn(&Point) -> f64| {
        let mut line = format!("{what:<34}");
        for p in &points {
            line.push_str(&format!(" {:>11.2} ms", value(p)));
        }
        if points.len() == 3 {
            line.push_str(&format!(" {:>8.2}x", value(last) / value(&points[1]).max(1e-9)));
        }
        line.push_str(&format!(" {:>8.2}x", value(last) / value(first).max(1e-9)));
        println!("{line}");
    };
    row("commit p50", &|p| p.commit_p50);
    row("commit p95", &|p| p.commit_p95);
    row("query: count(*)", &|p| p.count_ms);
    row("query: visitors by country, a day", &|p| p.day_ms);
    row("query: the same, every date", &|p| p.by_country_ms);
    row("open the table cold", &|p| p.open_ms);
    let count = |what: &str, value: &dyn Fn(&Point) -> String| {
        let mut line = format!("{what:<34}");
        for p in &points {
            line.push_str(&format!(" {:>14}", value(p)));
        }
        println!("{line}");
    };
    count("rows of the day queried", &|p| p.day_rows.to_string());
    count("files in _delta_log", &|p| p.log_files.to_string());
    count("active data files", &|p| p.active_files.to_string());
    println!(
        "{total} commits in {:.0} s; {compactions} events compactions",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The last full day after `n` commits.
fn day_done_at(n: u64) -> chrono::NaiveDate {
    first_day().date_naive() + chrono::Days::new((n / COMMITS_A_DAY).max(1) - 1)
}
