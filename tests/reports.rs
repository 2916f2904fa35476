//! Reports and analyst SQL with small-cell suppression end to end: a crafted
//! sparse population where one visitor is alone in a country must not be
//! revealed by a report or an analyst's SQL, neither directly nor by
//! subtracting shown cells from the total. And the limits every query has.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, key_entry, write_fixture_geoip};

const ANALYST_KEY: &str = "analyst-key-for-the-k-rule-test";

fn send(client: &Client, m: &Marsad, cookie: &str, ip: &str, views: usize) -> Result<usize> {
    let events: Vec<Value> = (0..views)
        .map(|i| {
            json!({"type": "page_view", "url": format!("https://kulshi.example/ar/سيارات/{i}"),
                   "cookie_id": cookie, "event_id": format!("{cookie}-{i}"),
                   "consent": {"personalisation": true},
                   "demographics": {"age_band": "25-34", "gender": "female"}})
        })
        .collect();
    let resp = client
        .post(format!("{}/v1/batch", m.ingest))
        .header("x-forwarded-for", ip)
        .json(&events)
        .send()?;
    ensure!(resp.status().as_u16() == 202, "{}", resp.status());
    Ok(views)
}

fn report(client: &Client, m: &Marsad, path: &str) -> Result<(u16, Value)> {
    let resp = client
        .get(format!("{}/v1/reports/{path}", m.query))
        .bearer_auth(m.admin_key()?)
        .send()?;
    Ok((resp.status().as_u16(), resp.json()?))
}

fn analyst_sql(client: &Client, m: &Marsad, sql: &str) -> Result<(u16, Value)> {
    let resp = client
        .post(format!("{}/v1/sql", m.query))
        .bearer_auth(ANALYST_KEY)
        .json(&json!({ "sql": sql }))
        .send()?;
    Ok((resp.status().as_u16(), resp.json()?))
}

