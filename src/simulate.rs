//! `marsad simulate`: realistic traffic of a classified-ads site — Arabic and
//! English pages of cars, real estate, jobs, electronics, furniture and
//! services; mobile-heavy real-world agents; visitors in Jordan, Saudi
//! Arabia, the UAE, Egypt, Iraq and elsewhere (sent as `X-Forwarded-For`);
//! returning visitors with stable cookies; logged-in users with declared
//! demographics; ad impressions and clicks; some refused consent and GPC.
//!
//! Every send is retried with the same event ids until acknowledged (or the
//! retry window ends), so a crash of the server loses nothing acknowledged
//! and duplicates are dropped by `event_id` downstream.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use marsad_privacy::geoip::GeoIp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};

/// `marsad simulate` flags.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Ingest base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Events per second.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Seconds to run (0: until stopped).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Distinct visitors (cookies) to draw from.
    #[arg(long, default_value_t = 5_000)]
    pub visitors: u32,
    /// Random seed, for reproducible traffic.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Keep retrying an unacknowledged send this many seconds.
    #[arg(long, default_value_t = 60)]
    pub retry_for: u64,
    /// Append the id of every acknowledged event to this file (one per line).
    #[arg(long)]
    pub ack_log: Option<PathBuf>,
    /// Signs logged-in visitors' identity tokens as the site's backend would (from
    /// `MARSAD_SECRET_IDENTITY_KEY` when run alone); without it they stay anonymous.
    #[arg(skip)]
    pub identity_key: Option<Arc<marsad_privacy::keys::SecretKey>>,
}

impl SimulateArgs {
    /// Settings for `marsad up --simulate`: runs until stopped.
    pub fn background(url: String, rate: u32) -> Self {
        SimulateArgs {
            url,
            rate,
            duration: 0,
            visitors: 5_000,
            seed: 42,
            concurrency: 16,
            retry_for: 60,
            ack_log: None,
            identity_key: None,
        }
    }
}

/// Countries with the ranges the bundled GeoIP places there, and their traffic share.
const MARKETS: &[(&str, &[[u8; 2]], u32)] = &[
    ("JO", &[[176, 29], [94, 249]], 30),
    ("SA", &[[188, 48], [51, 36]], 25),
    ("AE", &[[94, 200], [86, 96]], 15),
    ("EG", &[[41, 32], [197, 32]], 15),
    ("IQ", &[[37, 236], [149, 255]], 10),
    ("GB", &[[81, 2]], 3),
    ("US", &[[8, 8]], 2),
];

const MOBILE_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Linux; Android 13; SM-A536B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/122.0.6261.64 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 12; HUAWEI P50) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; Redmi Note 12) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.6167.101 Mobile Safari/537.36 OPR/79.0.0.0",
];
const OTHER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:122.0) Gecko/20100101 Firefox/122.0",
    "Mozilla/5.0 (iPad; CPU OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
];

/// Pages per category, Arabic and English.
const PAGES: &[(&str, &[&str])] = &[
    (
        "cars",
        &[
            "/ar/سيارات/تويوتا/كامري",
            "/ar/سيارات/هيونداي/النترا",
            "/en/cars/toyota/land-cruiser",
            "/en/cars/kia/sportage",
            "/ar/سيارات/مرسيدس",
        ],
    ),
    (
        "real_estate",
        &[
            "/ar/عقارات/شقق-للايجار/عمان",
            "/ar/عقارات/أراضي-للبيع/اربد",
            "/en/real-estate/apartments-for-rent/dubai",
            "/en/real-estate/villas/riyadh",
        ],
    ),
    (
        "jobs",
        &[
            "/ar/وظائف/محاسب",
            "/ar/وظائف/مهندس-مدني",
            "/en/jobs/software-engineer",
            "/en/jobs/sales",
        ],
    ),
    (
        "electronics",
        &[
            "/ar/الكترونيات/موبايلات/ايفون-15",
            "/en/electronics/laptops",
            "/en/electronics/mobiles/samsung-s24",
            "/ar/الكترونيات/تلفزيونات",
        ],
    ),
    (
        "furniture",
        &["/ar/أثاث/كنب", "/en/furniture/bedrooms", "/ar/أثاث/مطابخ"],
    ),
    (
        "services",
        &["/ar/خدمات/تنظيف", "/en/services/moving", "/ar/خدمات/صيانة-مكيفات"],
    ),
];

const REFERRERS: &[&str] = &[
    "",
    "",
    "https://www.google.com/",
    "https://www.google.jo/",
    "https://www.facebook.com/",
    "https://www.instagram.com/",
    "https://kulshi.example/",
];

