//! Audience and rollup benchmark (not criterion: whole-service runs).
//!
//! `cargo bench --bench audience` builds a data dir with 30 days of synthetic
//! traffic (through the real processor: events, rollups, segments), then:
//! 1. starts `marsad query` as its own process and loads `GET /v1/audience`
//!    from this process: closed-loop throughput, then an open-loop run at a
//!    fixed rate (20k req/s, or 80% of the closed-loop rate if lower), each
//!    with p50/p99 latency (open loop: from each request's send, and from its
//!    due time, which adds the pacer's 1-ms release steps); next to `GET
//!    /healthz` of the same server, loaded the same way, as the baseline;
//! 2. answers the dashboard question "unique visitors and page views by
//!    country and device for 30 days" from `traffic_hourly` and from raw
//!    `events`, as a ratio, with the rollups as the processor wrote them and
//!    after compaction.
//!
//! Knobs: `AUDIENCE_EVENTS` (default 1,000,000), `AUDIENCE_SECONDS` (5),
//! `AUDIENCE_CONNECTIONS` (16), `AUDIENCE_RATE` (20000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::Utc;
use marsad_config::{Config, SegmentDefinition, SegmentRule};
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
use marsad_process::{ProcessMetrics, Processor};
use marsad_schemas::{ENVELOPE_VERSION, Envelope, TOPIC_RAW};
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Distinct cookies: about 20 events each, at most 50,000 (set once from `AUDIENCE_EVENTS`).
static VISITORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(50_000);

fn visitors() -> u64 {
    VISITORS.load(std::sync::atomic::Ordering::Relaxed)
}
const COUNTRIES: [&str; 5] = ["176.29", "188.48", "94.200", "41.32", "37.236"];
const AGENTS: [&str; 3] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
];

/// Event `i` of 30 days of traffic; the envelope's receive time is spread over the days.
fn record(i: u64, n: u64) -> Record {
    let now = Utc::now();
    let age = chrono::Duration::seconds((30 * 86_400 * (n - i) / n) as i64);
    let v = i * 7_919 % visitors();
    let paths = [
        "/ar/سيارات/تويوتا",
        "/en/jobs/sales",
        "/en/real-estate/amman",
        "/ar/أثاث/كنب",
    ];
    let event = serde_json::json!({
        "type": if i.is_multiple_of(10) { "ad_click" } else { "page_view" },
        "url": format!("https://kulshi.example{}", paths[(v % 4) as usize]),
        "cookie_id": format!("c-{v}"),
        "event_id": format!("b-{i}"),
        "ad": {"ad_id": "ad-1", "campaign_id": "cmp-1", "placement": "top"},
        "consent": {"analytics": true, "personalisation": true},
    });
    let env = Envelope {
        v: ENVELOPE_VERSION,
        event: serde_json::from_value(event).unwrap_or_else(|e| panic!("bench event: {e}")),
        received_at: now - age,
        client_ip: format!("{}.{}.{}", COUNTRIES[(v % 5) as usize], v % 250, 1 + v % 200)
            .parse()
            .ok(),
        user_agent: Some(AGENTS[(v % 3) as usize].into()),
        accept_language: Some("ar".into()),
        dnt: false,
        gpc: false,
    };
    Record {
        key: None,
        payload: env.to_bytes(),
    }
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_owned(),
        ..Config::default()
    };
    // keep the daily keys of the synthetic month (a real deployment destroys them after 48 h)
    c.privacy.daily_key_grace_hours = 24 * 40;
    c.audience.segments = ["cars", "jobs", "real_estate", "furniture"]
        .iter()
        .map(|cat| SegmentDefinition {
            id: format!("{cat}-intenders"),
            description: String::new(),
            window_days: 30,
            country: vec![],
            region: vec![],
            device_type: vec![],
            age_band: vec![],
            gender: vec![],
            rules: vec![SegmentRule {
                event_type: Some("page_view".into()),
                page_category: Some((*cat).into()),
                campaign_id: None,
                at_least: 3,
            }],
        })
        .collect();
    c
}