#[test]
fn a_lone_visitor_is_never_revealed_by_a_report() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let geoip = tmp.path().join("geo.mmdb");
    write_fixture_geoip(&geoip)?;
    let config = tmp.path().join("marsad.toml");
    std::fs::write(&config, key_entry("dashboard", "analyst", ANALYST_KEY))?;
    let m = Marsad::start_with_config(&tmp.path().join("data"), Some(&geoip), Some(&config))?;
    let client = Client::new();
    let mut total = 0;
    for (prefix, visitors, views) in [("176.29", 30, 2), ("94.200", 15, 3), ("188.48", 12, 1), ("41.32", 1, 7)] {
        for v in 0..visitors {
            total += send(
                &client,
                &m,
                &format!("c-{prefix}-{v}"),
                &format!("{prefix}.{v}.9"),
                views,
            )?;
        }
    }
    m.wait_for_count(
        "SELECT sum(events) FROM traffic_hourly",
        total as i64,
        Duration::from_secs(60),
    )?;

    let (status, geo) = report(&client, &m, "geo")?;
    assert_eq!(status, 200, "{geo}");
    let rows = geo["rows"].as_array().context("rows")?;
    let row = |c: &str| rows.iter().find(|r| r["country"] == c).cloned().unwrap_or(Value::Null);
    // Egypt's single visitor is withheld, and so is the smallest other cell (12 in Saudi
    // Arabia): subtracting the shown cells from the total gives only their sum
    assert_eq!(row("EG")["suppressed"], true, "{geo}");
    assert_eq!(row("EG")["events"], Value::Null);
    assert_eq!(row("EG")["visitors"], Value::Null);
    assert_eq!(row("SA")["suppressed"], true, "complementary suppression: {geo}");
    assert_eq!(row("JO")["events"], 60);
    assert_eq!(row("AE")["visitors"], 15);
    assert_eq!(geo["total"]["events"], total);
    let shown: i64 = rows.iter().filter_map(|r| r["events"].as_i64()).sum();
    assert_eq!(
        total as i64 - shown,
        7 + 12,
        "only the sum of the hidden cells can be derived"
    );
    assert_eq!(geo["suppressed_cells"], 2);
    assert_eq!(geo["min_visitors"], 10);

    // filtering down to the lone visitor hides everything, the total too
    let (status, eg) = report(&client, &m, "geo?country=EG")?;
    assert_eq!(status, 200, "{eg}");
    assert_eq!(eg["total"]["suppressed"], true, "{eg}");
    assert_eq!(eg["total"]["events"], Value::Null);
    assert!(
        eg["rows"]
            .as_array()
            .context("rows")?
            .iter()
            .all(|r| r["events"].is_null())
    );

    // each visitor then sees an ad of its country's campaign
    let mut impressions = 0;
    for (prefix, visitors) in [("176.29", 30), ("94.200", 15), ("188.48", 12), ("41.32", 1)] {
        for v in 0..visitors {
            let cookie = format!("c-{prefix}-{v}");
            let resp = client
                .post(format!("{}/v1/events", m.ingest))
                .header("x-forwarded-for", format!("{prefix}.{v}.9"))
                .json(
                    &json!({"type": "ad_impression", "cookie_id": cookie, "event_id": format!("{cookie}-ad"),
                    "ad": {"ad_id": "ad-1", "campaign_id": format!("cmp-{prefix}"), "placement": "top"}}),
                )
                .send()?;
            ensure!(resp.status().as_u16() == 202, "{}", resp.status());
            impressions += 1;
        }
    }
    m.wait_for_count(
        "SELECT sum(impressions) FROM ad_performance_hourly",
        impressions,
        Duration::from_secs(60),
    )?;

    // the other reports answer and suppress the same way, and each has cells to show
    for path in [
        "traffic?granularity=hour",
        "devices",
        "categories",
        "campaigns",
        "demographics",
    ] {
        let (status, body) = report(&client, &m, path)?;
        assert_eq!(status, 200, "{path}: {body}");
        let rows = body["rows"].as_array().context("rows")?;
        assert!(
            rows.iter().any(|r| r["suppressed"] == false),
            "{path}: no cell shown, so the k rule was not tried: {body}"
        );
        for r in rows {
            let visitors = r["visitors"].as_f64();
            assert!(
                r["suppressed"] == true || visitors.is_some_and(|v| v >= 10.0),
                "{path}: a shown cell under k: {r}"
            );
        }
    }
    // and the campaign of the lone Egyptian visitor is withheld
    let (_, campaigns) = report(&client, &m, "campaigns")?;
    let lone = campaigns["rows"]
        .as_array()
        .context("rows")?
        .iter()
        .find(|r| r["campaign_id"] == "cmp-41.32")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(lone["suppressed"], true, "{campaigns}");
    let (_, categories) = report(&client, &m, "categories")?;
    assert_eq!(categories["rows"][0]["page_category"], "cars");
    assert_eq!(categories["rows"][0]["page_views"], total);

    // an analyst's SQL: the same rule per answer row
    let (status, by_country) = analyst_sql(
        &client,
        &m,
        "SELECT country, SUM(events) AS events, hll_estimate(hll_merge(visitors)) AS visitors \
         FROM traffic_hourly GROUP BY country ORDER BY country",
    )?;
    assert_eq!(status, 200, "{by_country}");
    let countries: Vec<&str> = by_country["rows"]
        .as_array()
        .context("rows")?
        .iter()
        .filter_map(|r| r["country"].as_str())
        .collect();
    assert_eq!(
        countries,
        ["AE", "JO"],
        "EG and its complement SA withheld: {by_country}"
    );
    assert_eq!(by_country["withheld_rows"], 2);
    assert!(
        by_country["columns"]
            .as_array()
            .context("columns")?
            .iter()
            .all(|c| !c["name"].as_str().unwrap_or("").starts_with("__marsad")),
        "{by_country}"
    );
    for sql in [
        "SELECT SUM(events) FROM traffic_hourly WHERE country = 'EG'",
        "SELECT SUM(events) FROM traffic_hourly WHERE region IS NULL AND country = 'EG' GROUP BY hour",
        "SELECT browser, COUNT(*) FROM traffic_hourly WHERE country IN ('EG') GROUP BY browser",
    ] {
        let (status, body) = analyst_sql(&client, &m, sql)?;
        assert_eq!(status, 200, "{sql}: {body}");
        assert_eq!(body["row_count"], 0, "{sql}: the lone visitor shows: {body}");
    }
    for (sql, why) in [
        ("SELECT * FROM traffic_hourly WHERE country = 'EG'", "GROUP BY"),
        ("SELECT COUNT(*) FROM events", "not found"),
        (
            "SELECT SUM(events) FILTER (WHERE country = 'EG') FROM traffic_hourly",
            "FILTER",
        ),
        (
            "SELECT SUM(CASE WHEN country = 'EG' THEN events ELSE 0 END) FROM traffic_hourly",
            "plain columns",
        ),
        ("DELETE FROM traffic_hourly", "read-only"),
    ] {
        let (status, body) = analyst_sql(&client, &m, sql)?;
        assert_eq!(status, 400, "{sql}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{sql}: `{error}` should say {why}");
    }
    // engineers still read every table
    assert_eq!(
        m.sql_count("SELECT COUNT(*) FROM events WHERE country = 'EG' AND event_type = 'page_view'")?,
        7
    );

    // clear refusals
    assert_eq!(report(&client, &m, "weather")?.0, 404);
    assert_eq!(report(&client, &m, "geo?colour=red")?.0, 400);
    assert_eq!(report(&client, &m, "traffic?from=2026-13-01")?.0, 400);
    let anonymous = client.get(format!("{}/v1/reports/geo", m.query)).send()?;
    assert_eq!(anonymous.status().as_u16(), 401);
    Ok(())
}

#[test]
fn every_query_is_limited_in_time_memory_and_rows_with_a_clear_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("marsad.toml");
    std::fs::write(
        &config,
        "[query]\ntimeout_secs = 2\nmemory_limit_mb = 4\nmax_result_rows = 5\n",
    )?;
    let m = Marsad::start_with_config(&tmp.path().join("data"), None, Some(&config))?;
    let client = Client::new();
    let sql = |sql: &str| -> Result<(u16, Value)> {
        let resp = client
            .post(format!("{}/v1/sql", m.query))
            .bearer_auth(m.admin_key()?)
            .json(&json!({ "sql": sql }))
            .send()?;
        Ok((resp.status().as_u16(), resp.json()?))
    };

    let (status, rows) = sql("SELECT value FROM generate_series(1, 100) ORDER BY value")?;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows["row_count"], 5);
    assert_eq!(rows["truncated"], true);

    let (status, body) = sql("SELECT value % 1000003 AS v, COUNT(*) FROM generate_series(1, 5000000) GROUP BY v")?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("query.memory_limit_mb"),
        "{body}"
    );

    let (status, body) = sql("SELECT COUNT(*) FROM generate_series(1, 100000000000)")?;
    assert_eq!(status, 408, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("2 s"), "{body}");

    // the service is still there for the next question
    let (status, body) = sql("SELECT 1 AS one")?;
    assert_eq!((status, body["rows"][0]["one"].as_i64()), (200, Some(1)));
    Ok(())
}
