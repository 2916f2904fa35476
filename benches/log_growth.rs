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
//! of its commits take (the log's to that of `LOG_KEPT_COMMITS`, an hour's unless set), and
//! its log cleanup keeps that wall time: the cleanup's own floor (`CLEANUP_FLOOR`, 20 s) is
//! for writers running beside it, and this run's one writer waits for it. Events are spread
//! over dates, 300 commits a day, so a day's query reads as much at the end as at the start.
//!
//! It measures at the start (commits 101–300), after two hours of commits (when the run
//! is at least three hours long) and at the end (each over the 200 commits before it):
//! - the commit latency (p50, p95) of the appends;
//! - the latency of queries through the query service's catalog, which checks the table for
//!   new commits on every query (median of 15): a count, distinct visitors per country on
//!   one full day, and the same over every date (which reads ~66x more rows at the end);
//! - the time to open the table cold (a service starting, an erasure's position check);
//! - the size of the Delta log.
//!
//! The machine is shared and its speed drifts over a run's minutes, so the start's figures are
//! taken again beside the end's: over the aged table's last 300 commits a fresh table is
//! driven the same way, a commit to it beside each of the aged table's (before it on even
//! commits, after it on odd ones, so neither always follows the other's work), and its
//! commits 101–300 measured ("beside"; it is queried right after the aged one).
//!
//! Each figure is shown as a ratio of the end to the middle, to the start, and to the young
//! table beside it. Knobs: `LOG_COMMITS`, `LOG_BATCH`, `LOG_COMPACT_EVERY`,
//! `LOG_CLEANUP_EVERY` (0: never), `LOG_HOUR_COMMITS`, `LOG_KEPT_COMMITS` (the log's
//! retention in commits, an hour's unless set), and `LOG_PROPERTIES` (Delta table properties
//! set at the 100th commit, `key=value;key=value`; `delta.enableExpiredLogCleanup=true` gives
//! back delta-rs's cleanup on every commit).
//!
//! It runs with the binary's allocator (jemalloc), as `marsad` does.

/// The binary's allocator (`src/main.rs`): the commits run here as they do in `marsad`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

/// The run's settings (the knobs in the file's header).
struct Knobs {
    hour: u64,
    batch: u64,
    compact_every: u64,
    cleanup_every: u64,
    log_kept: u64,
    properties: std::collections::HashMap<String, String>,
}

/// The tables' retentions in wall time, as this run measured its commits' pace.
#[derive(Clone, Copy)]
struct Retentions {
    /// How long an hour of commits takes.
    hour_seconds: f64,
    /// How long `LOG_KEPT_COMMITS` commits take.
    log_seconds: f64,
}

/// A table driven the way the processor and `marsad up`'s maintenance drive `events`.
struct AgingTable {
    dir: tempfile::TempDir,
    tables: TablesLocation,
    events: EventsTable,
    app: String,
    /// What its progress lines start with.
    name: &'static str,
    /// Commits so far.
    n: u64,
    started: Instant,
    /// The retentions to set at the 100th commit, when another table's pace gives them.
    given: Option<Retentions>,
    /// Set at the 100th commit.
    retentions: Option<Retentions>,
    compactions: usize,
    compacting: Duration,
}

impl AgingTable {
    async fn create(name: &'static str, given: Option<Retentions>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let tables = TablesLocation::local(dir.path())?;
        let events = EventsTable::open_or_create(&tables).await?;
        Ok(Self {
            dir,
            tables,
            events,
            app: marsad_process::offsets::app_id(marsad_schemas::TOPIC_RAW, 0),
            name,
            n: 0,
            started: Instant::now(),
            given,
            retentions: None,
            compactions: 0,
            compacting: Duration::ZERO,
        })
    }

