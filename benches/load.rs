//! Whole-pipeline load harness (not criterion: these are seconds-long runs).
//!
//! `cargo bench --bench load` measures, in one run on this machine:
//! 1. single-event ingest (one event per request, as the tracker sends) beside the same
//!    server's `/healthz`, requests/s with p50 and p99 latency (`LOAD_ONLY=single`: only this);
//! 2. batched ingest events/s into the durable local log (fsync per group commit),
//!    next to a no-op axum handler taking the same requests from the same client,
//!    and through Kafka (librdkafka's mock cluster in this process, and the broker
//!    process `tansu` when it is installed), each acknowledged by the brokers;
//! 3. processor events/s per CPU-second (log → anonymize → Delta `events`).
//!
//! Figures are printed as ratios against the baseline of the same run; the machine
//! is shared and noisy, so absolute numbers are context, not targets.
//! Knobs: `LOAD_SECONDS` (default 10), `LOAD_CONCURRENCY` (32), `LOAD_BATCH` (100), `LOAD_EVENTS` (200000),
//! `LOAD_ONLY` (`single`).

/// The binary's allocator (`src/main.rs`), so the stages run here as they do in `marsad`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::routing::post;
use marsad_config::Config;
use marsad_eventlog::{EventLog, KafkaLog, KafkaLogOptions, LocalLog, LocalLogOptions, Record};
use marsad_process::{ProcessMetrics, Processor};
use marsad_schemas::{ENVELOPE_VERSION, Envelope, TOPIC_RAW};
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU seconds this process has used (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn event_json(i: u64) -> serde_json::Value {
    let paths = [
        "/ar/سيارات/تويوتا/كامري",
        "/en/real-estate/apartments-for-rent/dubai?page=2",
        "/en/jobs/sales",
        "/ar/أثاث/كنب",
    ];
    serde_json::json!({
        "type": if i.is_multiple_of(5) { "ad_impression" } else { "page_view" },
        "url": format!("https://kulshi.example{}?utm_source=google&id={i}", paths[(i % 4) as usize]),
        "referrer": "https://www.google.com/",
        "cookie_id": format!("c-{:012x}", i % 50_000),
        "user_id": if i.is_multiple_of(5) { serde_json::Value::from(format!("u-{}", i % 10_000)) } else { serde_json::Value::Null },
        "event_id": format!("bench-{i}"),
        "ad": {"ad_id": "ad-9", "campaign_id": "cmp-3", "placement": "top-banner"},
        "consent": {"analytics": true, "personalisation": !i.is_multiple_of(3)},
    })
}

async fn serve(app: axum::Router) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await });
    Ok(addr)
}

