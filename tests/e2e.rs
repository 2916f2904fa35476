use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::common::{FIXTURE_COUNTRIES, Marsad, counts_by, parquet_strings, write_fixture_geoip};

const VISITORS: usize = 400;
const TOTAL: usize = 20_000;

struct Visitor {
    cookie: String,
    user: Option<String>,
    ip: String,
    country: &'static str,
}

fn visitors() -> Vec<Visitor> {
    (0..VISITORS)
        .map(|n| {
            let (country, p, _, _) = FIXTURE_COUNTRIES[n % FIXTURE_COUNTRIES.len()];
            Visitor {
                cookie: format!("ck-{n:04}-{:08x}", rand::random::<u32>()),
                user: (n % 4 == 0).then(|| format!("usr-{n:04}")),
                ip: format!("{}.{}.{}.{}", p[0], p[1], n / 200, n % 200 + 1),
                country,
            }
        })
        .collect()
}

fn event(i: usize, v: &Visitor) -> Value {
    let paths = [
        "/en/cars/toyota/camry",
        "/ar/%D8%B3%D9%8A%D8%A7%D8%B1%D8%A7%D8%AA",
        "/en/jobs/sales",
        "/ar/real-estate/amman?page=2&name=x",
    ];
    let mut e = json!({
        "type": if i.is_multiple_of(10) { "ad_impression" } else { "page_view" },
        "url": format!("https://kulshi.example{}", paths[i % paths.len()]),
        "cookie_id": v.cookie,
        "event_id": format!("ev-{i:06}"),
        "consent": {"analytics": true, "personalisation": !i.is_multiple_of(3)},
    });
    if let Some(u) = &v.user {
        e["identity"] = crate::common::identity_token(u, None, None).into();
    }
    if i.is_multiple_of(10) {
        e["ad"] = json!({"ad_id": "ad-1", "campaign_id": "cmp-1", "placement": "top-banner"});
    }
    e
}

enum Channel {
    Single,
    BatchObject,
    BatchArray,
    NdjsonGzip,
    Pixel,
}

struct Job {
    visitor: usize,
    channel: Channel,
    events: Vec<Value>,
}

fn jobs(vs: &[Visitor]) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut i = 0;
    let mut take = |n: usize, channel: fn() -> Channel, jobs: &mut Vec<Job>| {
        let visitor = (i / n) % VISITORS;
        let events = (i..i + n).map(|k| event(k, &vs[visitor])).collect();
        jobs.push(Job {
            visitor,
            channel: channel(),
            events,
        });
        i += n;
    };
    for _ in 0..2000 {
        take(1, || Channel::Single, &mut jobs);
    }
    for _ in 0..80 {
        take(100, || Channel::BatchObject, &mut jobs);
    }
    for _ in 0..20 {
        take(100, || Channel::BatchArray, &mut jobs);
    }
    for _ in 0..30 {
        take(200, || Channel::NdjsonGzip, &mut jobs);
    }
    for _ in 0..2000 {
        take(1, || Channel::Pixel, &mut jobs);
    }
    jobs
}

fn send(client: &reqwest::blocking::Client, base: &str, v: &Visitor, job: &Job) -> Result<u64> {
    let req = match job.channel {
        Channel::Single => client.post(format!("{base}/v1/events")).json(&job.events[0]),
        Channel::BatchObject => client
            .post(format!("{base}/v1/batch"))
            .json(&json!({"events": job.events})),
        Channel::BatchArray => client.post(format!("{base}/v1/batch")).json(&job.events),
        Channel::NdjsonGzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            for e in &job.events {
                serde_json::to_writer(&mut gz, e)?;
                gz.write_all(b"\n")?;
            }
            client
                .post(format!("{base}/v1/batch"))
                .header("content-type", "application/x-ndjson")
                .header("content-encoding", "gzip")
                .body(gz.finish()?)
        }
        Channel::Pixel => {
            let e = &job.events[0];
            client
                .get(format!("{base}/v1/p.gif"))
                .query(&[
                    ("t", "page_view"),
                    ("u", e["url"].as_str().unwrap_or_default()),
                    ("e", e["event_id"].as_str().unwrap_or_default()),
                ])
                .header("cookie", format!("_mid={}", v.cookie))
        }
    };
    let resp = req
        .header("x-forwarded-for", format!("10.9.9.9, {}", v.ip))
        .header("user-agent", "Mozilla/5.0 (Linux; Android 13; SM-A536B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36")
        .send()?;
    let status = resp.status();
    if matches!(job.channel, Channel::Pixel) {
        ensure!(status.is_success(), "pixel answered {status}");
        return Ok(1);
    }
    let body: Value = resp.json()?;
    ensure!(status.as_u16() == 202, "{status}: {body}");
    ensure!(
        body["rejected"].as_array().is_none_or(|r| r.is_empty()),
        "rejected: {body}"
    );
    body["accepted"].as_u64().context("accepted count")
}

