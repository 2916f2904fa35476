//! What leaves Marsad, end to end against `marsad up`: released numbers are consistent
//! (the same cell gets the same number by any path and any key), useful (large cells close to
//! the truth), limited by a daily budget, and an advertiser sees its own campaigns and nothing
//! else — over HTTP, SQL and Postgres. The attacks themselves run in `query/tests/attacks.rs`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, key_entry, marsad_bin, write_fixture_geoip};

const ANALYST: &str = "analyst-key-of-the-release-test";
const ADVERTISER: &str = "advertiser-key-of-the-release-test";
const STINGY: &str = "analyst-key-with-a-small-budget";

fn get(client: &Client, m: &Marsad, key: &str, path: &str) -> Result<(u16, Value)> {
    let resp = client.get(format!("{}{path}", m.query)).bearer_auth(key).send()?;
    Ok((resp.status().as_u16(), resp.json().unwrap_or(Value::Null)))
}

fn sql(client: &Client, m: &Marsad, key: &str, statement: &str) -> Result<(u16, Value)> {
    let resp = client
        .post(format!("{}/v1/sql", m.query))
        .bearer_auth(key)
        .json(&json!({ "sql": statement }))
        .send()?;
    Ok((resp.status().as_u16(), resp.json().unwrap_or(Value::Null)))
}

/// Sends `visitors` visitors of `country` (by its fixture /16) with `views` page views and
/// one impression of `campaign` each.
fn send(client: &Client, m: &Marsad, prefix: &str, visitors: usize, views: usize, campaign: &str) -> Result<usize> {
    let mut sent = 0;
    for v in 0..visitors {
        let cookie = format!("r-{prefix}-{v}");
        let mut events: Vec<Value> = (0..views)
            .map(|i| {
                json!({"type": "page_view", "url": format!("https://kulshi.example/ar/سيارات/{i}"),
                       "cookie_id": cookie, "event_id": format!("{cookie}-{i}")})
            })
            .collect();
        events.push(
            json!({"type": "ad_impression", "cookie_id": cookie, "event_id": format!("{cookie}-ad"),
            "ad": {"ad_id": "ad-1", "campaign_id": campaign, "placement": "top"}}),
        );
        let resp = client
            .post(format!("{}/v1/batch", m.ingest))
            .header("x-forwarded-for", format!("{prefix}.{}.{}", v / 200, 1 + v % 200))
            .json(&events)
            .send()?;
        ensure!(resp.status().as_u16() == 202, "{}", resp.status());
        sent += events.len();
    }
    Ok(sent)
}

fn start(tmp: &std::path::Path) -> Result<Marsad> {
    let geoip = tmp.join("geo.mmdb");
    write_fixture_geoip(&geoip)?;
    let config = tmp.join("marsad.toml");
    let mut text = key_entry("dashboard", "analyst", ANALYST);
    text.push_str(&key_entry("stingy", "analyst", STINGY));
    text.push_str("daily_epsilon = 100.0\n");
    use sha2::Digest;
    text.push_str(&format!(
        "[[query.keys]]\nname = \"jo-motors\"\nroles = [\"advertiser\"]\ncampaigns = [\"cmp-jo\"]\nsha256 = \"{}\"\n",
        hex::encode(sha2::Sha256::digest(ADVERTISER.as_bytes()))
    ));
    std::fs::write(&config, text)?;
    Marsad::start_with_config(&tmp.join("data"), Some(&geoip), Some(&config))
}

fn row<'a>(report: &'a Value, key: &str, value: &str) -> Option<&'a Value> {
    report["rows"].as_array()?.iter().find(|r| r[key] == value)
}

