//! Processor throughput on realistic traffic, beside a DuckDB job on the same events
//! (not criterion: one long run).
//!
//! `cargo bench --bench processor` makes `PROC_EVENTS` (1,000,000) envelopes of a
//! classified-ads site's traffic, seeded so every run makes the same ones:
//! - `PROC_VISITORS` (200,000) cookies, each with its own address in one of eight markets
//!   (so hundreds of thousands of distinct IPs), a fifth logged in with declared demographics;
//! - 48 user agents (Android, iPhone, iPad, desktop browsers, crawlers);
//! - Arabic and English paths of six categories, with listing ids, paging and UTM tags, and
//!   5 % carrying a phone number or an e-mail address the scrubber must take out;
//! - page views, ad impressions and clicks (with ad, campaign, placement), searches, posts,
//!   signups, spread over four hours of yesterday (06:00–10:00 UTC); consent refused by
//!   some, GPC sent by some;
//! - 1.5 % of the visitors opted out (of personalisation, or of everything).
//!
//! It appends them to a local log, then runs one processor (decode, GeoIP, HMAC pseudonyms,
//! URL scrubbing, user agents, sessions, duplicates, Delta `events`, the seven rollups, with
//! three goals and a three-step funnel configured) until every event is committed, and reports events per CPU-second of the process (user + system).
//! Beside it, in the same run, `benches/processor_duckdb.py` has DuckDB do less with the same
//! envelopes (NDJSON → SHA-256 pseudonym, regex scrub of ASCII digits and e-mails, coarse
//! user agent, zstd Parquet; no GeoIP, HMAC, sessions, duplicates, opt-outs, GPC or rollups)
//! and reports the same rate; the processor's figure is printed as a ratio of DuckDB's, the
//! reference the issue set (a smaller job, not the same one).
//!
//! Last it prints a digest of what was written: every `events` row in `event_id` order (the
//! keyed pseudonyms relabelled by first appearance, times relative to the run's start, since
//! keys and the clock differ between runs) and the rollups' sums per key. Two builds that
//! write the same rows print the same digests.
//!
//! Knobs: `PROC_EVENTS`, `PROC_VISITORS`, `PROC_SKIP_DUCKDB=1`, `PROC_SKIP_DIGEST=1`.

/// The binary's allocator (`src/main.rs`), so the stages run here as they do in `marsad`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use chrono::{DateTime, DurationRound, Utc};
use common::env_or;
use marsad_config::Config;
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
use marsad_privacy::keys::SubjectKeys;
use marsad_privacy::optout::{OptOutRecord, OptOutRegistry, OptOutScope};
use marsad_privacy::pseudonym::Subject;
use marsad_process::{ProcessMetrics, Processor};
use marsad_schemas::{ENVELOPE_VERSION, Envelope, TOPIC_RAW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

/// The markets' address ranges (the bundled GeoIP database places them there) and shares.
const MARKETS: &[(&[[u8; 2]], u32)] = &[
    (&[[176, 29], [94, 249]], 30),
    (&[[188, 48], [51, 36]], 25),
    (&[[94, 200], [86, 96]], 15),
    (&[[41, 32], [197, 32]], 12),
    (&[[37, 236], [149, 255]], 10),
    (&[[212, 77]], 3),
    (&[[81, 2]], 3),
    (&[[8, 8]], 2),
];

const ANDROID_MODELS: &[&str] = &[
    "SM-A536B",
    "SM-S918B",
    "SM-A145F",
    "Redmi Note 12",
    "HUAWEI P50",
    "M2101K6G",
    "CPH2371",
    "V2111",
];
const CHROME_VERSIONS: &[&str] = &["119.0.6045.163", "120.0.6099.144", "121.0.6167.101", "122.0.6261.64"];
const IOS_VERSIONS: &[&str] = &["16_6", "17_1", "17_2", "17_4"];
const DESKTOP_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/122.0.0.0 Safari/537.36 Edg/122.0.2365.52",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:122.0) Gecko/20100101 Firefox/122.0",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
];

/// 48 user agents: Android models × Chrome versions, iPhones, desktops, tablets, crawlers.
fn user_agents() -> Vec<String> {
    let mut agents = Vec::new();
    for model in ANDROID_MODELS {
        for version in CHROME_VERSIONS {
            agents.push(format!("Mozilla/5.0 (Linux; Android 13; {model}) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{version} Mobile Safari/537.36"));
        }
    }
    for ios in IOS_VERSIONS {
        let short = ios.replace('_', ".");
        agents.push(format!("Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{short} Mobile/15E148 Safari/604.1"));
    }
    agents.extend(DESKTOP_AGENTS.iter().map(|a| a.to_string()));
    agents.extend(CHROME_VERSIONS.iter().take(4).map(|v| {
        format!("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{v} Mobile Safari/537.36")
    }));
    agents
}