    /// One commit of a batch of events, and the maintenance due after it; the version
    /// committed and how long the commit took.
    async fn step(&mut self, knobs: &Knobs) -> Result<(u64, Duration)> {
        self.n += 1;
        let n = self.n;
        let mut builder = EventsBatchBuilder::new();
        for i in 0..knobs.batch {
            builder.push(&event((n - 1) * knobs.batch + i, COMMITS_A_DAY * knobs.batch));
        }
        let rows = builder.finish()?;
        let began = Instant::now();
        let version = self
            .events
            .append(rows, &[(self.app.clone(), n * knobs.batch - 1)])
            .await?;
        let took = began.elapsed();
        // Marsad keeps an hour of log and of replaced files' tombstones (by the clock): at a
        // commit a second, `hour` commits. This run commits faster, so its hour is shorter:
        // the wall time its first 100 commits took, scaled to `hour` of them.
        if n == 100 {
            let a_commit = self.started.elapsed().as_secs_f64() / 100.0;
            let retentions = *self.retentions.insert(self.given.unwrap_or(Retentions {
                hour_seconds: a_commit * knobs.hour as f64,
                log_seconds: (a_commit * knobs.log_kept as f64).ceil().max(1.0),
            }));
            let mut set = std::collections::HashMap::from([
                (
                    "delta.logRetentionDuration".to_owned(),
                    interval(retentions.log_seconds),
                ),
                (
                    "delta.deletedFileRetentionDuration".to_owned(),
                    interval(retentions.hour_seconds),
                ),
            ]);
            set.extend(knobs.properties.clone());
            println!(
                "{}an hour of commits takes {:.0} s here: table properties {set:?}",
                self.name, retentions.hour_seconds
            );
            let table = marsad_tables::open_table(&self.tables, "events")
                .await?
                .context("events exists")?;
            table.set_tbl_properties().with_properties(set).await?;
            self.events = EventsTable::open_or_create(&self.tables).await?;
        }
        if n.is_multiple_of(knobs.compact_every) {
            let began = Instant::now();
            let done =
                marsad_process::maintenance::compact_busy_dates(&self.tables, TableName::Events, 128 << 20, 10).await?;
            self.compacting += began.elapsed();
            self.compactions += done.len();
        }
        // the maintenance `marsad up` runs every ten minutes: the files compactions replaced
        // removed from storage (there 30 minutes later; here at once, or a run of 20,000
        // commits fills tens of GB), and the log entries past the table's retention
        if knobs.cleanup_every > 0 && n.is_multiple_of(knobs.cleanup_every) {
            let table = marsad_tables::open_table(&self.tables, "events")
                .await?
                .context("events exists")?;
            marsad_tables::remove_replaced_files(table, chrono::Duration::zero()).await?;
            // the retention scaled as the hour is: the cleanup's floor (`CLEANUP_FLOOR`, 20 s of
            // wall time) is for writers running beside it, and this run's only writer waits
            let kept = self.retentions.map_or(chrono::Duration::MAX, |r| {
                chrono::Duration::seconds(r.log_seconds as i64)
            });
            marsad_process::maintenance::remove_expired_log_entries(&self.tables, Some(kept)).await?;
        }
        Ok((version, took))
    }

    async fn measure(&self, commits: &mut [Duration], version: u64) -> Result<Point> {
        measure(&self.tables, self.dir.path(), commits, version, day_done_at(self.n)).await
    }
}

/// The commits of a young table that are measured: the aged table's at its start, and the
/// young table's driven beside the aged one at its end.
const YOUNG_WINDOW: std::ops::RangeInclusive<u64> = 101..=300;

/// Commits of a young table driven beside the aged one at its end, so that both are measured
/// under the machine's same load.
const YOUNG_BESIDE: u64 = *YOUNG_WINDOW.end();