struct Visitor {
    cookie_id: String,
    user_id: Option<String>,
    ip: String,
    agent: &'static str,
    language: &'static str,
    personalisation: bool,
    analytics_refused: bool,
    gpc: bool,
    age_band: Option<&'static str>,
    gender: Option<&'static str>,
    favourite: usize,
}

/// An address in one of the market's ranges that the bundled database places in that market.
fn market_address(rng: &mut StdRng, geoip: Option<&GeoIp>, country: &str, prefixes: &[[u8; 2]]) -> String {
    let mut ip = String::new();
    for _ in 0..32 {
        let p = prefixes[rng.random_range(0..prefixes.len())];
        ip = format!(
            "{}.{}.{}.{}",
            p[0],
            p[1],
            rng.random_range(0..=255),
            rng.random_range(1..=254)
        );
        let placed = geoip.and_then(|g| ip.parse().ok().map(|a| g.lookup(a)));
        if placed.is_none_or(|l| l.country.as_deref() == Some(country)) {
            break;
        }
    }
    ip
}

fn make_visitor(rng: &mut StdRng, geoip: Option<&GeoIp>, n: u32) -> Visitor {
    let total: u32 = MARKETS.iter().map(|m| m.2).sum();
    let mut pick = rng.random_range(0..total);
    let market = MARKETS.iter().find(|m| {
        if pick < m.2 {
            true
        } else {
            pick -= m.2;
            false
        }
    });
    let (country, prefixes, _) = market.unwrap_or(&MARKETS[0]);
    let ip = market_address(rng, geoip, country, prefixes);
    let agent = if rng.random_bool(0.72) {
        MOBILE_AGENTS[rng.random_range(0..MOBILE_AGENTS.len())]
    } else {
        OTHER_AGENTS[rng.random_range(0..OTHER_AGENTS.len())]
    };
    let logged_in = rng.random_bool(0.2);
    Visitor {
        cookie_id: format!("c-{:016x}-{n}", rng.random::<u64>()),
        user_id: logged_in.then(|| format!("u-{}", 100_000 + n)),
        ip,
        agent,
        language: if rng.random_bool(0.7) {
            "ar-JO,ar;q=0.9,en;q=0.8"
        } else {
            "en-US,en;q=0.9"
        },
        personalisation: rng.random_bool(0.75),
        analytics_refused: rng.random_bool(0.03),
        gpc: rng.random_bool(0.05),
        age_band: logged_in.then(|| ["18-24", "25-34", "35-44", "45-54", "55-64"][rng.random_range(0..5)]),
        gender: logged_in.then(|| ["female", "male"][rng.random_range(0..2)]),
        favourite: rng.random_range(0..PAGES.len()),
    }
}

fn make_event(
    rng: &mut StdRng,
    v: &Visitor,
    seq: u64,
    identity_key: Option<&marsad_privacy::keys::SecretKey>,
) -> Value {
    let category = if rng.random_bool(0.6) {
        v.favourite
    } else {
        rng.random_range(0..PAGES.len())
    };
    let pages = PAGES[category].1;
    let mut path = pages[rng.random_range(0..pages.len())].to_owned();
    if rng.random_bool(0.3) {
        path.push_str(&format!("/ad-{}", rng.random_range(100_000..999_999)));
    }
    let mut url = format!("https://kulshi.example{path}");
    if rng.random_bool(0.15) {
        url.push_str(&format!("?page={}", rng.random_range(2..6)));
    } else if rng.random_bool(0.1) {
        url.push_str("?utm_source=facebook&utm_medium=cpc&utm_campaign=ramadan-cars");
    }
    let roll: f64 = rng.random();
    let event_type = match roll {
        r if r < 0.68 => "page_view",
        r if r < 0.88 => "ad_impression",
        r if r < 0.92 => "ad_click",
        r if r < 0.98 => "search",
        r if r < 0.99 => "ad_post",
        _ => "signup",
    };
    let mut ev = json!({
        "type": event_type,
        "url": url,
        "cookie_id": v.cookie_id,
        "event_id": format!("{}-{seq}", v.cookie_id),
        "consent": {"analytics": !v.analytics_refused, "personalisation": v.personalisation, "marketing": v.personalisation && rng.random_bool(0.5)},
    });
    let referrer = REFERRERS[rng.random_range(0..REFERRERS.len())];
    if !referrer.is_empty() {
        ev["referrer"] = referrer.into();
    }
    if let (Some(u), Some(key)) = (&v.user_id, identity_key) {
        // what the site's backend does for a logged-in visitor: sign who it is and what it declared
        let claims = marsad_privacy::identity::IdentityClaims {
            uid: u.clone(),
            exp: chrono::Utc::now().timestamp() + 3600,
            age_band: v.age_band.map(str::to_owned),
            gender: v.gender.map(str::to_owned),
        };
        ev["identity"] = marsad_privacy::identity::sign(key, &claims).into();
    }
    if event_type == "ad_impression" || event_type == "ad_click" {
        let campaign = rng.random_range(1..8);
        let placement = ["top-banner", "sidebar", "in-feed"][rng.random_range(0..3)];
        ev["ad"] = json!({"ad_id": format!("ad-{}", rng.random_range(1..60)), "campaign_id": format!("cmp-{campaign}"), "placement": placement});
    }
    if event_type == "search" {
        let query = ["تويوتا", "شقة للايجار", "iphone 15", "وظائف عمان"][rng.random_range(0..4)];
        ev["props"] = json!({ "search_query": query });
    }
    ev
}