const PAGES: &[&str] = &[
    "/ar/سيارات/تويوتا/كامري",
    "/ar/سيارات/هيونداي/النترا",
    "/en/cars/toyota/land-cruiser",
    "/en/cars/kia/sportage",
    "/ar/عقارات/شقق-للايجار/عمان",
    "/ar/عقارات/أراضي-للبيع/اربد",
    "/en/real-estate/apartments-for-rent/dubai",
    "/en/real-estate/villas/riyadh",
    "/ar/وظائف/محاسب",
    "/en/jobs/software-engineer",
    "/ar/الكترونيات/موبايلات/ايفون-15",
    "/en/electronics/laptops",
    "/ar/أثاث/كنب",
    "/en/furniture/bedrooms",
    "/ar/خدمات/تنظيف",
    "/en/services/moving",
    "/",
    "/ar",
];

const REFERRERS: &[&str] = &[
    "",
    "",
    "",
    "https://www.google.com/",
    "https://www.google.jo/search?q=x",
    "https://www.google.com.sa/",
    "https://www.bing.com/search?q=cars",
    "https://www.facebook.com/",
    "https://l.instagram.com/",
    "https://t.co/abc",
    "https://www.snapchat.com/",
    "https://kulshi.example/ar",
];

/// What a visitor keeps across its events.
struct Visitor {
    cookie: String,
    user: Option<String>,
    ip: std::net::IpAddr,
    agent: usize,
    arabic: bool,
    personalisation: bool,
    refused: bool,
    gpc: bool,
    demographics: Option<(&'static str, &'static str)>,
}

fn visitor(rng: &mut StdRng, n: u32, agents: usize) -> Visitor {
    let total: u32 = MARKETS.iter().map(|m| m.1).sum();
    let mut pick = rng.random_range(0..total);
    let prefixes = MARKETS
        .iter()
        .find(|m| {
            let here = pick < m.1;
            pick = pick.saturating_sub(m.1);
            here
        })
        .map_or(MARKETS[0].0, |m| m.0);
    let p = prefixes[rng.random_range(0..prefixes.len())];
    let ip = std::net::Ipv4Addr::new(p[0], p[1], rng.random(), rng.random_range(1..=254));
    let logged_in = rng.random_bool(0.2);
    Visitor {
        cookie: format!("c-{:016x}-{n}", rng.random::<u64>()),
        user: logged_in.then(|| format!("u-{}", 100_000 + n)),
        ip: ip.into(),
        agent: rng.random_range(0..agents),
        arabic: rng.random_bool(0.7),
        personalisation: rng.random_bool(0.75),
        refused: rng.random_bool(0.03),
        gpc: rng.random_bool(0.05),
        demographics: logged_in.then(|| {
            (
                ["18-24", "25-34", "35-44", "45-54", "55-64"][rng.random_range(0..5)],
                ["female", "male"][rng.random_range(0..2)],
            )
        }),
    }
}

/// The page's URL: a path, maybe a listing id, paging or UTM tags, and 5 % with PII.
fn url(rng: &mut StdRng) -> String {
    let mut url = format!("https://kulshi.example{}", PAGES[rng.random_range(0..PAGES.len())]);
    if rng.random_bool(0.3) {
        url.push_str(&format!("/ad-{}", rng.random_range(100_000..999_999)));
    }
    let pii: f64 = rng.random();
    if pii < 0.02 {
        url.push_str(&format!("/call-07{}", rng.random_range(70_000_000..99_999_999)));
    } else if pii < 0.035 {
        url.push_str(&format!("?phone=%2B9627{}", rng.random_range(70_000_000..99_999_999)));
    } else if pii < 0.05 {
        url.push_str(&format!("?email=seller{}%40example.com", rng.random_range(1..9_999)));
    } else if rng.random_bool(0.15) {
        url.push_str(&format!("?page={}", rng.random_range(2..6)));
    } else if rng.random_bool(0.1) {
        url.push_str("?utm_source=facebook&utm_medium=cpc&utm_campaign=ramadan-cars");
    }
    url
}