/// Sends batches from `concurrency` clients for `seconds`; returns acknowledged events/s.
async fn drive(addr: SocketAddr, seconds: u64, concurrency: u64, batch: u64) -> Result<f64> {
    let body: Arc<Vec<u8>> = Arc::new(serde_json::to_vec(&(0..batch).map(event_json).collect::<Vec<_>>())?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency as usize)
        .build()?;
    let acked = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, body, acked) = (client.clone(), body.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let resp = client
                    .post(format!("http://{addr}/v1/batch"))
                    .header("content-type", "application/json")
                    .header("x-forwarded-for", "176.29.10.1")
                    .body(body.as_ref().clone())
                    .send()
                    .await;
                if let Ok(r) = resp
                    && r.status().as_u16() == 202
                {
                    acked.fetch_add(batch, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(acked.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

async fn ingest_figures(seconds: u64, concurrency: u64, batch: u64) -> Result<()> {
    let noop = axum::Router::new().route(
        "/v1/batch",
        post(|body: axum::body::Bytes| async move {
            let _ = body.len();
            (axum::http::StatusCode::ACCEPTED, "{\"accepted\":0}")
        }),
    );
    let noop_addr = serve(noop).await?;
    let dir = tempfile::tempdir()?;
    let config = ingest_config(dir.path());
    let log: Arc<dyn EventLog> = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    let marsad_addr = serve(ingest_on(&config, log)).await?;

    // Kafka: librdkafka's mock cluster in this process, and the broker process tansu if installed
    let cluster = rdkafka::mocking::MockCluster::new(1)?;
    cluster.create_topic(marsad_schemas::TOPIC_RAW, 12, 1)?;
    let mock_addr = serve(ingest_on(
        &config,
        Arc::new(KafkaLog::connect(KafkaLogOptions::new(cluster.bootstrap_servers()))?),
    ))
    .await?;
    let tansu = Tansu::start().await?;
    let tansu_addr = match &tansu {
        Some(t) => Some(
            serve(ingest_on(
                &config,
                Arc::new(KafkaLog::connect(KafkaLogOptions::new(t.brokers.clone()))?),
            ))
            .await?,
        ),
        None => None,
    };

    let baseline = drive(noop_addr, seconds, concurrency, batch).await?;
    let ingest = drive(marsad_addr, seconds, concurrency, batch).await?;
    let mock = drive(mock_addr, seconds, concurrency, batch).await?;
    let real = match tansu_addr {
        Some(a) => Some(drive(a, seconds, concurrency, batch).await?),
        None => None,
    };
    println!("ingest (batches of {batch}, {concurrency} clients, {seconds}s each, same client):");
    println!("  no-op axum handler                 {baseline:>10.0} events/s");
    println!(
        "  marsad ingest → local log          {ingest:>10.0} events/s   ratio {:.2} of no-op",
        ingest / baseline
    );
    println!(
        "  marsad ingest → Kafka (mock)       {mock:>10.0} events/s   ratio {:.2} of the local log",
        mock / ingest
    );
    match real {
        Some(real) => println!(
            "  marsad ingest → Kafka (tansu)      {real:>10.0} events/s   ratio {:.2} of the local log",
            real / ingest
        ),
        None => println!("  marsad ingest → Kafka (tansu)      not run: `cargo install tansu --features dynostore`"),
    }
    drop(tansu);
    Ok(())
}

/// The config of an ingest on `dir` taking the whole load from one address (the per-address
/// limit would refuse most of it).
fn ingest_config(dir: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: dir.to_owned(),
        ..Config::default()
    };
    config.ingest.limits.rate_per_second = 0;
    config
}

fn ingest_on(config: &Config, log: Arc<dyn EventLog>) -> axum::Router {
    marsad_ingest::app(marsad_ingest::IngestState::new(
        config,
        log,
        marsad_ingest::IngestPrivacy {
            identity_key: None,
            keys: Arc::default(),
            opt_outs: Arc::default(),
            subject_keys: marsad_privacy::keys::SubjectKeys::from_seed(3),
        },
    ))
}

/// The Kafka-protocol broker `tansu` as a process on loopback (in-memory storage), if installed.
struct Tansu {
    child: std::process::Child,
    brokers: String,
}

impl Tansu {
    async fn start() -> Result<Option<Self>> {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let binary = std::path::PathBuf::from(home).join(".cargo/bin/tansu");
        if !binary.is_file() {
            return Ok(None);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let brokers = format!("127.0.0.1:{port}");
        let t = Tansu { child, brokers };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(&t.brokers).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let admin = KafkaLog::connect(KafkaLogOptions::new(t.brokers.clone()))?;
        admin
            .create_topics(&[marsad_eventlog::TopicSpec {
                name: marsad_schemas::TOPIC_RAW.into(),
                partitions: 12,
                replication: 1,
                config: Vec::new(),
            }])
            .await?;
        Ok(Some(t))
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn processor_figures(events: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    let received_at = chrono::Utc::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(10_000) {
        let records = chunk
            .iter()
            .map(|i| {
                let env = Envelope {
                    v: ENVELOPE_VERSION,
                    event: serde_json::from_value(event_json(*i)).unwrap_or_else(|e| panic!("bench event: {e}")),
                    received_at,
                    client_ip: Some(format!("176.29.{}.{}", i % 250, i % 200 + 1).parse().unwrap_or_else(|e| panic!("{e}"))),
                    user_agent: Some("Mozilla/5.0 (Linux; Android 13; SM-A536B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36".into()),
                    accept_language: Some("ar-JO,ar;q=0.9".into()),
                    dnt: false,
                    gpc: false,
                };
                Record { key: None, payload: env.to_bytes() }
            })
            .collect();
        log.append(TOPIC_RAW, records).await?;
    }
    let metrics = Arc::new(ProcessMetrics::new());
    let processor = Processor::new(&config, log, Arc::default(), metrics.clone()).await?;
    let shutdown = CancellationToken::new();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let run = tokio::spawn(processor.run(shutdown.clone()));
    while metrics.events_written.get() < events {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    shutdown.cancel();
    run.await??;
    println!("processor ({events} events from the local log into Delta `events`):");
    println!(
        "  wall {wall:.2}s, cpu {cpu:.2}s → {:.0} events/s, {:.0} events per cpu-second (per core)",
        events as f64 / wall,
        events as f64 / cpu
    );
    Ok(())
}

/// One request per event, as the tracker sends: `concurrency` clients for `seconds`, each
/// timing its requests; returns requests/s answered with `ok` and the p50 and p99 latency (ms).
async fn drive_requests(
    concurrency: u64,
    seconds: u64,
    ok: u16,
    request: impl Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Result<(f64, f64, f64)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency as usize)
        .build()?;
    let request = Arc::new(request);
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_no in 0..concurrency {
        let (client, request) = (client.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = client_no << 32;
            while Instant::now() < end {
                n += 1;
                let sent = Instant::now();
                if let Ok(r) = request(&client, n).send().await
                    && r.status().as_u16() == ok
                {
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let at = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .copied()
    };
    Ok((rate, at(0.5).unwrap_or(f64::NAN), at(0.99).unwrap_or(f64::NAN)))
}

/// Single-event ingest into the durable local log beside the same server's `/healthz`.
async fn single_event_figures(seconds: u64, concurrency: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = ingest_config(dir.path());
    let log: Arc<dyn EventLog> = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    let addr = serve(ingest_on(&config, log)).await?;
    let health = drive_requests(concurrency, seconds, 200, move |c, _| {
        c.get(format!("http://{addr}/healthz"))
    })
    .await?;
    let events = drive_requests(concurrency, seconds, 202, move |c, n| {
        c.post(format!("http://{addr}/v1/events"))
            .header("content-type", "application/json")
            .header("x-forwarded-for", "176.29.10.1")
            .body(serde_json::to_vec(&event_json(n)).unwrap_or_default())
    })
    .await?;
    println!("single events (one per request, {concurrency} clients, {seconds}s each, same client and server):");
    println!(
        "  GET /healthz                       {:>10.0} requests/s   p50 {:.2} ms   p99 {:.2} ms",
        health.0, health.1, health.2
    );
    println!(
        "  POST /v1/events → local log        {:>10.0} requests/s   p50 {:.2} ms   p99 {:.2} ms   ratio {:.2} of /healthz",
        events.0,
        events.1,
        events.2,
        events.0 / health.0
    );
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else to parse
    let seconds = env_or("LOAD_SECONDS", 10);
    let concurrency = env_or("LOAD_CONCURRENCY", 32);
    let batch = env_or("LOAD_BATCH", 100);
    let events = env_or("LOAD_EVENTS", 200_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // LOAD_ONLY=single: only the single-event figures
    let only = std::env::var("LOAD_ONLY").unwrap_or_default();
    rt.block_on(async {
        single_event_figures(seconds, concurrency).await?;
        if only == "single" {
            return Ok(());
        }
        ingest_figures(seconds, concurrency, batch).await?;
        processor_figures(events).await
    })
}