/// A commit to the young table beside the aged one (created at its first), its time kept
/// once past its 100th; the version committed.
async fn step_beside(
    young: &mut Option<AgingTable>,
    aged: &AgingTable,
    knobs: &Knobs,
    window: &mut Vec<Duration>,
) -> Result<u64> {
    let beside = match young.as_mut() {
        Some(young) => young,
        None => young.insert(AgingTable::create("the young table beside: ", aged.retentions).await?),
    };
    let (version, took) = beside.step(knobs).await?;
    if YOUNG_WINDOW.contains(&beside.n) {
        window.push(took);
    }
    Ok(version)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let hour = env_or("LOG_HOUR_COMMITS", 3_600).max(60);
    let total = env_or("LOG_COMMITS", 20_000).max(600);
    let knobs = Knobs {
        hour,
        batch: env_or("LOG_BATCH", 100),
        compact_every: env_or("LOG_COMPACT_EVERY", 20).max(1),
        cleanup_every: env_or("LOG_CLEANUP_EVERY", hour / 6),
        // how many commits' worth of log entries Marsad keeps (`process::table::LOG_RETENTION`)
        log_kept: env_or("LOG_KEPT_COMMITS", hour).max(1),
        // Delta table properties to try, e.g. LOG_PROPERTIES="delta.deletedFileRetentionDuration=interval 1 minute"
        properties: std::env::var("LOG_PROPERTIES")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect(),
    };
    // the middle point, once the table has an hour's commits behind it (when the run is long
    // enough for three points)
    let mid = (total >= 3 * hour).then_some(2 * hour);
    println!(
        "log growth: {total} commits of {} events to a fresh `events`, the events compaction every {} \
         commits, the log and replaced-file maintenance every {}; an hour is {hour} commits",
        knobs.batch, knobs.compact_every, knobs.cleanup_every
    );
    let mut aged = AgingTable::create("", None).await?;
    let mut young: Option<AgingTable> = None;
    let (mut window, mut young_window) = (Vec::new(), Vec::new());
    let mut points = Vec::new();
    let mut recent = Vec::new();
    let (mut version, mut young_version) = (0, 0);
    for n in 1..=total {
        // the young table beside: a commit to it beside each of the aged table's last 300,
        // before it and after it in turn
        let beside = n + YOUNG_BESIDE > total;
        if beside && n.is_multiple_of(2) {
            young_version = step_beside(&mut young, &aged, &knobs, &mut young_window).await?;
        }
        let took;
        (version, took) = aged.step(&knobs).await?;
        if beside && !n.is_multiple_of(2) {
            young_version = step_beside(&mut young, &aged, &knobs, &mut young_window).await?;
        }
        recent.push(took);
        let in_mid = mid.is_some_and(|m| n > m - 200 && n <= m);
        if YOUNG_WINDOW.contains(&n) || in_mid || n > total - 200 {
            window.push(took);
        }
        if n == *YOUNG_WINDOW.end() || Some(n) == mid {
            points.push(aged.measure(&mut window, version).await?);
            window.clear();
        }
        if n % 1_000 == 0 {
            let (p50, p95) = percentiles(&mut recent);
            recent.clear();
            eprintln!(
                "  {n} commits (version {version}) in {:.0} s: the last 1000 commit p50 {p50:.1} ms p95 {p95:.1} ms; \
                 {} compactions took {:.0} s in all",
                aged.started.elapsed().as_secs_f64(),
                aged.compactions,
                aged.compacting.as_secs_f64()
            );
        }
    }
    points.push(aged.measure(&mut window, version).await?);
    let young = young.context("a young table was driven beside")?;
    let beside = young.measure(&mut young_window, young_version).await?;
    let first = &points[0];
    let last = &points[points.len() - 1];
    let mut header = format!("{:<34}", "");
    for p in &points {
        header.push_str(&format!(" {:>14}", format!("v{}", p.version)));
    }
    header.push_str(&format!(" {:>14}", format!("beside v{}", beside.version)));
    if points.len() == 3 {
        header.push_str(&format!(" {:>9}", "last/mid"));
    }
    header.push_str(&format!(" {:>9} {:>11}", "last/1st", "last/beside"));
    println!("{header}");
    let row = |what: &str, value: &dyn Fn(&Point) -> f64| {
        let mut line = format!("{what:<34}");
        for p in points.iter().chain([&beside]) {
            line.push_str(&format!(" {:>11.2} ms", value(p)));
        }
        if points.len() == 3 {
            line.push_str(&format!(" {:>8.2}x", value(last) / value(&points[1]).max(1e-9)));
        }
        line.push_str(&format!(" {:>8.2}x", value(last) / value(first).max(1e-9)));
        line.push_str(&format!(" {:>10.2}x", value(last) / value(&beside).max(1e-9)));
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
        for p in points.iter().chain([&beside]) {
            line.push_str(&format!(" {:>14}", value(p)));
        }
        println!("{line}");
    };
    count("rows of the day queried", &|p| p.day_rows.to_string());
    count("files in _delta_log", &|p| p.log_files.to_string());
    count("active data files", &|p| p.active_files.to_string());
    println!(
        "{total} commits in {:.0} s; {} events compactions",
        aged.started.elapsed().as_secs_f64(),
        aged.compactions
    );
    Ok(())
}

/// The last full day after `n` commits.
fn day_done_at(n: u64) -> chrono::NaiveDate {
    first_day().date_naive() + chrono::Days::new((n / COMMITS_A_DAY).max(1) - 1)
}