/// The `n`th envelope of the run, received at `at`.
fn envelope(rng: &mut StdRng, v: &Visitor, agents: &[String], seq: u64, at: DateTime<Utc>) -> Result<Envelope> {
    let roll: f64 = rng.random();
    let event_type = match roll {
        r if r < 0.62 => "page_view",
        r if r < 0.84 => "ad_impression",
        r if r < 0.89 => "ad_click",
        r if r < 0.97 => "search",
        r if r < 0.99 => "ad_post",
        _ => "signup",
    };
    let mut ev = json!({
        "type": event_type,
        "url": url(rng),
        "cookie_id": v.cookie,
        "event_id": format!("{}-{seq}", v.cookie),
        "ts": at - chrono::Duration::milliseconds(rng.random_range(0..900)),
        "consent": {"analytics": !v.refused, "personalisation": v.personalisation,
                    "marketing": v.personalisation && rng.random_bool(0.5)},
    });
    let referrer = REFERRERS[rng.random_range(0..REFERRERS.len())];
    if !referrer.is_empty() {
        ev["referrer"] = referrer.into();
    }
    // what ingest keeps of a logged-in visitor once the identity token checks out
    if let Some(user) = &v.user {
        ev["user_id"] = user.as_str().into();
    }
    if let Some((age_band, gender)) = v.demographics {
        ev["demographics"] = json!({"age_band": age_band, "gender": gender});
    }
    if event_type == "ad_impression" || event_type == "ad_click" {
        let placement = ["top-banner", "sidebar", "in-feed"][rng.random_range(0..3)];
        ev["ad"] = json!({"ad_id": format!("ad-{}", rng.random_range(1..200)),
                          "campaign_id": format!("cmp-{}", rng.random_range(1..25)), "placement": placement});
    }
    if event_type == "search" {
        let query = ["تويوتا", "شقة للايجار", "iphone 15", "وظائف عمان"][rng.random_range(0..4)];
        ev["props"] = json!({ "search_query": query });
    }
    Ok(Envelope {
        v: ENVELOPE_VERSION,
        event: serde_json::from_value(ev).context("bench event")?,
        received_at: at,
        client_ip: Some(v.ip),
        user_agent: Some(agents[v.agent].clone()),
        accept_language: Some(
            if v.arabic {
                "ar-JO,ar;q=0.9,en;q=0.8"
            } else {
                "en-US,en;q=0.9"
            }
            .into(),
        ),
        dnt: false,
        gpc: v.gpc,
    })
}

/// The opt-outs a site has: 1 % of the visitors out of personalisation, 0.5 % out of
/// everything (with any opt-out recorded, every event's identifiers are looked up).
fn opt_outs(config: &Config, visitors: u32) -> Result<Arc<OptOutRegistry>> {
    let keys = SubjectKeys::load(config)?;
    let registry = OptOutRegistry::default();
    let mut rng = StdRng::seed_from_u64(7);
    let agents = user_agents();
    for n in 0..visitors {
        let v = visitor(&mut rng, n, agents.len());
        let scope = match n % 200 {
            0 | 1 => OptOutScope::Personalisation,
            2 => OptOutScope::All,
            _ => continue,
        };
        registry.apply(&OptOutRecord::new(
            &keys.optout,
            &keys.targeting,
            Subject::Cookie(&v.cookie),
            scope,
        ));
    }
    Ok(Arc::new(registry))
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// A line of `/proc/self/status` in MiB (`VmHWM`: the peak resident set).
fn status_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Makes the run's envelopes, appends them to the log, and writes them as NDJSON for DuckDB.
async fn fill_log(
    log: &LocalLog,
    events: u64,
    visitors: u32,
    start: DateTime<Utc>,
    ndjson: &std::path::Path,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let agents = user_agents();
    let people: Vec<Visitor> = (0..visitors).map(|n| visitor(&mut rng, n, agents.len())).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(ndjson)?);
    let step = Duration::from_secs(4 * 3600).as_micros() as i64 / events.max(1) as i64;
    let mut records = Vec::with_capacity(10_000);
    for seq in 0..events {
        // a few visitors come back often, most rarely (a skewed pick)
        let u: f64 = rng.random();
        let who = &people[((u * u) * f64::from(visitors)) as usize % people.len()];
        let at = start + chrono::Duration::microseconds(step * seq as i64);
        let env = envelope(&mut rng, who, &agents, seq, at)?;
        let payload = env.to_bytes();
        file.write_all(&payload)?;
        file.write_all(b"\n")?;
        records.push(Record {
            key: Some(env.partition_key()),
            payload,
        });
        if records.len() == 10_000 {
            log.append(TOPIC_RAW, std::mem::take(&mut records)).await?;
        }
    }
    log.append(TOPIC_RAW, records).await?;
    file.flush()?;
    Ok(())
}

