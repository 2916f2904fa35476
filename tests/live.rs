//! The live view against `marsad up`: events sent now appear in `/v1/live` within 5 s;
//! events that happened more than 30 minutes ago are processed into `events` but never
//! appear live, nor do those of a visitor who opted out; a page with fewer visitors than the threshold is not listed; asking again
//! gives the same numbers and spends nothing more; only analysts may ask.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, key_entry, write_fixture_geoip};

const ANALYST_KEY: &str = "live-analyst-key-0123456789abcdef";
const ADVERTISER_KEY: &str = "live-advertiser-key-0123456789abcd";
const PAGE: &str = "https://kulshi.example/en/cars/kia";
const RARE: &str = "https://kulshi.example/en/jobs/rare";

fn send(m: &Marsad, events: &[Value]) -> Result<()> {
    crate::common::post_events_from(m, "JO", None, events)
}

fn live(m: &Marsad, key: &str) -> Result<(u16, Value)> {
    let resp = Client::new()
        .get(format!("{}/v1/live", m.query))
        .bearer_auth(key)
        .send()?;
    let status = resp.status().as_u16();
    Ok((status, resp.json()?))
}

/// Whether `row`'s `measure` is within twice its 95 % interval of `truth` (four standard
/// deviations: the test fails on noise about once in 15,000), and the interval is small.
fn near(row: &Value, measure: &str, truth: i64) -> bool {
    let (Some(v), Some(ci)) = (row[measure].as_i64(), row["ci95"][measure].as_i64()) else {
        return false;
    };
    ci <= 3 && (v - truth).abs() <= 2 * ci
}

fn spent(m: &Marsad) -> Result<f64> {
    let budget: Value = Client::new()
        .get(format!("{}/v1/privacy/budget", m.query))
        .bearer_auth(ANALYST_KEY)
        .send()?
        .json()?;
    budget["spent"].as_f64().context("spent")
}

/// Page views of `visitors` visitors (two each, one visitor on the rare page too), at `ts`.
fn visits(prefix: &str, visitors: usize, ts: Option<chrono::DateTime<chrono::Utc>>) -> Vec<Value> {
    let mut events = Vec::new();
    for v in 0..visitors {
        for i in 0..2 {
            let mut e = json!({"type": "page_view", "url": PAGE, "cookie_id": format!("{prefix}-{v}"),
                "event_id": format!("{prefix}-{v}-{i}"), "consent": {"analytics": true}});
            if let Some(ts) = ts {
                e["ts"] = json!(ts.to_rfc3339());
            }
            events.push(e);
        }
    }
    let mut rare = json!({"type": "page_view", "url": RARE, "cookie_id": format!("{prefix}-0"),
        "event_id": format!("{prefix}-rare"), "consent": {"analytics": true}});
    if let Some(ts) = ts {
        rare["ts"] = json!(ts.to_rfc3339());
    }
    events.push(rare);
    events
}

