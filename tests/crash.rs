use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::common::{Marsad, marsad_bin};

#[test]
fn kill_nine_while_traffic_flows_loses_and_duplicates_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let ack_log = tmp.path().join("acked.txt");
    let mut m = Marsad::start(&data, None)?;
    let (ingest_port, query_port) = (m.ingest_port, m.query_port);

    let simulate = Command::new(marsad_bin())
        .args([
            "simulate",
            "--url",
            &m.ingest,
            "--rate",
            "1500",
            "--duration",
            "8",
            "--visitors",
            "500",
            "--retry-for",
            "90",
            "--concurrency",
            "16",
        ])
        .arg("--ack-log")
        .arg(&ack_log)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning simulate")?;

    std::thread::sleep(Duration::from_secs(3));
    m.kill_hard()?;
    let acked_before_restart = std::fs::read_to_string(&ack_log).unwrap_or_default().lines().count();
    std::thread::sleep(Duration::from_millis(800));
    let m = Marsad::start_on(&data, None, ingest_port, query_port)?;

    let out = simulate.wait_with_output()?;
    let summary = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "simulate failed: {summary}");
    ensure!(
        summary.contains(" 0 rejected, 0 failed"),
        "simulate gave up on events: {summary}"
    );
    let retries: u64 = summary
        .trim()
        .split(", ")
        .find_map(|p| p.strip_suffix(" retries"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    ensure!(retries > 0, "the crash did not interrupt any send: {summary}");

    let acked: Vec<String> = std::fs::read_to_string(&ack_log)?.lines().map(str::to_owned).collect();
    let acked_set: HashSet<&str> = acked.iter().map(String::as_str).collect();
    assert!(
        acked_before_restart > 500 && acked.len() > acked_before_restart,
        "traffic before and after the crash: {acked_before_restart} then {}",
        acked.len()
    );
    assert_eq!(acked_set.len(), acked.len(), "each event acknowledged once");

    m.wait_for_count(
        "SELECT count(DISTINCT event_id) FROM events",
        acked.len() as i64,
        Duration::from_secs(120),
    )?;
    assert_eq!(
        m.sql_count("SELECT count(*) FROM events")?,
        acked.len() as i64,
        "no duplicates"
    );
    let stored: HashSet<String> = m
        .sql("SELECT event_id FROM events")?
        .iter()
        .filter_map(|r| r["event_id"].as_str().map(str::to_owned))
        .collect();
    let missing = acked_set.iter().filter(|id| !stored.contains(**id)).count();
    assert_eq!(missing, 0, "acknowledged events lost");
    assert_eq!(stored.len(), acked.len(), "stored events that were never acknowledged");
    Ok(())
}