/// One value of a column as text, keyed pseudonyms relabelled by first appearance.
fn cell(column: &dyn Array, row: usize, labels: Option<&mut HashMap<String, usize>>, start_us: i64) -> String {
    if column.is_null(row) {
        return "∅".into();
    }
    match column.data_type() {
        DataType::Timestamp(..) => {
            let us = column
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(row);
            (us - start_us).to_string()
        }
        DataType::Date32 => {
            let day = column.as_primitive::<arrow::datatypes::Date32Type>().value(row);
            (i64::from(day) - start_us.div_euclid(86_400_000_000)).to_string()
        }
        DataType::Int64 => column
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(row)
            .to_string(),
        DataType::Boolean => column.as_boolean().value(row).to_string(),
        _ => {
            let text = arrow::util::display::array_value_to_string(column, row).unwrap_or_default();
            match labels {
                Some(labels) => {
                    let next = labels.len();
                    format!("#{}", labels.entry(text).or_insert(next))
                }
                None => text,
            }
        }
    }
}

/// The first 16 hex digits of the SHA-256 of a query's rows as text, and how many rows. (The
/// rollups' visitor sketches are left out: they hold pseudonyms, which change with the run's
/// random daily keys.)
async fn digest(
    ctx: &deltalake::datafusion::prelude::SessionContext,
    sql: &str,
    start_us: i64,
) -> Result<(String, usize)> {
    let batches = ctx.sql(sql).await?.collect().await?;
    let mut hash = sha2::Sha256::new();
    let mut labels: HashMap<String, HashMap<String, usize>> = HashMap::new();
    let mut rows = 0;
    for batch in &batches {
        let schema = batch.schema();
        for row in 0..batch.num_rows() {
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                let keyed = matches!(field.name().as_str(), "visitor_key" | "audience_id" | "session_id");
                let labels = keyed.then(|| labels.entry(field.name().clone()).or_default());
                hash.update(cell(column.as_ref(), row, labels, start_us).as_bytes());
                hash.update(b"\x1f");
            }
            hash.update(b"\n");
            rows += 1;
        }
    }
    Ok((hex::encode(hash.finalize())[..16].to_string(), rows))
}

/// The digests of `events` and of the rollups' sums per key.
async fn print_digests(config: &Config, start: DateTime<Utc>) -> Result<()> {
    let catalog = marsad_query::TableCatalog::new(config.tables()?).with_refresh_interval(Duration::ZERO);
    let ctx = catalog.session().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let start_us = start.timestamp_micros();
    let queries = [
        ("events", "SELECT * FROM events ORDER BY event_id".to_string()),
        (
            "traffic_hourly",
            grouped(
                "traffic_hourly",
                "hour, date, country, region, device_type, os, browser, language, page_category, referrer_domain, event_type",
                "events, sessions, bounces, session_seconds",
            ),
        ),
        (
            "ad_performance_hourly",
            grouped(
                "ad_performance_hourly",
                "hour, date, campaign_id, ad_id, placement, country, device_type",
                "impressions, clicks",
            ),
        ),
        (
            "demographics_daily",
            grouped(
                "demographics_daily",
                "date, country, region, age_band, gender, page_category",
                "events",
            ),
        ),
        (
            "sources_hourly",
            grouped(
                "sources_hourly",
                "hour, date, channel, referrer_domain, utm_source, utm_medium, utm_campaign, country, device_type",
                "sessions, bounces, events, page_views, session_seconds",
            ),
        ),
        (
            "pages_hourly",
            grouped(
                "pages_hourly",
                "hour, date, page_path, page_category, country, device_type",
                "page_views, entries, exits",
            ),
        ),
        (
            "goals_hourly",
            grouped(
                "goals_hourly",
                "hour, date, goal_id, country, device_type",
                "conversions",
            ),
        ),
        (
            "funnels_hourly",
            grouped(
                "funnels_hourly",
                "hour, date, funnel_id, step, country, device_type",
                "sessions",
            ),
        ),
    ];
    println!("digest of what was written (same rows, same digest):");
    for (table, sql) in queries {
        let (hash, rows) = digest(&ctx, &sql, start_us).await?;
        println!("  {table:<24} {hash}  {rows} rows");
    }
    Ok(())
}

/// The sums of `counts` per key of a rollup, in key order.
fn grouped(table: &str, keys: &str, counts: &str) -> String {
    let sums: Vec<String> = counts.split(", ").map(|c| format!("sum({c}) AS {c}")).collect();
    let order: Vec<String> = keys.split(", ").map(|k| format!("{k} NULLS FIRST")).collect();
    format!(
        "SELECT {keys}, {} FROM {table} GROUP BY {keys} ORDER BY {}",
        sums.join(", "),
        order.join(", ")
    )
}