/// Sends 20,000 events through every ingest path from 8 client threads.
fn send_all(m: &Marsad, vs: &[Visitor]) -> Result<(u64, HashMap<String, i64>)> {
    let queue = Mutex::new(jobs(vs));
    let acked_by_country: Mutex<HashMap<String, i64>> = Mutex::new(HashMap::new());
    let acked_total = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let client = reqwest::blocking::Client::new();
                    loop {
                        let Some(job) = queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop() else {
                            return Ok(());
                        };
                        let v = &vs[job.visitor];
                        let n = send(&client, &m.ingest, v, &job)?;
                        acked_total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        *acked_by_country
                            .lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .entry(v.country.to_owned())
                            .or_default() += n as i64;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    })?;
    let by_country = acked_by_country.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;
    Ok((acked_total.into_inner(), by_country))
}

#[test]
fn twenty_thousand_events_land_once_with_their_geography_and_nothing_identifying() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let geoip = tmp.path().join("fixture-city.mmdb");
    write_fixture_geoip(&geoip)?;
    let data = tmp.path().join("data");
    let m = Marsad::start(&data, Some(&geoip))?;
    let vs = visitors();

    let (acked, by_country) = send_all(&m, &vs)?;
    assert_eq!(acked, TOTAL as u64, "every event acknowledged");

    m.wait_for_count("SELECT count(*) FROM events", acked as i64, Duration::from_secs(120))?;
    assert_eq!(
        m.sql_count("SELECT count(DISTINCT event_id) FROM events")?,
        acked as i64,
        "no duplicates"
    );
    let stored = counts_by(&m.sql("SELECT country AS k, count(*) AS n FROM events GROUP BY country")?);
    assert_eq!(stored, by_country, "count per country matches the addresses sent");
    for (code, _, region, city) in FIXTURE_COUNTRIES {
        let n = m.sql_count(&format!(
            "SELECT count(*) FROM events WHERE country = '{code}' AND region = '{region}' AND city = '{city}'"
        ))?;
        assert_eq!(Some(&n), by_country.get(*code), "region and city of {code}");
    }
    // pages are decoded, query parameters outside the allow-list are gone
    let paths = counts_by(&m.sql("SELECT page_path AS k, count(*) AS n FROM events GROUP BY page_path")?);
    assert!(
        paths.contains_key("/ar/سيارات") && paths.contains_key("/ar/real-estate/amman?page=2"),
        "{paths:?}"
    );
    assert_eq!(
        m.sql_count(
            "SELECT count(*) FROM events WHERE audience_id IS NOT NULL AND event_id IN ('ev-000000', 'ev-000003')"
        )?,
        0,
        "no audience id without personalisation consent"
    );

    // privacy: no IP, cookie id or user id in any Parquet file (tables and checkpoints)
    // every cookie id starts `ck-`, every user id `usr-`, every address with a fixture /16
    let ip_prefixes: Vec<String> = FIXTURE_COUNTRIES
        .iter()
        .map(|(_, p, _, _)| format!("{}.{}.", p[0], p[1]))
        .collect();
    let secrets: HashSet<&str> = vs
        .iter()
        .flat_map(|v| [Some(v.cookie.as_str()), v.user.as_deref(), Some(v.ip.as_str())])
        .flatten()
        .collect();
    let values = parquet_strings(&data)?;
    assert!(values.len() > 100_000, "scanned {} values", values.len());
    let leaks: Vec<_> = values
        .iter()
        .filter(|(_, _, v)| {
            v.contains("ck-")
                || v.contains("usr-")
                || secrets.contains(v.as_str())
                || ip_prefixes.iter().any(|p| v.contains(p.as_str()))
        })
        .take(5)
        .collect();
    assert!(leaks.is_empty(), "identifiers reached a table: {leaks:?}");
    // nor in the Delta logs (statistics hold min/max values)
    let mut logs = Vec::new();
    crate::common::collect_files(&data.join("tables"), "json", &mut logs)?;
    for log in logs {
        let text = std::fs::read_to_string(&log)?;
        assert!(
            !text.contains("ck-") && !text.contains("usr-") && !text.contains("176.29."),
            "identifier in {}",
            log.display()
        );
    }
    Ok(())
}