#[test]
fn released_numbers_are_consistent_and_advertisers_see_their_campaigns_only() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let m = start(tmp.path())?;
    let client = Client::new();
    let mut total = 0;
    for (prefix, visitors, views, campaign) in [
        ("176.29", 300, 3, "cmp-jo"),
        ("188.48", 200, 2, "cmp-sa"),
        ("94.200", 150, 2, "cmp-ae"),
        ("37.236", 3, 4, "cmp-iq"),
    ] {
        total += send(&client, &m, prefix, visitors, views, campaign)?;
    }
    m.wait_for_count("SELECT count(*) FROM events", total as i64, Duration::from_secs(90))?;
    m.wait_for_count(
        "SELECT sum(impressions) FROM ad_performance_hourly",
        653,
        Duration::from_secs(60),
    )?;

    // a plan's row counts are exact numbers: no EXPLAIN of a rollup for an analyst
    for explain in [
        "EXPLAIN ANALYZE SELECT sum(events) FROM traffic_hourly WHERE country = 'IQ'",
        "EXPLAIN SELECT country, sum(events) FROM traffic_hourly GROUP BY country",
    ] {
        let (status, body) = sql(&client, &m, ANALYST, explain)?;
        assert_eq!(status, 400, "{explain}: {body}");
    }

    // the same report twice: the same numbers
    let (status, geo) = get(&client, &m, ANALYST, "/v1/reports/geo")?;
    ensure!(status == 200, "{geo}");
    assert_eq!(get(&client, &m, ANALYST, "/v1/reports/geo")?.1, geo, "asked twice");
    // the second answer was kept by the session; computed again from the tables, the same
    let recomputed: Value = client
        .get(format!("{}/v1/reports/geo", m.query))
        .bearer_auth(ANALYST)
        .header("Cache-Control", "no-cache")
        .send()?
        .error_for_status()?
        .json()?;
    assert_eq!(recomputed, geo, "computed again (Cache-Control: no-cache)");
    // nothing says whether a row was left out (Iraq's three visitors rarely pass the noisy threshold)
    assert!(
        geo.get("suppressed_cells").is_none() && geo.get("withheld_rows").is_none(),
        "{geo}"
    );
    let jo = row(&geo, "country", "JO").context("Jordan's row")?;
    assert!(
        jo["ci95"]["page_views"].as_u64().unwrap_or(0) > 0,
        "numbers say how exact: {jo}"
    );
    assert_eq!(geo["release"]["mechanism"], "noise");

    // one cell by two paths: Jordan's row, and the total of the report filtered to Jordan
    let (_, only_jo) = get(&client, &m, ANALYST, "/v1/reports/geo?country=JO")?;
    for measure in ["events", "page_views", "visitors"] {
        assert_eq!(only_jo["total"][measure], jo[measure], "{measure}: {only_jo}");
    }
    // … and through analyst SQL over the same days
    let (from, to) = (geo["from"].as_str().unwrap_or(""), geo["to"].as_str().unwrap_or(""));
    let (status, by_sql) = sql(
        &client,
        &m,
        ANALYST,
        &format!(
            "SELECT country, sum(events) AS events, hll_estimate(hll_merge(visitors)) AS visitors FROM traffic_hourly \
             WHERE date >= '{from}' AND date <= '{to}' GROUP BY country ORDER BY country"
        ),
    )?;
    ensure!(status == 200, "{by_sql}");
    let jo_sql = row(&by_sql, "country", "JO").context("Jordan by SQL")?;
    assert_eq!(jo_sql["events"], jo["events"], "{by_sql}");
    assert_eq!(jo_sql["visitors"].as_f64(), jo["visitors"].as_f64(), "{by_sql}");
    assert!(
        by_sql["release"]["ci95"]["events"].as_u64().unwrap_or(0) > 0,
        "{by_sql}"
    );
    // sessions are shared per scope: the engineer's (admin's) session, which reads `events`
    // and was used just before, is never the analyst's
    let (status, raw) = sql(&client, &m, ANALYST, "SELECT count(*) FROM events")?;
    ensure!(status == 400, "an analyst reads no raw events: {raw}");
    let (status, tables) = sql(&client, &m, ANALYST, "SELECT table_name FROM information_schema.tables")?;
    ensure!(status == 200, "{tables}");
    let listed = tables["rows"].as_array().context("rows")?;
    ensure!(
        !listed.is_empty() && listed.iter().all(|r| r["table_name"] != "events"),
        "an analyst's catalog lists no events: {tables}"
    );

    // the advertiser and the analyst asking the same campaign cell get the same numbers
    let (status, analyst_campaigns) = get(&client, &m, ANALYST, "/v1/reports/campaigns")?;
    ensure!(status == 200, "{analyst_campaigns}");
    let (status, advertiser_campaigns) = get(&client, &m, ADVERTISER, "/v1/reports/campaigns")?;
    ensure!(status == 200, "{advertiser_campaigns}");
    let theirs = advertiser_campaigns["rows"].as_array().context("rows")?;
    assert_eq!(theirs.len(), 1, "only cmp-jo: {advertiser_campaigns}");
    let ours = row(&analyst_campaigns, "campaign_id", "cmp-jo").context("cmp-jo")?;
    for measure in ["impressions", "clicks", "visitors"] {
        assert_eq!(theirs[0][measure], ours[measure], "{measure}");
    }
    // the advertiser's breakdowns
    for by in ["day", "country", "device_type"] {
        let (status, body) = get(&client, &m, ADVERTISER, &format!("/v1/reports/campaigns?by={by}"))?;
        ensure!(status == 200, "by {by}: {body}");
        assert!(
            body["rows"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["campaign_id"] == "cmp-jo")),
            "by {by}: {body}"
        );
    }
    // … and nothing else: other campaigns, other reports, SQL, Postgres
    for path in [
        "/v1/reports/campaigns?campaign_id=cmp-sa",
        "/v1/reports/geo",
        "/v1/reports/traffic",
        "/v1/reports/demographics",
        "/v1/tables",
        "/v1/segments",
    ] {
        assert_eq!(get(&client, &m, ADVERTISER, path)?.0, 403, "{path}");
    }
    assert_eq!(sql(&client, &m, ADVERTISER, "SELECT 1")?.0, 403);
    let psql = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &m.pg_port.to_string(),
            "-U",
            "jo-motors",
            "-d",
            "marsad",
            "-c",
            "SELECT 1",
        ])
        .env("PGPASSWORD", ADVERTISER)
        .output();
    if let Ok(out) = psql {
        assert!(!out.status.success(), "an advertiser cannot sign in to Postgres");
    }

    // what is left of the budget; past it, 429 with when it refills
    let (status, budget) = get(&client, &m, ANALYST, "/v1/privacy/budget")?;
    ensure!(status == 200, "{budget}");
    assert!(budget["spent"].as_f64().unwrap_or(0.0) > 0.0, "{budget}");
    let mut refused = None;
    for day in 1..40 {
        let (status, body) = get(
            &client,
            &m,
            STINGY,
            &format!("/v1/reports/traffic?from=2026-01-01&to=2026-01-{:02}", day.min(28)),
        )?;
        if status == 429 {
            refused = Some(body);
            break;
        }
    }
    let refused = refused.context("a key past its budget is refused")?;
    assert!(refused["error"].as_str().unwrap_or("").contains("budget"), "{refused}");
    Ok(())
}

