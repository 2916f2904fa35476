//! Marsad's SQL beside the engines a user would pick instead (not criterion: whole-service
//! runs). `cargo bench --bench engines`:
//! 1. starts `marsad up` on a fresh data dir and drives `marsad simulate` into it (default
//!    40,000 events/s for 25 s from 200,000 visitors: about a million events);
//! 2. waits until every event is in `events`, sampling `traffic_hourly`'s rows per key (what
//!    a report reads) every 2 s meanwhile, and timing one probe event a second during the
//!    load from its send to its row in `/v1/sql` (freshness);
//! 3. runs `benches/engines.py`: twelve dashboard-style queries over the table's active
//!    Parquet files in DuckDB, DataFusion, Polars and chDB (from PyPI) and through Marsad's
//!    `/v1/sql` and Postgres port; checks every engine returns the same rows, then prints the
//!    median of 5 warm runs and each engine's geomean against DuckDB and DataFusion; then
//!    each report of `/v1/reports` against DuckDB answering its question from raw `events`;
//! 4. runs `marsad compact` and step 3 again.
//!
//! Knobs: `ENGINES_RATE` (40,000), `ENGINES_SECONDS` (25), `ENGINES_VISITORS` (200,000),
//! `ENGINES_RUNS` (5). Needs `python3` with duckdb, datafusion, polars, chdb, deltalake and
//! psycopg2 (`python3 -m pip install duckdb datafusion polars chdb deltalake psycopg2-binary`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use anyhow::{Context, Result, ensure};
use common::{Running, env_or, free_port, wait_until};
use reqwest::blocking::Client;
use serde_json::{Value, json};

const ENGINEER_KEY: &str = "bench-engineer-key-0123456789abcdef";
const ANALYST_KEY: &str = "bench-analyst-key-0123456789abcdefg";
const PEERS: &str = "duckdb datafusion polars chdb deltalake psycopg2";

struct Marsad {
    _process: Running,
    ingest: String,
    query: String,
    pg_port: u16,
}

fn marsad(dir: &Path) -> Result<Marsad> {
    use sha2::Digest;
    let (ingest_port, query_port, pg_port) = (free_port()?, free_port()?, free_port()?);
    let key = |name: &str, secret: &str| {
        format!(
            "[[query.keys]]\nname = \"{name}\"\nroles = [\"{name}\"]\nsha256 = \"{}\"\n",
            hex::encode(sha2::Sha256::digest(secret.as_bytes()))
        )
    };
    std::fs::write(
        dir.join("marsad.toml"),
        key("engineer", ENGINEER_KEY) + &key("analyst", ANALYST_KEY),
    )?;
    let log = std::fs::File::create(dir.join("marsad.log"))?;
    let child = Command::new(env!("CARGO_BIN_EXE_marsad"))
        .args(["up", "--config"])
        .arg(dir.join("marsad.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--ingest-addr", &format!("127.0.0.1:{ingest_port}")])
        .args(["--query-addr", &format!("127.0.0.1:{query_port}")])
        .args(["--pg-addr", &format!("127.0.0.1:{pg_port}")])
        .env("RUST_LOG", "warn")
        // one address sends the whole load: the per-address limits would refuse most of it
        .env("MARSAD_INGEST__LIMITS__RATE_PER_SECOND", "0")
        .env("MARSAD_QUERY__LIMITS__RATE_PER_SECOND", "0")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting marsad up")?;
    let m = Marsad {
        _process: Running(child),
        ingest: format!("http://127.0.0.1:{ingest_port}"),
        query: format!("http://127.0.0.1:{query_port}"),
        pg_port,
    };
    common::wait_serving(&[&m.ingest, &m.query])?;
    Ok(m)
}

