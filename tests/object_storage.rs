//! Tables on object storage: `marsad up` keeps its Delta tables in an S3 bucket
//! (moto's S3 server, a real S3-protocol implementation, on 127.0.0.1), and
//! everything that reads or rewrites tables works there: SQL, the audience
//! index, `marsad audit`, erasure with its vacuum, and Python's `deltalake`.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, S3Server, marsad_bin, parquet_strings, python_counts, s3_env};

const BUCKET: &str = "marsad-it";

#[test]
fn tables_on_s3_are_written_read_audited_and_erased() -> Result<()> {
    if !crate::common::tools_for(
        "tables_on_s3_are_written_read_audited_and_erased",
        &[crate::common::Tool::Moto, crate::common::Tool::PythonEngines],
    )? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let s3 = S3Server::start(&tmp.path().join("moto.log"))?;
    s3.create_bucket(BUCKET)?;
    let mut env = s3_env(&s3, BUCKET);
    // old days' visitor keys are kept, so their rows can be written (and later aged out)
    env.push(("MARSAD_PRIVACY__DAILY_KEY_GRACE_HOURS", "240".to_owned()));
    // and the raw log keeps them (received five days ago): the audit holds them to this retention
    env.push(("MARSAD_EVENTLOG__RETENTION_HOURS", "240".to_owned()));
    env.push(crate::common::no_clamp());
    let data = tmp.path().join("data");
    // two events of each cookie five days ago, already in the raw log when Marsad starts
    let old_day = (chrono::Utc::now() - chrono::Duration::days(5)).date_naive();
    let old = old_events(&data, 74)?;
    let m = Marsad::start_with_env(&data, None, None, &env)?;

    let client = Client::new();
    let paths = [
        "/ar/سيارات/1",
        "/en/jobs/driver?email=someone@example.com",
        "/en/real-estate/amman",
        "/",
    ];
    let events: Vec<Value> = (0..400)
        .map(|i| {
            json!({"type": "page_view", "url": format!("https://kulshi.example{}", paths[i % 4]),
                   "cookie_id": format!("s3-cookie-{}", i % 37), "identity": crate::common::identity_token(&format!("s3-user-{}", i % 11), None, None),
                   "event_id": format!("s3-{i}")})
        })
        .collect();
    for chunk in events.chunks(100) {
        let resp = client
            .post(format!("{}/v1/batch", m.ingest))
            .header("x-forwarded-for", "176.29.44.55")
            .json(chunk)
            .send()?;
        ensure!(resp.status().as_u16() == 202, "{}", resp.status());
    }
    m.wait_for_count(
        "SELECT sum(events) FROM traffic_hourly",
        400 + old,
        Duration::from_secs(90),
    )?;
    assert_eq!(m.sql_count("SELECT count(*) FROM events")?, 400 + old);
    assert_eq!(
        m.sql_count(&format!("SELECT count(*) FROM events WHERE date = DATE '{old_day}'"))?,
        old
    );

    // the tables are in the bucket, and nowhere under the data dir
    assert!(!data.join("tables").exists(), "tables written locally");
    let keys = s3.keys(BUCKET, "marsad/tables/")?;
    for table in ["events", "traffic_hourly"] {
        let log = format!("marsad/tables/{table}/_delta_log/00000000000000000000.json");
        assert!(keys.contains(&log), "{log} not in the bucket: {keys:?}");
        assert!(
            keys.iter()
                .any(|k| k.starts_with(&format!("marsad/tables/{table}/")) && k.ends_with(".parquet")),
            "no data file of {table}"
        );
    }

    // no file in the bucket holds an IP, cookie id, user id or e-mail
    let copies = tmp.path().join("bucket");
    for key in keys.iter().filter(|k| k.ends_with(".parquet")) {
        let path = copies.join(key);
        std::fs::create_dir_all(path.parent().context("key without a parent")?)?;
        std::fs::write(&path, s3.get(BUCKET, key)?)?;
    }
    let values = parquet_strings(&copies)?;
    ensure!(values.len() > 1000, "too few values read back: {}", values.len());
    let leaks: Vec<_> = values
        .iter()
        .filter(|(_, _, v)| {
            v.contains("176.29.44.55") || v.contains("s3-cookie-") || v.contains("s3-user-") || v.contains("someone@")
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "personal data in the bucket: {:?}",
        &leaks[..leaks.len().min(5)]
    );

    // `marsad audit` reads the bucket (and the raw ids from the local log)
    let out = Command::new(marsad_bin())
        .args(["audit", "--json", "--data-dir"])
        .arg(&data)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    ensure!(
        out.status.success(),
        "audit failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let parquet_files = keys.iter().filter(|k| k.ends_with(".parquet")).count() as u64;
    assert!(
        report["files"].as_u64().unwrap_or(0) >= parquet_files,
        "audit read fewer files than the bucket holds ({parquet_files}): {report}"
    );
    // 37 cookie ids, 11 user ids and two IPs, from the local raw log
    assert_eq!(report["known_identifiers"], 37 + 11 + 2, "{report}");
    assert_eq!(report["hits"], json!([]), "{report}");

    // Python's deltalake reads the same table from the bucket
    let mut python_env: Vec<(&str, String)> = env.iter().filter(|(k, _)| k.starts_with("AWS_")).cloned().collect();
    python_env.extend([
        ("AWS_ENDPOINT_URL", s3.endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
    ]);
    let py = python_counts(&format!("s3://{BUCKET}/marsad/tables"), &python_env)?;
    assert_eq!(py["deltalake_events"], 400 + old, "{py}");
    assert_eq!(py["duckdb_traffic_events"], 400 + old, "{py}");

    // erasure deletes the subject's rows and vacuums the files that held them from the bucket
    let subject_events = (0..400).filter(|i| i % 37 == 5).count() as u64 + 2;
    let resp = client
        .delete(format!("{}/v1/subjects", m.query))
        .query(&[("cookie_id", "s3-cookie-5")])
        .bearer_auth(m.admin_key()?)
        .send()?;
    let status = resp.status();
    let receipt: Value = resp.json()?;
    ensure!(status.is_success(), "{status}: {receipt}");
    assert_eq!(receipt["rows_removed"], subject_events, "{receipt}");
    assert!(
        receipt["tables"][0]["files_vacuumed"].as_u64().unwrap_or(0) > 0,
        "{receipt}"
    );
    assert_eq!(
        m.sql_count("SELECT count(*) FROM events")?,
        400 + old - subject_events as i64
    );
    let before: HashSet<&String> = keys.iter().filter(|k| k.ends_with(".parquet")).collect();
    let after = s3.keys(BUCKET, "marsad/tables/")?;
    let gone = before.iter().filter(|k| !after.contains(k)).count();
    if gone == 0 {
        bail!("the vacuum removed no file from the bucket");
    }

    // the batch jobs work on the bucket too: SQL, compaction, retention
    let batch = |args: &[&str]| -> Result<String> {
        let out = Command::new(marsad_bin())
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        ensure!(out.status.success(), "marsad {args:?}: {stdout}{stderr}");
        Ok(stdout)
    };
    let remaining = 400 + old - subject_events as i64;
    let out = batch(&["sql", "--format", "csv", "-e", "SELECT count(*) AS n FROM events"])?;
    assert!(out.contains(&remaining.to_string()), "{out}");
    let out = batch(&["compact"])?;
    assert!(out.contains("compacted: rollup rows"), "{out}");
    // retention: the day five days ago goes, from every table and from the bucket
    let old_partition = format!("date={old_day}/");
    assert!(
        s3.keys(BUCKET, "marsad/tables/events/")?
            .iter()
            .any(|k| k.contains(&old_partition)),
        "old rows are in the bucket before retention"
    );
    let out = batch(&["retention", "--keep-days", "3"])?;
    assert!(out.contains("retention: kept"), "{out}");
    let old_left = old - 2;
    assert!(
        out.lines()
            .any(|l| l.starts_with("events ") && l.contains(&format!(" {old_left} rows deleted"))),
        "retention deleted the old day's {old_left} rows of events: {out}"
    );
    assert_eq!(m.sql_count("SELECT count(*) FROM events")?, remaining - old_left);
    assert_eq!(m.sql_count("SELECT sum(events) FROM traffic_hourly")?, 400);
    let still_there: Vec<String> = s3
        .keys(BUCKET, "marsad/tables/")?
        .into_iter()
        .filter(|k| k.contains(&old_partition))
        .collect();
    assert!(
        still_there.is_empty(),
        "files of the old day left in the bucket: {still_there:?}"
    );
    Ok(())
}

/// Appends `n` page views received five days ago (two per cookie of the test's 37) to the
/// local raw log under `data`, as ingest would have; returns `n`.
fn old_events(data: &std::path::Path, n: i64) -> Result<i64> {
    use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
    let received = chrono::Utc::now() - chrono::Duration::days(5);
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let event = json!({"type": "page_view", "url": "https://kulshi.example/en/jobs",
                "cookie_id": format!("s3-cookie-{}", i % 37), "event_id": format!("s3-old-{i}")});
            Record {
                key: None,
                payload: crate::common::fixture_envelope(event, received).to_bytes(),
            }
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let log = LocalLog::open(data.join("log"), LocalLogOptions::default())?;
        log.append(marsad_schemas::TOPIC_RAW, records).await?;
        anyhow::Ok(())
    })?;
    Ok(n)
}

/// Two writers appending to one table in the bucket at once: every commit is a conditional
/// put of the next log entry, so each append lands exactly once, and no lock service is needed.
#[test]
fn writers_racing_on_s3_each_commit_once() -> Result<()> {
    if !crate::common::tools_for("writers_racing_on_s3_each_commit_once", &[crate::common::Tool::Moto])? {
        return Ok(());
    }
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use marsad_process::table::{DeltaSink, TableSpec};

    const APPENDS: i64 = 12;
    const ROWS: i64 = 25;
    let tmp = tempfile::tempdir()?;
    let s3 = S3Server::start(&tmp.path().join("moto.log"))?;
    s3.create_bucket("marsad-race")?;
    let storage = [
        ("aws_endpoint", s3.endpoint.as_str()),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", "marsad-test"),
        ("aws_secret_access_key", "marsad-test-secret"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let location = marsad_config::TablesLocation::parse("s3://marsad-race/tables", &storage)?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("writer", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
    ]));
    let spec = TableSpec {
        name: marsad_schemas::TableName::Events,
        schema: schema.clone(),
        partitions: &[],
        comment: "race test",
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let writer = |name: &'static str| {
            let (location, spec, schema) = (location.clone(), spec.clone(), schema.clone());
            async move {
                let mut sink = DeltaSink::open_or_create(&location, &spec).await?;
                for seq in 0..APPENDS {
                    let batch = RecordBatch::try_new(
                        schema.clone(),
                        vec![
                            Arc::new(StringArray::from(vec![name; ROWS as usize])),
                            Arc::new(Int64Array::from(vec![seq; ROWS as usize])),
                        ],
                    )?;
                    sink.append(batch, &[(name.to_owned(), seq)]).await?;
                }
                anyhow::Ok(())
            }
        };
        let (a, b) = tokio::join!(tokio::spawn(writer("writer-a")), tokio::spawn(writer("writer-b")));
        a??;
        b??;

        let mut sink = DeltaSink::open_or_create(&location, &spec).await?;
        let positions = sink.committed(&["writer-a".to_owned(), "writer-b".to_owned()]).await?;
        assert_eq!(positions.get("writer-a"), Some(&(APPENDS - 1)));
        assert_eq!(positions.get("writer-b"), Some(&(APPENDS - 1)));
        let counts = sink
            .query(
                "SELECT writer, count(*) AS n, count(DISTINCT seq) AS s FROM events GROUP BY writer ORDER BY writer",
                None,
            )
            .await?;
        let batch = counts.first().context("no rows")?;
        let n = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("count type")?;
        let s = batch
            .column(2)
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("count type")?;
        assert_eq!(batch.num_rows(), 2);
        for i in 0..2 {
            assert_eq!(
                n.value(i),
                APPENDS * ROWS,
                "rows of writer {i}: lost or doubled appends"
            );
            assert_eq!(s.value(i), APPENDS);
        }
        // one log entry per append, plus the table's creation, once (the loser of that race
        // opens the winner's table instead of committing the schema again)
        assert_eq!(sink.version().context("no version")? as i64, 2 * APPENDS);
        anyhow::Ok(())
    })?;
    let commits = s3
        .keys("marsad-race", "tables/events/_delta_log/")?
        .into_iter()
        .filter(|k| k.ends_with(".json"))
        .count() as i64;
    assert_eq!(commits, 2 * APPENDS + 1);
    Ok(())
}