/// What a simulation did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Events acknowledged with 2xx.
    pub acknowledged: u64,
    /// Events the server refused with 4xx (should be 0).
    pub rejected: u64,
    /// Events not collected (refused analytics consent).
    pub not_collected: u64,
    /// Events given up after the retry window.
    pub failed: u64,
    /// Sends retried after 503 or a connection error.
    pub retries: u64,
}

struct Shared {
    client: reqwest::Client,
    url: String,
    retry_for: Duration,
    acked: AtomicU64,
    rejected: AtomicU64,
    not_collected: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    ack_log: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

enum Send {
    Batch(Vec<Value>),
    Single(Value),
    Pixel(Value),
}

impl Shared {
    async fn send_once(&self, v: &Visitor, send: &Send) -> Result<reqwest::Response, reqwest::Error> {
        let mut req = match send {
            Send::Batch(events) => {
                let mut body = Vec::new();
                for e in events {
                    let _ = serde_json::to_writer(&mut body, e);
                    body.push(b'\n');
                }
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                let _ = gz.write_all(&body);
                let body = gz.finish().unwrap_or_default();
                self.client
                    .post(format!("{}/v1/batch", self.url))
                    .header("content-type", "application/x-ndjson")
                    .header("content-encoding", "gzip")
                    .body(body)
            }
            Send::Single(e) => self.client.post(format!("{}/v1/events", self.url)).json(e),
            Send::Pixel(e) => {
                let mut params = vec![("t", "page_view".to_owned())];
                if let Some(u) = e["url"].as_str() {
                    params.push(("u", u.to_owned()));
                }
                if let Some(id) = e["event_id"].as_str() {
                    params.push(("e", id.to_owned()));
                }
                self.client
                    .get(format!("{}/v1/p.gif", self.url))
                    .query(&params)
                    .header("cookie", format!("_mid={}", v.cookie_id))
            }
        };
        req = req
            .header("user-agent", v.agent)
            .header("accept-language", v.language)
            .header("x-forwarded-for", &v.ip);
        if v.gpc {
            req = req.header("sec-gpc", "1");
        }
        req.send().await
    }