#[test]
fn the_live_view_shows_the_last_half_hour_within_seconds() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let geoip = tmp.path().join("geo.mmdb");
    write_fixture_geoip(&geoip)?;
    let config = tmp.path().join("marsad.toml");
    // noise so small it cannot hide a visitor, so the test knows the answers; the mechanism,
    // its threshold (plus the interval of a sum) and its budget are the real ones
    std::fs::write(
        &config,
        format!(
            "[release]\nepsilon_per_measure = 400.0\ndaily_epsilon = 10000.0\nmin_visitors = 3\n\n{}{}",
            key_entry("marketing", "analyst", ANALYST_KEY),
            key_entry("agency", "advertiser", ADVERTISER_KEY)
        ) + "campaigns = [\"ramadan-cars\"]\n",
    )?;
    let m = Marsad::start_with_config(&tmp.path().join("data"), Some(&geoip), Some(&config))?;

    let (status, body) = live(&m, ADVERTISER_KEY)?;
    ensure!(
        status == 403,
        "an advertiser sees no site-wide live view: {status} {body}"
    );
    let (status, body) = live(&m, ANALYST_KEY)?;
    ensure!(status == 200, "{status} {body}");
    ensure!(body["total"].is_null(), "nothing yet: {body}");

    // 40 minutes ago (the processor still takes them, into `events`), then now
    let old = chrono::Utc::now() - chrono::Duration::minutes(40);
    // a visitor who opted out of analytics: its events are never counted, live or anywhere
    let resp = Client::new()
        .post(format!("{}/v1/opt-outs", m.ingest))
        .header("cookie", "_mid=c-gone-0")
        .json(&json!({"scope": "analytics"}))
        .send()?;
    ensure!(resp.status().as_u16() == 202, "opt-out: {}", resp.status());
    send(&m, &visits("c-old", 6, Some(old)))?;
    m.wait_for_count("SELECT count(*) FROM events", 13, Duration::from_secs(30))?;
    let sent_at = Instant::now();
    let mut now_events = visits("c-now", 10, None);
    now_events.extend(visits("c-gone", 1, None));
    send(&m, &now_events)?;
    let answer = loop {
        let (status, body) = live(&m, ANALYST_KEY)?;
        ensure!(status == 200, "{status} {body}");
        if !body["total"].is_null() {
            break body;
        }
        if sent_at.elapsed() > Duration::from_secs(5) {
            bail!("not live 5 s after it was sent: {body}\n{}", m.log_tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let appeared = sent_at.elapsed();
    ensure!(appeared <= Duration::from_secs(5), "appeared after {appeared:?}");
    // the events of now only: 10 visitors, 21 page views; the old ones are not live (each
    // number within its interval of the truth: the noise is small at this ε, not nothing)
    ensure!(near(&answer["total"], "visitors", 10), "{answer}");
    ensure!(near(&answer["total"], "page_views", 21), "{answer}");
    let pages = answer["pages"].as_array().context("pages")?;
    ensure!(pages.len() == 1, "the rare page (one visitor) is held back: {answer}");
    ensure!(pages[0]["page_path"] == json!("/en/cars/kia"), "{answer}");
    ensure!(near(&pages[0], "page_views", 20), "{answer}");
    ensure!(near(&pages[0], "visitors", 10), "{answer}");
    let ci = &answer["total"]["ci95"];
    ensure!(
        ci["visitors"].as_u64().is_some_and(|c| c > 0),
        "noised, with an interval: {answer}"
    );
    ensure!(answer["release"]["mechanism"] == json!("noise"), "{answer}");

    // asked again: the same cells give the same numbers, and the day's live view is paid once
    let paid = spent(&m)?;
    ensure!((paid - 4.0 * 400.0).abs() < 1e-6, "four measures once: {paid}");
    std::thread::sleep(Duration::from_secs(3));
    let (_, again) = live(&m, ANALYST_KEY)?;
    // every cell of the window is in every answer, counted or not: 29 ended minutes, and this
    // one once a slot of it has ended
    let rows = |v: &Value| v["per_minute"].as_array().cloned().unwrap_or_default();
    let whole = |n: usize| n == 29 || n == 30;
    ensure!(whole(rows(&answer).len()) && whole(rows(&again).len()), "{again}");
    let minute = |v: &Value| v["to"].as_str().map(|t| t.chars().take(16).collect::<String>());
    if minute(&again) == minute(&answer) {
        // the ended minutes are the same cells: the same numbers
        ensure!(rows(&again)[..29] == rows(&answer)[..29], "{answer}\n{again}");
    }
    ensure!(near(&again["total"], "visitors", 10), "{again}");
    ensure!(near(&again["total"], "page_views", 21), "{again}");
    ensure!((spent(&m)? - paid).abs() < 1e-9, "asking again spends nothing");

    // the opted-out visitor's three events made no row: 13 old and 21 new ones
    m.wait_for_count("SELECT count(*) FROM events", 34, Duration::from_secs(10))?;

    // parameters are checked
    let resp = Client::new()
        .get(format!("{}/v1/live?limit=0", m.query))
        .bearer_auth(ANALYST_KEY)
        .send()?;
    ensure!(resp.status().as_u16() == 400, "{}", resp.status());
    Ok(())
}
