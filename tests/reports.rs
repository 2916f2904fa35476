//! The limits every query has: time, memory and rows, each with a clear error; and the
//! report API's refusals. (What reports release is tested in `release.rs` and in
//! `query/tests/attacks.rs`.)

use anyhow::Result;
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::Marsad;

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

    // an engineer reads a plan (it was a 500: the row limit wrapped the EXPLAIN)
    for explain in [
        "EXPLAIN SELECT count(*) FROM generate_series(1, 10)",
        "EXPLAIN ANALYZE SELECT 1",
    ] {
        let (status, body) = sql(explain)?;
        assert_eq!(status, 200, "{explain}: {body}");
        assert!(body["rows"][0]["plan"].is_string(), "{explain}: {body}");
    }

    // clear refusals of the report API
    let report = |path: &str| -> Result<u16> {
        Ok(client
            .get(format!("{}/v1/reports/{path}", m.query))
            .bearer_auth(m.admin_key()?)
            .send()?
            .status()
            .as_u16())
    };
    assert_eq!(report("weather")?, 404);
    assert_eq!(report("geo?colour=red")?, 400);
    assert_eq!(report("traffic?from=2026-13-01")?, 400);
    assert_eq!(report("geo?by=day")?, 400);
    // a filter value no dimension has (and that would only fill the kept answers' memory)
    assert_eq!(report(&format!("geo?country={}", "J".repeat(8 * 1024 + 1)))?, 400);
    let anonymous = client.get(format!("{}/v1/reports/geo", m.query)).send()?;
    assert_eq!(anonymous.status().as_u16(), 401);
    Ok(())
}
