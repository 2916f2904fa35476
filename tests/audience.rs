//! Segments and the audience API end to end: a synthetic population with
//! known behaviour goes through `marsad up`, `marsad segments refresh`
//! materializes the configured segments, and `/v1/audience` answers exactly
//! the expected members; consent refusals, GPC and opt-outs never are; an
//! opt-out empties the answer within a second, without a refresh.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, marsad_bin, write_fixture_geoip};

const CONFIG: &str = r#"
[audience]
min_segment_size = 5
refresh_interval_secs = 3600

[[audience.segments]]
id = "car-intenders-jo"
description = "at least 3 car-page views in 14 days, in Jordan"
window_days = 14
country = ["JO"]
rules = [{ event_type = "page_view", page_category = "cars", at_least = 3 }]

[[audience.segments]]
id = "car-intenders"
description = "at least 3 car-page views in 14 days, anywhere"
window_days = 14
rules = [{ event_type = "page_view", page_category = "cars", at_least = 3 }]

[[audience.segments]]
id = "jobs-on-mobile"
description = "a job page seen on a phone"
window_days = 7
device_type = ["mobile"]
rules = [{ event_type = "page_view", page_category = "jobs", at_least = 1 }]

[[audience.segments]]
id = "cmp-7-clickers"
description = "clicked an ad of campaign cmp-7"
window_days = 30
rules = [{ event_type = "ad_click", campaign_id = "cmp-7", at_least = 1 }]
"#;

const DESKTOP: &str =
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36";
const MOBILE: &str =
    "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Mobile Safari/537.36";
const JO: &str = "176.29.4.4";
const SA: &str = "188.48.4.4";

/// One visitor's behaviour.
struct Visitor {
    cookie: String,
    ip: &'static str,
    ua: &'static str,
    personalisation: bool,
    /// Consent to marketing (only then may a member export name the visitor).
    marketing: bool,
    gpc: bool,
    car_views: usize,
    job_views: usize,
    cmp7_clicks: usize,
}

fn visitor(cookie: String, ip: &'static str, car_views: usize) -> Visitor {
    Visitor {
        cookie,
        ip,
        ua: DESKTOP,
        personalisation: true,
        marketing: true,
        gpc: false,
        car_views,
        job_views: 0,
        cmp7_clicks: 0,
    }
}

fn send(client: &Client, m: &Marsad, v: &Visitor) -> Result<usize> {
    let mut events = Vec::new();
    let consent = json!({"analytics": true, "personalisation": v.personalisation, "marketing": v.marketing});
    for i in 0..v.car_views {
        events.push(
            json!({"type": "page_view", "url": format!("https://kulshi.example/ar/سيارات/{i}"),
            "cookie_id": v.cookie, "event_id": format!("{}-car-{i}", v.cookie), "consent": consent}),
        );
    }
    for i in 0..v.job_views {
        events.push(
            json!({"type": "page_view", "url": "https://kulshi.example/en/jobs/driver",
            "cookie_id": v.cookie, "event_id": format!("{}-job-{i}", v.cookie), "consent": consent}),
        );
    }
    for i in 0..v.cmp7_clicks {
        events.push(json!({"type": "ad_click", "url": "https://kulshi.example/",
            "ad": {"ad_id": "ad-1", "campaign_id": "cmp-7", "placement": "top"},
            "cookie_id": v.cookie, "event_id": format!("{}-click-{i}", v.cookie), "consent": consent}));
    }
    let mut req = client
        .post(format!("{}/v1/batch", m.ingest))
        .header("x-forwarded-for", v.ip)
        .header("user-agent", v.ua)
        .json(&events);
    if v.gpc {
        req = req.header("sec-gpc", "1");
    }
    let resp = req.send()?;
    let status = resp.status();
    let body: Value = resp.json()?;
    ensure!(
        status.as_u16() == 202 && body["accepted"] == events.len(),
        "{status}: {body}"
    );
    Ok(events.len())
}

