//! Dashboard reports under concurrency, with the tables on object storage (not criterion:
//! whole-service runs).
//!
//! `cargo bench --bench concurrency` starts moto's S3 server (`python3 -m moto.server`, from
//! `./test`'s installs) and `marsad up` with its tables in a bucket, sends a day of
//! synthetic traffic through ingest, then asks for the dashboard's six reports:
//! 1. one request at a time (the baseline), p50/p99;
//! 2. 16 clients at once in a closed loop, p50/p99 and requests per second;
//!
//! each with the catalog's refresh interval at its default (every table checked for new
//! commits at most every 500 ms, off the query path of other tables) and at 0 (every query
//! checks every table it reads in the bucket, as before), restarting Marsad in between; and
//! the cores Marsad and moto kept busy meanwhile (from /proc), which tells a machine that is
//! out of CPU from requests waiting on one another.
//!
//! Knobs: `CONCURRENCY_EVENTS` (default 60,000), `CONCURRENCY_SECONDS` (10),
//! `CONCURRENCY_CLIENTS` (16).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::{Running, env_or, free_port, wait_until};
use reqwest::blocking::Client;
use serde_json::{Value, json};

const REPORTS: [&str; 6] = [
    "traffic?granularity=hour",
    "geo",
    "devices",
    "categories",
    "campaigns",
    "demographics",
];
const ANALYST_KEY: &str = "bench-analyst-key-0123456789abcdef";
const BUCKET: &str = "marsad-bench";

fn moto(dir: &Path) -> Result<(Running, String)> {
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("moto.log"))?;
    let child = Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("python3 -m moto.server (pip install 'moto[server]', or run ./test once)")?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let server = Running(child);
    wait_until("moto answers", Duration::from_secs(30), || {
        Client::new().get(&endpoint).send().is_ok()
    })?;
    let created = Client::new().put(format!("{endpoint}/{BUCKET}")).send()?;
    ensure!(
        created.status().is_success(),
        "creating the bucket: {}",
        created.status()
    );
    Ok((server, endpoint))
}

struct Marsad {
    process: Running,
    ingest: String,
    query: String,
}

