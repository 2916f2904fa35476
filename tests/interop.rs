//! Marsad's tables are standard Delta tables: the Python packages `deltalake`
//! and `duckdb` read them and count what `/v1/sql` counts.

use std::time::Duration;

use anyhow::{Result, ensure};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, counts_by, python_counts};

#[test]
fn python_deltalake_and_duckdb_read_the_same_rows() -> Result<()> {
    if !crate::common::tools_for(
        "python_deltalake_and_duckdb_read_the_same_rows",
        &[crate::common::Tool::PythonEngines],
    )? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let m = Marsad::start_with_env(&tmp.path().join("data"), None, None, &[crate::common::no_clamp()])?;
    let client = Client::new();
    let paths = ["/ar/سيارات/1", "/en/jobs/driver", "/en/real-estate/amman", "/"];
    let events: Vec<Value> = (0..400)
        .map(|i| {
            json!({"type": "page_view", "url": format!("https://kulshi.example{}", paths[i % 4]),
                   "cookie_id": format!("c-{}", i % 37), "event_id": format!("i-{i}")})
        })
        .collect();
    let resp = client.post(format!("{}/v1/batch", m.ingest)).json(&events).send()?;
    ensure!(resp.status().as_u16() == 202, "{}", resp.status());
    m.wait_for_count("SELECT sum(events) FROM traffic_hourly", 400, Duration::from_secs(60))?;

    let py = python_counts(&m.data_dir.join("tables").display().to_string(), &[])?;

    let events = m.sql_count("SELECT count(*) FROM events")?;
    assert_eq!(events, 400);
    assert_eq!(py["deltalake_events"], events, "{py}");
    assert_eq!(py["duckdb_events"], events);
    assert_eq!(
        py["duckdb_distinct_visitors"],
        m.sql_count("SELECT count(DISTINCT visitor_key) FROM events")?
    );
    assert_eq!(
        py["duckdb_traffic_events"],
        m.sql_count("SELECT sum(events) FROM traffic_hourly")?
    );
    assert_eq!(py["partitions"], json!(["date"]));
    let ours = counts_by(&m.sql("SELECT page_category AS k, count(*) AS n FROM events GROUP BY page_category")?);
    for (category, n) in &ours {
        assert_eq!(py["duckdb_by_category"][category], *n, "{category}: {py}");
    }
    Ok(())
}