/// Large cells of `marsad simulate` traffic are close to the truth: median relative error of
/// cells with at least 1,000 events at most 1 %.
#[test]
fn large_cells_of_simulated_traffic_stay_close_to_the_truth() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let m = start(tmp.path())?;
    let out = Command::new(marsad_bin())
        .args([
            "simulate",
            "--url",
            &m.ingest,
            "--rate",
            "2000",
            "--duration",
            "15",
            "--visitors",
            "3000",
        ])
        .env("RUST_LOG", "warn")
        .output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // settled: `events` and the rollups (which commit after it, up to
    // `process.rollup_commit_interval_ms` = 5 s later) both stop changing for longer than that
    let mut last = (-1, -1);
    let mut unchanged = 0;
    loop {
        let now = (
            m.sql_count("SELECT count(*) FROM events")?,
            m.sql_count("SELECT sum(events) FROM traffic_hourly").unwrap_or(0),
        );
        unchanged = if now == last && now.0 > 0 { unchanged + 1 } else { 0 };
        if unchanged >= 3 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "the processor did not settle");
        last = now;
        std::thread::sleep(Duration::from_secs(3));
    }
    let client = Client::new();
    let mut errors = Vec::new();
    for (report, dim) in [
        ("geo", "country"),
        ("categories", "page_category"),
        ("devices", "device_type"),
    ] {
        let (status, body) = get(&client, &m, ANALYST, &format!("/v1/reports/{report}"))?;
        ensure!(status == 200, "{body}");
        let exact = crate::common::counts_by(&m.sql(&format!(
            "SELECT {dim} AS k, count(*) AS n FROM events WHERE NOT is_bot GROUP BY 1"
        ))?);
        for r in body["rows"].as_array().context("rows")? {
            let key = r[dim].as_str().unwrap_or("NULL");
            let truth = exact.get(key).copied().unwrap_or(0);
            // the devices report splits a device by OS and browser: compare whole devices only
            if report == "devices" {
                continue;
            }
            if truth >= 1000 {
                let released = r["events"].as_i64().unwrap_or(0);
                errors.push((released - truth).abs() as f64 / truth as f64);
            }
        }
    }
    ensure!(errors.len() >= 3, "too few large cells: {errors:?}");
    errors.sort_by(f64::total_cmp);
    let median = errors[errors.len() / 2];
    println!(
        "{} cells of 1,000+ events: median relative error {:.3}%",
        errors.len(),
        median * 100.0
    );
    assert!(median <= 0.01, "median relative error {median}");
    Ok(())
}