fn events_in_table(m: &Marsad) -> Result<u64> {
    let answer: Value = Client::new()
        .post(format!("{}/v1/sql", m.query))
        .bearer_auth(ENGINEER_KEY)
        .json(&json!({"sql": "SELECT count(*) AS n FROM events"}))
        .send()?
        .error_for_status()?
        .json()?;
    answer["rows"][0]["n"].as_u64().context("a count")
}

/// `traffic_hourly`'s rows per key (partial rows not merged yet), if the table is there.
fn rollup_rows_per_key(client: &Client, m: &Marsad) -> Option<f64> {
    let sql = "SELECT count(*) AS row_count, (SELECT count(*) FROM (SELECT DISTINCT hour, country, region, \
               device_type, os, browser, language, page_category, referrer_domain, event_type \
               FROM traffic_hourly) AS k) AS key_count FROM traffic_hourly";
    let answer: Value = client
        .post(format!("{}/v1/sql", m.query))
        .bearer_auth(ENGINEER_KEY)
        .json(&json!({ "sql": sql }))
        .send()
        .ok()?
        .json()
        .ok()?;
    let (rows, keys) = (
        answer["rows"][0]["row_count"].as_f64()?,
        answer["rows"][0]["key_count"].as_f64()?,
    );
    (keys > 0.0).then_some(rows / keys)
}