async fn build_data(config: &Config, events: u64) -> Result<()> {
    let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    let started = Instant::now();
    let mut i = 0;
    while i < events {
        let chunk: Vec<Record> = (i..(i + 10_000).min(events)).map(|j| record(j, events)).collect();
        i += chunk.len() as u64;
        log.append(TOPIC_RAW, chunk).await?;
    }
    let metrics = Arc::new(ProcessMetrics::new());
    let processor = Processor::new(config, log.clone(), Arc::default(), metrics.clone()).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn(processor.run(stop.clone()));
    while metrics.events_written.get() < events {
        if run.is_finished() {
            bail!("the processor stopped early");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    run.await??;
    let summary =
        marsad_process::segments::refresh(&config.tables()?, &config.audience, &Default::default(), |_, _, _| {})
            .await?;
    eprintln!(
        "data: {events} events over 30 days, processed with rollups in {:.1} s; segments {:?}",
        started.elapsed().as_secs_f64(),
        summary
            .segments
            .iter()
            .map(|s| (s.id.as_str(), s.members))
            .collect::<Vec<_>>()
    );
    Ok(())
}

struct Latency {
    requests: usize,
    seconds: f64,
    p50_us: u64,
    p99_us: u64,
}

impl Latency {
    fn from(mut micros: Vec<u64>, seconds: f64) -> Self {
        micros.sort_unstable();
        let at = |q: f64| {
            micros
                .get(((micros.len() as f64 * q) as usize).min(micros.len().saturating_sub(1)))
                .copied()
        };
        Latency {
            requests: micros.len(),
            seconds,
            p50_us: at(0.50).unwrap_or(0),
            p99_us: at(0.99).unwrap_or(0),
        }
    }

    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http()
}

async fn one(client: &Client, uri: &hyper::Uri, key: &str) -> Result<u64> {
    let req = hyper::Request::get(uri.clone())
        .header("authorization", format!("Bearer {key}"))
        .body(http_body_util::Empty::new())?;
    let started = Instant::now();
    let resp = client.request(req).await?;
    let status = resp.status();
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await?;
    if !status.is_success() {
        bail!("{uri}: {status}");
    }
    Ok(started.elapsed().as_micros() as u64)
}

fn uris(base: &str, path: &str) -> Result<Vec<hyper::Uri>> {
    if path == "/healthz" {
        return Ok(vec![format!("{base}/healthz").parse()?]);
    }
    (0..1_000)
        .map(|i| Ok(format!("{base}/v1/audience?cookie_id=c-{}", i * 37 % visitors()).parse()?))
        .collect()
}

/// `connections` clients in a closed loop for `seconds`.
async fn closed_loop(base: &str, path: &str, key: &str, connections: u64, seconds: u64) -> Result<Latency> {
    let uris = Arc::new(uris(base, path)?);
    let client = client();
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, uris, key) = (client.clone(), uris.clone(), key.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c as usize;
            while Instant::now() < end {
                lat.push(one(&client, &uris[i % uris.len()], &key).await?);
                i += connections as usize;
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Latency::from(all, started.elapsed().as_secs_f64()))
}

/// Requests sent at a fixed `rate` for `seconds` regardless of answers (no coordinated omission:
/// latency counts from the scheduled send time).
/// Paced load: `rate` requests per second of `path`, released every millisecond. Returns the
/// latency from the moment each request is sent, and from the moment it was due (which adds the
/// pacer's own up-to-1-ms release delay and any queueing the server caused).
async fn open_loop(base: &str, path: &str, key: &str, rate: u64, seconds: u64) -> Result<(Latency, Latency)> {
    let uris = Arc::new(uris(base, path)?);
    let client = client();
    let started = tokio::time::Instant::now();
    let total = rate * seconds;
    let mut tasks = Vec::with_capacity(total as usize);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let per_ms = rate as f64 / 1000.0;
    let mut sent = 0u64;
    while sent < total {
        ticker.tick().await;
        let due = ((started.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64).min(total);
        while sent < due {
            let scheduled = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            let (client, uri, key) = (client.clone(), uris[sent as usize % uris.len()].clone(), key.to_owned());
            tasks.push(tokio::spawn(async move {
                let send = tokio::time::Instant::now();
                one(&client, &uri, &key).await?;
                anyhow::Ok((
                    send.elapsed().as_micros() as u64,
                    scheduled.elapsed().as_micros() as u64,
                ))
            }));
            sent += 1;
        }
    }
    let (mut service, mut due) = (Vec::with_capacity(tasks.len()), Vec::with_capacity(tasks.len()));
    for t in tasks {
        let (s, d) = t.await??;
        service.push(s);
        due.push(d);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((Latency::from(service, seconds), Latency::from(due, seconds)))
}

async fn dashboard_question(config: &Config) -> Result<(f64, f64, usize)> {
    let catalog = marsad_query::TableCatalog::new(config.tables()?);
    let since = (Utc::now() - chrono::Duration::days(30)).format("%Y-%m-%dT%H:%M:%SZ");
    let rollup = format!(
        "SELECT country, device_type, sum(events) FILTER (WHERE event_type = 'page_view') AS page_views, \
         hll_estimate(hll_merge(visitors)) AS visitors FROM traffic_hourly \
         WHERE hour >= TIMESTAMP '{since}' GROUP BY country, device_type"
    );
    let raw = format!(
        "SELECT country, device_type, count(*) FILTER (WHERE event_type = 'page_view') AS page_views, \
         count(DISTINCT visitor_key) AS visitors FROM events \
         WHERE NOT is_bot AND ts >= TIMESTAMP '{since}' GROUP BY country, device_type"
    );
    let mut timings = Vec::new();
    let mut rows = 0;
    for sql in [&rollup, &raw] {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let ctx = catalog.session().await?;
            let started = Instant::now();
            let out = ctx.sql(sql).await?.collect().await?;
            best = best.min(started.elapsed().as_secs_f64());
            rows = out.iter().map(|b| b.num_rows()).sum();
        }
        timings.push(best);
    }
    Ok((timings[0], timings[1], rows))
}

fn main() -> Result<()> {
    let events = env_or("AUDIENCE_EVENTS", 1_000_000);
    let seconds = env_or("AUDIENCE_SECONDS", 5);
    let connections = env_or("AUDIENCE_CONNECTIONS", 16);
    let target = env_or("AUDIENCE_RATE", 20_000);
    VISITORS.store((events / 20).clamp(100, 50_000), std::sync::atomic::Ordering::Relaxed);
    let dir = tempfile::tempdir()?;
    let config = config(dir.path());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(build_data(&config, events))?;

    for stage in [
        "as written (partial rows per commit)",
        "after compaction (one row per key)",
    ] {
        if stage.starts_with("after") {
            let done = runtime.block_on(marsad_process::rollup::compact(&config.tables()?, 2))?;
            eprintln!(
                "compacted {} dates: {} rows -> {}",
                done.len(),
                done.iter().map(|d| d.rows_before).sum::<usize>(),
                done.iter().map(|d| d.rows_after).sum::<usize>()
            );
        }
        let (rollup_s, raw_s, rows) = runtime.block_on(dashboard_question(&config))?;
        println!(
            "dashboard question over {events} events ({rows} country×device rows), rollups {stage}: \
             rollups {:.1} ms, raw events {:.1} ms, raw/rollups = {:.1}x",
            rollup_s * 1e3,
            raw_s * 1e3,
            raw_s / rollup_s
        );
    }

    // the query service in its own process, on the same data dir
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_marsad"))
        .args(["query", "--data-dir"])
        .arg(dir.path())
        .args(["--query-addr", &format!("127.0.0.1:{port}")])
        .env("MARSAD_QUERY__PG_ENABLED", "false")
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting marsad query")?;
    let base = format!("http://127.0.0.1:{port}");
    let key_file = dir.path().join("admin.key");
    let result = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = uris(&base, "/v1/audience")?;
        let key = loop {
            match std::fs::read_to_string(&key_file) {
                Ok(k) if !k.trim().is_empty() => break k.trim().to_owned(),
                _ if Instant::now() > deadline => bail!("marsad query wrote no admin key"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        loop {
            // ready once the index is loaded: a known member gets segments
            if let Ok(r) = reqwest::Client::new()
                .get(probe[1].to_string())
                .bearer_auth(&key)
                .send()
                .await
                && r.status().is_success()
                && r.text().await.unwrap_or_default().contains("intenders")
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("marsad query did not serve the audience index within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let health = closed_loop(&base, "/healthz", &key, connections, seconds).await?;
        let audience = closed_loop(&base, "/v1/audience", &key, connections, seconds).await?;
        let rate = target.min((audience.rate() * 0.8) as u64).max(1);
        let paced_health = open_loop(&base, "/healthz", &key, rate, seconds).await?;
        let paced = open_loop(&base, "/v1/audience", &key, rate, seconds).await?;
        anyhow::Ok((health, audience, rate, paced_health, paced))
    });
    let _ = child.kill();
    let _ = child.wait();
    let (health, audience, rate, paced_health, paced) = result?;
    println!(
        "GET /healthz baseline ({connections} connections): {:.0} req/s, p50 {} µs, p99 {} µs",
        health.rate(),
        health.p50_us,
        health.p99_us
    );
    println!(
        "GET /v1/audience closed loop ({connections} connections): {:.0} req/s ({:.2} of /healthz), p50 {} µs, p99 {} µs",
        audience.rate(),
        audience.rate() / health.rate(),
        audience.p50_us,
        audience.p99_us
    );
    for (what, (sent, due)) in [("/healthz   ", &paced_health), ("/v1/audience", &paced)] {
        println!(
            "GET {what} open loop at {rate} req/s: achieved {:.0} req/s; from send p50 {} µs, p99 {} µs; \
             from due time (with the 1-ms pacer) p50 {} µs, p99 {} µs",
            sent.rate(),
            sent.p50_us,
            sent.p99_us,
            due.p50_us,
            due.p99_us
        );
    }
    Ok(())
}