/// `marsad up` on `dir`, with its tables in the bucket behind `s3` (else under the data dir).
fn marsad(dir: &Path, s3: Option<&str>, refresh_ms: u64) -> Result<Marsad> {
    use sha2::Digest;
    let (ingest_port, query_port, pg_port) = (free_port()?, free_port()?, free_port()?);
    let config = dir.join("marsad.toml");
    std::fs::write(
        &config,
        format!(
            "[[query.keys]]\nname = \"dashboard\"\nroles = [\"analyst\"]\nsha256 = \"{}\"\n",
            hex::encode(sha2::Sha256::digest(ANALYST_KEY.as_bytes()))
        ),
    )?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("marsad.log"))?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_marsad"));
    command
        .args(["up", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--ingest-addr", &format!("127.0.0.1:{ingest_port}")])
        .args(["--query-addr", &format!("127.0.0.1:{query_port}")])
        .args(["--pg-addr", &format!("127.0.0.1:{pg_port}")])
        .args(["--trusted-proxy", "127.0.0.1/32"]);
    if let Some(endpoint) = s3 {
        command
            .env("MARSAD_TABLES__LOCATION", format!("s3://{BUCKET}/marsad"))
            .env("MARSAD_TABLES__STORAGE__AWS_ENDPOINT", endpoint)
            .env("MARSAD_TABLES__STORAGE__AWS_ALLOW_HTTP", "true")
            .env("MARSAD_TABLES__STORAGE__AWS_REGION", "us-east-1");
    }
    let child = command
        .env("MARSAD_QUERY__TABLE_REFRESH_MS", refresh_ms.to_string())
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting marsad up")?;
    let m = Marsad {
        process: Running(child),
        ingest: format!("http://127.0.0.1:{ingest_port}"),
        query: format!("http://127.0.0.1:{query_port}"),
    };
    common::wait_serving(&[&m.ingest, &m.query])?;
    Ok(m)
}

/// A day of classified-ads traffic: countries, devices, categories, campaigns, declared demographics.
fn send_traffic(m: &Marsad, events: u64) -> Result<()> {
    let client = Client::new();
    let places = ["176.29", "188.48", "94.200", "41.32", "37.236"];
    let agents = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36",
        "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Mobile Safari/537.36",
        "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    ];
    let paths = [
        "/ar/سيارات/تويوتا",
        "/en/jobs/sales",
        "/en/real-estate/amman",
        "/ar/أثاث/كنب",
        "/en/electronics/phones",
    ];
    let now = chrono::Utc::now();
    for start in (0..events).step_by(500) {
        let place = places[(start / 500 % 5) as usize];
        let batch: Vec<Value> = (start..(start + 500).min(events))
            .map(|i| {
                let v = i * 7_919 % 20_000;
                let ts = now - chrono::Duration::seconds((i * 86_000 / events) as i64);
                let age_band = ["18-24", "25-34", "35-44"][(v % 3) as usize];
                json!({
                    "type": if i % 10 == 0 { "ad_impression" } else { "page_view" },
                    "url": format!("https://kulshi.example{}", paths[(v % 5) as usize]),
                    "cookie_id": format!("c-{v}"), "event_id": format!("e-{i}"), "ts": ts,
                    "ad": {"ad_id": format!("ad-{}", v % 7), "campaign_id": format!("cmp-{}", v % 3), "placement": "top"},
                    "consent": {"personalisation": true},
                    "demographics": {"age_band": age_band, "gender": "female"},
                })
            })
            .collect();
        let resp = client
            .post(format!("{}/v1/batch", m.ingest))
            .header("x-forwarded-for", format!("{place}.{}.9", start % 250))
            .header("user-agent", agents[(start / 500 % 3) as usize])
            .json(&batch)
            .send()?;
        ensure!(resp.status().as_u16() == 202, "ingest: {}", resp.status());
    }
    Ok(())
}

fn report(client: &Client, query: &str, path: &str) -> Result<Duration> {
    let started = Instant::now();
    let resp = client
        .get(format!("{query}/v1/reports/{path}"))
        .bearer_auth(ANALYST_KEY)
        .send()?;
    let status = resp.status();
    let body = resp.bytes()?;
    if !status.is_success() {
        bail!("{path}: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok(started.elapsed())
}

struct Latencies {
    ms: Vec<f64>,
    seconds: f64,
    /// Cores busy meanwhile: Marsad's, and moto's.
    cores: (f64, f64),
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // the fields after the command name (which is in parentheses and may hold spaces)
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

impl Latencies {
    fn at(&self, q: f64) -> f64 {
        let mut sorted = self.ms.clone();
        sorted.sort_by(f64::total_cmp);
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what:<24} {:>5} requests  p50 {:>7.1} ms  p99 {:>7.1} ms  {:>6.1} req/s  cores busy: marsad {:.2}, moto {:.2}",
            self.ms.len(),
            self.at(0.5),
            self.at(0.99),
            self.ms.len() as f64 / self.seconds,
            self.cores.0,
            self.cores.1
        )
    }
}

/// `clients` clients asking the six reports in turn for `seconds`.
fn load(m: &Marsad, moto: u32, clients: usize, seconds: u64) -> Result<Latencies> {
    let ms = Arc::new(Mutex::new(Vec::new()));
    let cpu_before = (cpu_seconds(m.process.0.id()), cpu_seconds(moto));
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let (ms, query) = (ms.clone(), m.query.clone());
            std::thread::spawn(move || -> Result<()> {
                let client = Client::new();
                let mut n = c;
                while Instant::now() < until {
                    let took = report(&client, &query, REPORTS[n % REPORTS.len()])?;
                    ms.lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(took.as_secs_f64() * 1000.0);
                    n += 1;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    let ms = ms.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let seconds = started.elapsed().as_secs_f64();
    Ok(Latencies {
        ms,
        seconds,
        cores: (
            (cpu_seconds(m.process.0.id()) - cpu_before.0) / seconds,
            (cpu_seconds(moto) - cpu_before.1) / seconds,
        ),
    })
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let events = env_or("CONCURRENCY_EVENTS", 60_000);
    let seconds = env_or("CONCURRENCY_SECONDS", 10);
    let clients = env_or("CONCURRENCY_CLIENTS", 16) as usize;
    let tmp = tempfile::tempdir()?;
    let (moto_server, endpoint) = moto(tmp.path())?;
    let moto_pid = moto_server.0.id();
    let (in_bucket, on_disk) = (tmp.path().join("s3"), tmp.path().join("local"));
    for (dir, s3) in [(&in_bucket, Some(endpoint.as_str())), (&on_disk, None)] {
        std::fs::create_dir_all(dir)?;
        let m = marsad(dir, s3, 500)?;
        send_traffic(&m, events)?;
        let client = Client::new();
        let admin = std::fs::read_to_string(dir.join("data/admin.key"))?;
        wait_until(
            "every event counted in traffic_hourly",
            Duration::from_secs(300),
            || {
                let counted = client
                    .post(format!("{}/v1/sql", m.query))
                    .bearer_auth(admin.trim())
                    .json(&json!({"sql": "SELECT CAST(sum(events) AS BIGINT) AS n FROM traffic_hourly"}))
                    .send()
                    .and_then(|r| r.json::<Value>());
                counted.is_ok_and(|v| v["rows"][0]["n"].as_u64() == Some(events))
            },
        )?;
    }
    println!(
        "dashboard reports ({} kinds), {events} events over a day, {clients} clients against one at a time:",
        REPORTS.len()
    );
    for (what, dir, s3, refresh) in [
        (
            "tables in an S3 bucket (moto), query.table_refresh_ms = 500",
            &in_bucket,
            Some(endpoint.as_str()),
            500,
        ),
        (
            "tables in an S3 bucket (moto), query.table_refresh_ms = 0",
            &in_bucket,
            Some(endpoint.as_str()),
            0,
        ),
        (
            "tables on local disk, query.table_refresh_ms = 500",
            &on_disk,
            None,
            500,
        ),
    ] {
        let m = marsad(dir, s3, refresh)?;
        let client = Client::new();
        for path in REPORTS {
            report(&client, &m.query, path)?; // warm: tables opened, providers built
        }
        let alone = load(&m, moto_pid, 1, seconds)?;
        let together = load(&m, moto_pid, clients, seconds)?;
        println!("  {what}:");
        println!("    {}", alone.line("one request at a time"));
        println!("    {}", together.line(&format!("{clients} clients at once")));
        println!(
            "    p50 at {clients} clients / alone: {:.1}x; throughput {:.1}x",
            together.at(0.5) / alone.at(0.5).max(f64::EPSILON),
            (together.ms.len() as f64 / together.seconds) / (alone.ms.len() as f64 / alone.seconds).max(f64::EPSILON)
        );
    }
    Ok(())
}