/// Seconds from sending probe `n` (one event) to seeing it in `/v1/sql` (polled every 100 ms,
/// so up to about 0.1 s late); `None` if it was refused or not seen within a minute.
fn freshness_probe(client: &Client, m: &Marsad, n: u64) -> Option<f64> {
    let id = format!("freshness-probe-{n}");
    let sent = Instant::now();
    let accepted = client
        .post(format!("{}/v1/events", m.ingest))
        .json(&json!({"type": "page_view", "url": "https://kulshi.example/en/probe",
                      "cookie_id": format!("probe-cookie-{n}"), "event_id": id}))
        .send()
        .ok()?;
    if accepted.status().as_u16() != 202 {
        return None;
    }
    let sql = format!("SELECT count(*) AS n FROM events WHERE event_id = '{id}'");
    while sent.elapsed() < Duration::from_secs(60) {
        let seen: Option<Value> = client
            .post(format!("{}/v1/sql", m.query))
            .bearer_auth(ENGINEER_KEY)
            .json(&json!({ "sql": sql }))
            .send()
            .ok()
            .and_then(|r| r.json().ok());
        if seen.is_some_and(|v| v["rows"][0]["n"].as_u64() == Some(1)) {
            return Some(sent.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// `marsad simulate` into `m` at `rate` events/s for `seconds` from `visitors` visitors.
fn simulate(m: &Marsad, rate: u64, seconds: u64, visitors: u64) -> Result<()> {
    let simulated = Command::new(env!("CARGO_BIN_EXE_marsad"))
        .args(["simulate", "--url", &m.ingest])
        .args(["--rate", &rate.to_string(), "--duration", &seconds.to_string()])
        .args(["--visitors", &visitors.to_string()])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .status()?;
    ensure!(simulated.success(), "marsad simulate failed");
    Ok(())
}

/// Waits until every event is in `events`: the count holds still for 3 s.
fn drain(m: &Marsad) -> Result<()> {
    let (mut last, mut still_since) = (0, Instant::now());
    wait_until("the processor to drain", Duration::from_secs(900), || {
        let n = events_in_table(m).unwrap_or(0);
        if n != last || n == 0 {
            (last, still_since) = (n, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(400));
        still_since.elapsed() > Duration::from_secs(3)
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn peers(dir: &Path, m: &Marsad, label: &str) -> Result<()> {
    let status = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/engines.py"))
        .arg("--table")
        .arg(dir.join("data/tables/events"))
        .args(["--url", &m.query, "--key", ENGINEER_KEY, "--reports-key", ANALYST_KEY])
        .args(["--pg-port", &m.pg_port.to_string(), "--label", label])
        .status()
        .context("python3 benches/engines.py")?;
    ensure!(status.success(), "benches/engines.py failed");
    Ok(())
}

fn main() -> Result<()> {
    let installed = Command::new("python3")
        .args(["-c", &format!("import {}", PEERS.replace(' ', ", "))])
        .status()?;
    ensure!(
        installed.success(),
        "the peers are missing: python3 -m pip install duckdb datafusion polars chdb deltalake psycopg2-binary"
    );
    let (rate, seconds, visitors) = (
        env_or("ENGINES_RATE", 40_000),
        env_or("ENGINES_SECONDS", 25),
        env_or("ENGINES_VISITORS", 200_000),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "engines: {} on {cores} cores; marsad simulate --rate {rate} --duration {seconds} --visitors {visitors}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    let tmp = tempfile::tempdir()?;
    let m = marsad(tmp.path())?;
    let started = Instant::now();
    // what a report would read at any moment of the load: rollup rows per key, every 2 s
    let sampling = std::sync::atomic::AtomicBool::new(true);
    type Sampled = (Vec<f64>, Vec<Option<f64>>);
    let (samples, probes) = std::thread::scope(|scope| -> Result<Sampled> {
        let sampler = scope.spawn(|| {
            let (client, mut seen) = (Client::new(), Vec::new());
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                seen.extend(rollup_rows_per_key(&client, &m));
                std::thread::sleep(Duration::from_secs(2));
            }
            seen
        });
        // one event a second, timed from its send to its row in `/v1/sql`, while the load runs
        // (each probe its own thread, sent on the second whether or not the last was seen)
        let prober = scope.spawn(|| {
            let (client, start) = (Client::new(), Instant::now());
            std::thread::scope(|probes| {
                let sent: Vec<_> = (0..seconds)
                    .map(|n| {
                        std::thread::sleep((start + Duration::from_secs(n)).saturating_duration_since(Instant::now()));
                        let (client, m) = (&client, &m);
                        probes.spawn(move || freshness_probe(client, m, n))
                    })
                    .collect();
                sent.into_iter().map(|p| p.join().unwrap_or(None)).collect::<Vec<_>>()
            })
        });
        // and while the processor drains what is left
        let loaded = simulate(&m, rate, seconds, visitors).and_then(|()| drain(&m));
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        let seen = sampler.join().unwrap_or_default();
        let probes = prober.join().unwrap_or_default();
        loaded.map(|()| (seen, probes))
    })?;
    let mut fresh: Vec<f64> = probes.iter().flatten().copied().collect();
    fresh.sort_by(f64::total_cmp);
    let at = |q: f64| fresh.get(((fresh.len() as f64 * q) as usize).min(fresh.len().saturating_sub(1)));
    println!(
        "freshness during the load: sent → visible in /v1/sql p50 {:.2} s, p95 {:.2} s, max {:.2} s \
         ({} probes, {} refused or not seen within 60 s)",
        at(0.5).copied().unwrap_or(f64::NAN),
        at(0.95).copied().unwrap_or(f64::NAN),
        fresh.last().copied().unwrap_or(f64::NAN),
        probes.len(),
        probes.iter().filter(|p| p.is_none()).count()
    );
    println!(
        "{} events sent and processed in {:.0} s; traffic_hourly rows per key during the load: \
         max {:.1}, median {:.1} ({} samples)",
        events_in_table(&m)?,
        started.elapsed().as_secs_f64(),
        samples.iter().copied().fold(0.0, f64::max),
        median(&samples),
        samples.len()
    );
    peers(tmp.path(), &m, "as written")?;
    let compacted = Command::new(env!("CARGO_BIN_EXE_marsad"))
        .args(["compact", "--config"])
        .arg(tmp.path().join("marsad.toml"))
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(compacted.success(), "marsad compact failed");
    std::thread::sleep(Duration::from_secs(2)); // the catalog's refresh interval
    peers(tmp.path(), &m, "after marsad compact")?;
    Ok(())
}