/// DuckDB's job on the same envelopes: (events per CPU-second, its output line).
fn duckdb_job(ndjson: &std::path::Path, out: &std::path::Path) -> Result<(f64, String)> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/processor_duckdb.py");
    let output = std::process::Command::new("python3")
        .arg(script)
        .arg(ndjson)
        .arg(out)
        .output()
        .context("python3 benches/processor_duckdb.py")?;
    ensure!(
        output.status.success(),
        "the DuckDB job failed (pip install duckdb==2.0.1): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let rate = text
        .split_whitespace()
        .zip(text.split_whitespace().skip(1))
        .find(|(_, unit)| *unit == "events/cpu-s")
        .and_then(|(n, _)| n.parse().ok())
        .context("the DuckDB job printed no rate")?;
    Ok((rate, text))
}

fn main() -> Result<()> {
    let events = env_or("PROC_EVENTS", 1_000_000);
    let visitors = env_or("PROC_VISITORS", 200_000) as u32;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    // no maintenance pass during the run: it would close the (hours old) sessions after a
    // minute, and a slower build would write other sessions than a faster one
    config.privacy.key_destruction_interval_ms = 24 * 3_600_000;
    // what a deployment would count: three goals and a funnel
    let matching = |event_type: &str, category: Option<&str>| marsad_config::EventMatch {
        event_type: Some(event_type.into()),
        page_category: category.map(str::to_owned),
        ..Default::default()
    };
    for (id, event_type, category) in [
        ("posted-ad", "ad_post", None),
        ("signed-up", "signup", None),
        ("viewed-cars", "page_view", Some("cars")),
    ] {
        let m = matching(event_type, category);
        config.process.goals.push(marsad_config::GoalDefinition {
            id: id.into(),
            description: String::new(),
            event_type: m.event_type,
            page_category: m.page_category,
            path: None,
            campaign_id: None,
        });
    }
    config.process.funnels.push(marsad_config::FunnelDefinition {
        id: "cars-to-click".into(),
        description: String::new(),
        steps: vec![
            matching("page_view", Some("cars")),
            matching("ad_impression", None),
            matching("ad_click", None),
        ],
    });
    let ndjson = dir.path().join("envelopes.ndjson");
    // yesterday 06:00–10:00 UTC, whenever the bench runs: every event in the past, within
    // the daily key's 48 h grace, and never across midnight (a day's keys, sessions, clamp)
    let start = (Utc::now() - chrono::Duration::days(1)).duration_trunc(chrono::Duration::days(1))?
        + chrono::Duration::hours(6);
    runtime.block_on(async {
        let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
        let made = Instant::now();
        fill_log(&log, events, visitors, start, &ndjson).await?;
        println!(
            "input: {events} envelopes of {visitors} visitors, 48 user agents, made and logged in {:.1}s",
            made.elapsed().as_secs_f64()
        );

        let opt_outs = opt_outs(&config, visitors)?;
        let metrics = Arc::new(ProcessMetrics::new());
        let processor = Processor::new(&config, log, opt_outs, metrics.clone()).await?;
        let shutdown = CancellationToken::new();
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let run = tokio::spawn(processor.run(shutdown.clone()));
        // every event decided: written, or not collected (consent), or a duplicate
        let decided = || {
            metrics.events_written.get() + metrics.not_collected.get() + metrics.duplicates_dropped.get()
        };
        while decided() < events {
            ensure!(!run.is_finished(), "the processor stopped early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        run.await??;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        let rate = events as f64 / cpu;
        println!(
            "marsad processor (log → anonymize → Delta events + {} rollups):",
            marsad_process::rollup::rollup_specs().len()
        );
        println!(
            "  {} rows written, {} not collected; wall {wall:.2}s, cpu {cpu:.2}s → {rate:.0} events/cpu-s; peak RSS {:.0} MiB",
            metrics.events_written.get(),
            metrics.not_collected.get(),
            status_mib("VmHWM:")
        );
        if std::env::var_os("PROC_SKIP_DUCKDB").is_none() {
            let (duck, line) = duckdb_job(&ndjson, &dir.path().join("duckdb_out"))?;
            println!("duckdb job (NDJSON → sha256 pseudonym, regex scrub, coarse UA, zstd Parquet; less work):");
            println!("  {line}");
            println!("marsad processor: {:.2}x DuckDB's events per cpu-second", rate / duck);
        }
        if std::env::var_os("PROC_SKIP_DIGEST").is_none() {
            print_digests(&config, start).await?;
        }
        Ok(())
    })
}