fn get(client: &Client, m: &Marsad, path: &str) -> Result<(u16, String)> {
    let resp = client
        .get(format!("{}{path}", m.query))
        .bearer_auth(m.admin_key()?)
        .send()?;
    Ok((resp.status().as_u16(), resp.text()?))
}

fn segments_of(client: &Client, m: &Marsad, cookie: &str) -> Result<BTreeSet<String>> {
    let (status, body) = get(client, m, &format!("/v1/audience?cookie_id={cookie}"))?;
    ensure!(status == 200, "{status}: {body}");
    let body: Value = serde_json::from_str(&body)?;
    Ok(body["segments"]
        .as_array()
        .context("segments")?
        .iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect())
}

fn refresh(m: &Marsad, config: &std::path::Path) -> Result<String> {
    let out = Command::new(marsad_bin())
        .args(["segments", "refresh", "--data-dir"])
        .arg(&m.data_dir)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "segments refresh failed: {text}");
    Ok(text)
}

#[test]
fn segments_hold_exactly_the_expected_visitors_and_opt_outs_count_at_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let geoip = tmp.path().join("geo.mmdb");
    write_fixture_geoip(&geoip)?;
    let config = tmp.path().join("marsad.toml");
    std::fs::write(&config, CONFIG)?;
    let m = Marsad::start_with_config(&tmp.path().join("data"), Some(&geoip), Some(&config))?;
    let client = Client::new();

    // who should be where
    let mut population = Vec::new();
    let mut expected: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for i in 0..12 {
        let mut v = visitor(format!("jo-intender-{i}"), JO, 3 + i % 3);
        // a quarter never agreed to marketing: in the segment, never in an export
        v.marketing = i % 4 != 3;
        expected.insert(v.cookie.clone(), ["car-intenders-jo", "car-intenders"].into());
        population.push(v);
    }
    for i in 0..4 {
        let v = visitor(format!("sa-intender-{i}"), SA, 4);
        expected.insert(v.cookie.clone(), ["car-intenders"].into());
        population.push(v);
    }
    for i in 0..3 {
        // two car views are not enough
        population.push(visitor(format!("jo-browser-{i}"), JO, 2));
    }
    for i in 0..6 {
        let mut v = visitor(format!("jo-jobseeker-{i}"), JO, 0);
        v.ua = MOBILE;
        v.job_views = 1 + i % 2;
        expected.insert(v.cookie.clone(), ["jobs-on-mobile"].into());
        population.push(v);
    }
    for i in 0..3 {
        // on a desktop: not in the mobile segment
        let mut v = visitor(format!("jo-desk-jobseeker-{i}"), JO, 0);
        v.job_views = 2;
        population.push(v);
    }
    for i in 0..4 {
        // four clickers: fewer than min_segment_size, held back
        let mut v = visitor(format!("clicker-{i}"), JO, 0);
        v.cmp7_clicks = 1;
        population.push(v);
    }
    for i in 0..3 {
        let mut v = visitor(format!("jo-refused-{i}"), JO, 5);
        v.personalisation = false;
        v.ua = MOBILE;
        v.job_views = 1;
        population.push(v);
    }
    for i in 0..2 {
        let mut v = visitor(format!("jo-gpc-{i}"), JO, 5);
        v.gpc = true;
        population.push(v);
    }
    let opted_out_before: Vec<String> = (0..2).map(|i| format!("jo-opted-out-{i}")).collect();
    for c in &opted_out_before {
        population.push(visitor(c.clone(), JO, 5));
    }
    let mut total = 0;
    for v in &population {
        total += send(&client, &m, v)?;
    }
    m.wait_for_count("SELECT count(*) FROM events", total as i64, Duration::from_secs(60))?;
    for c in &opted_out_before {
        let resp = client
            .post(format!("{}/v1/opt-outs", m.ingest))
            .header("cookie", format!("_mid={c}"))
            .json(&json!({"scope": "personalisation"}))
            .send()?;
        ensure!(resp.status().as_u16() == 202, "opt-out: {}", resp.status());
    }

    let report = refresh(&m, &config)?;
    assert!(
        report.contains("car-intenders-jo") && report.contains("held back"),
        "{report}"
    );

    // the query service swaps the new index in within its reload interval
    let deadline = Instant::now() + Duration::from_secs(20);
    while segments_of(&client, &m, "jo-intender-0")?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "the audience index was not loaded:\n{}",
            m.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for v in &population {
        let want: BTreeSet<String> = expected
            .get(&v.cookie)
            .map(|s| s.iter().map(|x| (*x).to_owned()).collect())
            .unwrap_or_default();
        assert_eq!(segments_of(&client, &m, &v.cookie)?, want, "segments of {}", v.cookie);
    }

    // listing, exports, overlap
    let (status, body) = get(&client, &m, "/v1/segments")?;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&body)?;
    let by_id: BTreeMap<String, Value> = listed["segments"]
        .as_array()
        .context("segments")?
        .iter()
        .map(|s| (s["id"].as_str().unwrap_or_default().to_owned(), s.clone()))
        .collect();
    assert_eq!(by_id["car-intenders-jo"]["status"], "served");
    assert_eq!(by_id["car-intenders-jo"]["members"], 12);
    assert_eq!(by_id["car-intenders"]["members"], 16);
    assert_eq!(by_id["jobs-on-mobile"]["members"], 6);
    assert_eq!(by_id["cmp-7-clickers"]["status"], "held_back");
    assert_eq!(
        by_id["cmp-7-clickers"]["members"],
        Value::Null,
        "a small count is not shown"
    );
    let (status, body) = get(&client, &m, "/v1/segments/cmp-7-clickers/members")?;
    assert_eq!(status, 409, "{body}");
    let (status, body) = get(&client, &m, "/v1/segments/car-intenders-jo/members?format=csv")?;
    assert_eq!(status, 200);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.first(), Some(&"audience_id"));
    assert_eq!(
        lines.len(),
        10,
        "header and the 9 of the 12 members with marketing consent"
    );
    assert!(
        !body.contains("jo-intender"),
        "exports carry keyed hashes, never cookie ids"
    );
    let (status, body) = get(&client, &m, "/v1/segments/car-intenders-jo/members")?;
    assert_eq!(status, 200);
    assert_eq!(body.lines().count(), 9);
    let (status, body) = get(&client, &m, "/v1/segments/overlap?a=car-intenders-jo&b=car-intenders")?;
    assert_eq!(status, 200, "{body}");
    let overlap: Value = serde_json::from_str(&body)?;
    assert_eq!(
        overlap["intersection_estimate"], 12.0,
        "theta sketches are exact below k"
    );
    assert_eq!(overlap["union_estimate"], 16.0);
    let (status, _) = get(&client, &m, "/v1/segments/nope/members")?;
    assert_eq!(status, 404);
    let (status, _) = get(&client, &m, "/v1/audience")?;
    assert_eq!(status, 400);
    let anonymous = client
        .get(format!("{}/v1/audience?cookie_id=jo-intender-1", m.query))
        .send()?;
    assert_eq!(anonymous.status().as_u16(), 401);

    // an opt-out empties the answer within a second, without a refresh
    let started = Instant::now();
    let resp = client
        .post(format!("{}/v1/opt-outs", m.ingest))
        .header("cookie", "_mid=jo-intender-1")
        .json(&json!({"scope": "personalisation"}))
        .send()?;
    assert_eq!(resp.status().as_u16(), 202);
    while !segments_of(&client, &m, "jo-intender-1")?.is_empty() {
        ensure!(
            started.elapsed() < Duration::from_secs(1),
            "still served after an opt-out"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    let (_, body) = get(&client, &m, "/v1/segments/car-intenders-jo/members")?;
    assert_eq!(
        body.lines().count(),
        8,
        "the export leaves the opted-out visitor out too"
    );
    assert_eq!(segments_of(&client, &m, "jo-intender-2")?.len(), 2, "others unaffected");
    Ok(())
}