    async fn deliver(&self, v: &Visitor, send: Send) {
        let events: Vec<&Value> = match &send {
            Send::Batch(e) => e.iter().collect(),
            Send::Single(e) | Send::Pixel(e) => vec![e],
        };
        let n = events.len() as u64;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.send_once(v, &send).await {
                Ok(resp) if resp.status().is_success() => {
                    let answer: Value = if matches!(send, Send::Pixel(_)) {
                        json!({"accepted": 1})
                    } else {
                        resp.json().await.unwrap_or(Value::Null)
                    };
                    let accepted = answer["accepted"].as_u64().unwrap_or(0);
                    let rejected: Vec<u64> = answer["rejected"]
                        .as_array()
                        .map(|r| r.iter().filter_map(|x| x["index"].as_u64()).collect())
                        .unwrap_or_default();
                    let not_collected = answer["not_collected"].as_u64().unwrap_or(0);
                    self.acked.fetch_add(accepted, Ordering::Relaxed);
                    self.rejected.fetch_add(rejected.len() as u64, Ordering::Relaxed);
                    self.not_collected.fetch_add(not_collected, Ordering::Relaxed);
                    if let Some(log) = &self.ack_log {
                        let mut log = log.lock().await;
                        for (i, e) in events.iter().enumerate() {
                            let refused_analytics = e["consent"]["analytics"] == Value::Bool(false);
                            if !rejected.contains(&(i as u64)) && !refused_analytics {
                                let _ = writeln!(log, "{}", e["event_id"].as_str().unwrap_or_default());
                            }
                        }
                        let _ = log.flush();
                    }
                    return;
                }
                Ok(resp) if resp.status().is_client_error() => {
                    let text = resp.text().await.unwrap_or_default();
                    tracing::warn!(answer = %text, "ingest refused simulated events");
                    self.rejected.fetch_add(n, Ordering::Relaxed);
                    return;
                }
                _ => {}
            }
            if started.elapsed() > self.retry_for {
                self.failed.fetch_add(n, Ordering::Relaxed);
                return;
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Runs the simulation and prints a summary.
pub async fn run(args: SimulateArgs) -> anyhow::Result<Summary> {
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    let ack_log = match &args.ack_log {
        Some(p) => Some(Mutex::new(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ))),
        None => None,
    };
    let shared = Arc::new(Shared {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(args.concurrency)
            .build()?,
        url: args.url.trim_end_matches('/').to_owned(),
        retry_for: Duration::from_secs(args.retry_for),
        acked: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        not_collected: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        ack_log,
    });
    let mut rng = StdRng::seed_from_u64(args.seed);
    let identity_key = match &args.identity_key {
        Some(k) => Some(k.clone()),
        None => std::env::var(marsad_privacy::keys::IDENTITY_KEY_ENV)
            .ok()
            .map(|hex| marsad_privacy::keys::SecretKey::from_hex("identity key", &hex))
            .transpose()?
            .map(Arc::new),
    };
    let geoip = GeoIp::bundled().ok();
    let visitors: Vec<Arc<Visitor>> = (0..args.visitors.max(1))
        .map(|n| Arc::new(make_visitor(&mut rng, geoip.as_ref(), n)))
        .collect();
    let seqs: Vec<AtomicU64> = (0..visitors.len()).map(|_| AtomicU64::new(0)).collect();
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let end = (args.duration > 0).then(|| started + Duration::from_secs(args.duration));
    let mut sent: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_report = Instant::now();
    // the run id keeps event ids unique across runs of the same seed
    let run_id: u32 = rand::random();
    while end.is_none_or(|e| Instant::now() < e) {
        // stay on the rate: send what is due, then sleep a little
        let due = (started.elapsed().as_secs_f64() * f64::from(args.rate)) as u64;
        if sent >= due {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let vi = rng.random_range(0..visitors.len());
        let v = visitors[vi].clone();
        let size = if rng.random_bool(0.7) {
            rng.random_range(2..12)
        } else {
            1
        };
        let mut events: Vec<Value> = (0..size)
            .map(|_| {
                let seq = seqs[vi].fetch_add(1, Ordering::Relaxed);
                let mut e = make_event(&mut rng, &v, seq, identity_key.as_deref());
                e["event_id"] = format!("{run_id:08x}-{}", e["event_id"].as_str().unwrap_or_default()).into();
                e
            })
            .collect();
        sent += events.len() as u64;
        let send = if events.len() > 1 {
            Send::Batch(events)
        } else if rng.random_bool(0.3)
            && events[0]["type"] == "page_view"
            && v.user_id.is_none()
            && !v.analytics_refused
        {
            Send::Pixel(events.remove(0))
        } else {
            Send::Single(events.remove(0))
        };
        let permit = permits.clone().acquire_owned().await?;
        let s = shared.clone();
        tasks.spawn(async move {
            s.deliver(&v, send).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
        if last_report.elapsed() > Duration::from_secs(5) {
            tracing::info!(
                sent,
                acknowledged = shared.acked.load(Ordering::Relaxed),
                retries = shared.retries.load(Ordering::Relaxed),
                "simulating"
            );
            last_report = Instant::now();
        }
    }
    while tasks.join_next().await.is_some() {}
    let summary = Summary {
        acknowledged: shared.acked.load(Ordering::Relaxed),
        rejected: shared.rejected.load(Ordering::Relaxed),
        not_collected: shared.not_collected.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        retries: shared.retries.load(Ordering::Relaxed),
    };
    println!(
        "simulated {sent} events in {:.1}s: {} acknowledged, {} not collected (analytics refused), {} rejected, {} failed, {} retries",
        started.elapsed().as_secs_f64(),
        summary.acknowledged,
        summary.not_collected,
        summary.rejected,
        summary.failed,
        summary.retries
    );
    Ok(summary)
}
