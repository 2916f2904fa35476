//! The event log on Kafka: `marsad process` instances sharing the raw topic's
//! partitions in one consumer group, exactly once into Delta across a kill -9
//! and the rebalance it causes; ingest answering 503 while the brokers are
//! down and losing nothing it acknowledged. Against librdkafka's mock cluster
//! (in this process, over TCP on loopback) and, where the test says so, a real
//! Kafka-protocol broker process (`tansu`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::Utc;
use marsad_eventlog::{EventLog, KafkaLog, KafkaLogOptions, Record};
use marsad_schemas::{TOPIC_DEAD, TOPIC_OPTOUTS, TOPIC_RAW};
use rdkafka::mocking::MockCluster;

use crate::common::{S3Server, fixture_envelope, free_port, marsad_bin, s3_env};

/// The Kafka tests start several debug-built processes each; on a 2-core machine they run one
/// at a time so a starved broker does not miss heartbeats (a real deployment has the cores).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The keys every stage on Kafka shares (as hex pairs repeated 32 times); an env entry with an
/// empty value removes one.
const SHARED_KEYS: [(&str, &str); 3] = [
    ("MARSAD_SECRET_TARGETING_KEY", "5e"),
    ("MARSAD_SECRET_OPTOUT_KEY", "0f"),
    ("MARSAD_SECRET_NOISE_KEY", "a1"),
];

/// A `marsad` stage as a child process, killed when dropped.
struct Stage {
    child: Child,
    log: PathBuf,
}

impl Stage {
    fn start(args: &[&str], config: &Path, data: &Path, log: PathBuf, env: &[(&str, String)]) -> Result<Self> {
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(marsad_bin());
        cmd.args(args)
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .env(
                "RUST_LOG",
                "info,deltalake=warn,deltalake_core=warn,buoyant_kernel=warn,delta_kernel=warn,datafusion=warn,rdkafka=warn",
            )
            .env("RUST_LIB_BACKTRACE", "0")
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        // on Kafka every stage must be given the shared keys (none generates its own)
        for (k, v) in SHARED_KEYS {
            cmd.env(k, v.repeat(32));
        }
        cmd.envs(crate::common::test_env());
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        Ok(Stage {
            child: cmd.spawn().context("starting a marsad stage")?,
            log,
        })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill_hard(&mut self) -> Result<()> {
        Command::new("kill")
            .arg("-9")
            .arg(self.child.id().to_string())
            .status()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, and wait for a clean exit (buffer committed, group left).
    fn stop(&mut self) -> Result<()> {
        Command::new("kill").arg(self.child.id().to_string()).status()?;
        let status = self.child.wait()?;
        ensure!(status.success(), "stopped with {status}:\n{}", self.output());
        Ok(())
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `marsad sql` on the data dir: one integer.
fn count(config: &Path, data: &Path, sql: &str) -> Result<i64> {
    let out = Command::new(marsad_bin())
        .args(["sql", "--format", "csv", "-e", sql, "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "error")
        .output()?;
    ensure!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = text.lines().nth(1).unwrap_or("0").trim();
    Ok(if value.is_empty() {
        0
    } else {
        value.parse().context(text.clone())?
    })
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn kafka_config(dir: &Path, brokers: &str, session_timeout_ms: u64) -> Result<PathBuf> {
    kafka_config_with(dir, brokers, session_timeout_ms, "", "")
}

/// A clamp no visitor of these tests reaches: they count every event once, and the clamp
/// (tested in `rollups.rs`) would leave the busy fixture visitors' events out of the rollups.
const NO_CLAMP: u32 = 1_000_000;

/// A config for the Kafka log at `brokers`, with extra librdkafka `properties` (TOML lines).
fn kafka_config_with(
    dir: &Path,
    brokers: &str,
    session_timeout_ms: u64,
    eventlog: &str,
    properties: &str,
) -> Result<PathBuf> {
    let path = dir.join("marsad-kafka.toml");
    std::fs::write(
        &path,
        format!(
            "[eventlog]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\nsession_timeout_ms = {session_timeout_ms}\n{eventlog}\n\
             compression = \"lz4\"\n\n[eventlog.kafka]\n{properties}\n\n[process]\nbatch_max_interval_ms = 300\n\
             max_events_per_visitor_day = {NO_CLAMP}\n\n\
             [query]\npg_enabled = false\n"
        ),
    )?;
    Ok(path)
}

/// Envelopes of `n` small page views by 5,000 visitors, ids `{prefix}-{i}`.
fn envelopes(prefix: &str, range: std::ops::Range<usize>) -> Vec<Record> {
    range
        .map(|i| {
            let event = serde_json::json!({
                "type": "page_view",
                "url": if i % 2 == 0 { "https://kulshi.example/en/cars" } else { "https://kulshi.example/ar/وظائف" },
                "cookie_id": format!("c-{}", i % 5_000),
                "event_id": format!("{prefix}-{i}"),
            });
            let env = fixture_envelope(event, Utc::now());
            Record {
                key: Some(env.partition_key()),
                payload: env.to_bytes(),
            }
        })
        .collect()
}

/// The topic segment changes are pushed to (the default of `audience.push.kafka_topic`).
const SEGMENTS_TOPIC: &str = "marsad.segments";

fn mock_cluster() -> Result<MockCluster<'static, rdkafka::producer::DefaultProducerContext>> {
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(TOPIC_RAW, 4, 1)?;
    cluster.create_topic(TOPIC_DEAD, 4, 1)?;
    cluster.create_topic(TOPIC_OPTOUTS, 1, 1)?;
    cluster.create_topic(marsad_schemas::TOPIC_DAILY_KEYS, 1, 1)?;
    cluster.create_topic(SEGMENTS_TOPIC, 4, 1)?;
    Ok(cluster)
}

/// A mock cluster with Marsad's topics, a config and data dir for it, and a producer.
struct OnMockCluster {
    tmp: tempfile::TempDir,
    data: PathBuf,
    config: PathBuf,
    runtime: tokio::runtime::Runtime,
    producer: KafkaLog,
    // dropped last: the producer and the stages talk to it
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
}

impl OnMockCluster {
    fn new() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let cluster = mock_cluster()?;
        Ok(OnMockCluster {
            data: tmp.path().join("data"),
            config: kafka_config(tmp.path(), &cluster.bootstrap_servers(), 6000)?,
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
            producer: KafkaLog::connect(KafkaLogOptions::new(cluster.bootstrap_servers()))?,
            _cluster: cluster,
            tmp,
        })
    }

    /// Appends page views `{prefix}-{i}` for `range` to the raw topic, 5,000 at a time.
    fn produce(&self, prefix: &str, range: std::ops::Range<usize>) -> Result<()> {
        for chunk in range.clone().step_by(5_000) {
            let end = (chunk + 5_000).min(range.end);
            self.runtime
                .block_on(self.producer.append(TOPIC_RAW, envelopes(prefix, chunk..end)))?;
        }
        Ok(())
    }

    /// Starts `marsad process` logging to `{name}.log`, with `env`.
    fn processor(&self, name: &str, env: &[(&str, String)]) -> Result<Stage> {
        Stage::start(
            &["process"],
            &self.config,
            &self.data,
            self.tmp.path().join(format!("{name}.log")),
            env,
        )
    }

    fn count(&self, sql: &str) -> Result<i64> {
        count(&self.config, &self.data, sql)
    }
}

/// Waits until ingest and query (each with its URL) answer `/readyz` and both processors own partitions.
fn wait_until_serving(
    client: &reqwest::blocking::Client,
    (ingest, ingest_url): (&Stage, &str),
    (query, query_url): (&Stage, &str),
    processors: [&Stage; 2],
) -> Result<()> {
    wait_for("ingest and query to be ready", Duration::from_secs(60), || {
        let up = |u: String| client.get(u).send().is_ok_and(|r| r.status().is_success());
        Ok(up(format!("{ingest_url}/readyz")) && up(format!("{query_url}/readyz")))
    })
    .with_context(|| format!("{}\n{}", ingest.output(), query.output()))?;
    wait_for("both processors to own partitions", Duration::from_secs(60), || {
        Ok(processors.iter().all(|p| assigned_partitions(&p.output())))
    })
}

fn assigned_partitions(output: &str) -> bool {
    output.contains("kafka partitions assigned")
}

/// Whether the last assignment a processor logged holds all four partitions.
fn owns_all(output: &str) -> bool {
    output
        .lines()
        .rev()
        .find(|l| l.contains("kafka partitions"))
        .is_some_and(|l| l.contains("0, 1, 2, 3"))
}

#[test]
fn two_processors_share_four_partitions_and_a_killed_one_is_taken_over() -> Result<()> {
    let _serial = one_at_a_time();
    const TOTAL: usize = 100_000;
    let run = OnMockCluster::new()?;
    let metrics = |port: u16| vec![("MARSAD_PROCESS__METRICS_ADDR", format!("127.0.0.1:{port}"))];
    let mut first = run.processor("p1", &metrics(free_port()?))?;
    let second = run.processor("p2", &metrics(free_port()?))?;
    wait_for("both processors to own partitions", Duration::from_secs(60), || {
        Ok(assigned_partitions(&first.output()) && assigned_partitions(&second.output()))
    })?;

    // the first half, then a kill -9 of one processor while the second half streams in
    let half = TOTAL / 2;
    run.produce("k", 0..half)?;
    wait_for("a third of the events in Delta", Duration::from_secs(120), || {
        Ok(run.count("SELECT count(*) FROM events")? >= (TOTAL / 3) as i64)
    })?;
    first.kill_hard()?;
    run.produce("k", half..TOTAL)?;
    wait_for("every event in Delta", Duration::from_secs(240), || {
        Ok(run.count("SELECT count(*) FROM events")? >= TOTAL as i64)
    })
    .with_context(|| format!("survivor's log:\n{}", second.output()))?;
    // settle: a late duplicate would show up in the next commits
    std::thread::sleep(Duration::from_secs(3));
    ensure!(run.count("SELECT count(*) FROM events")? == TOTAL as i64, "exact count");
    ensure!(
        run.count("SELECT count(DISTINCT event_id) FROM events")? == TOTAL as i64,
        "no event twice"
    );
    // the rollups commit at most every process.rollup_commit_interval_ms after `events`
    wait_for("the rollups to count every event", Duration::from_secs(60), || {
        Ok(run.count("SELECT sum(events) FROM traffic_hourly")? >= TOTAL as i64)
    })
    .with_context(|| format!("survivor's log:\n{}", second.output()))?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        run.count("SELECT sum(events) FROM traffic_hourly")? == TOTAL as i64,
        "the rollups count every event once"
    );
    let survivor = second.output();
    for line in survivor
        .lines()
        .filter(|l| l.contains("partitions") || l.contains("moved") || l.contains("resuming"))
    {
        eprintln!("survivor: {line}");
    }
    ensure!(
        survivor.matches("kafka partitions assigned").count() >= 2,
        "the survivor was assigned the dead processor's partitions:\n{survivor}"
    );

    // the audit reads the raw ids to look for from the topic: 5,000 cookies and one address
    let audit = Command::new(marsad_bin())
        .args(["audit", "--config"])
        .arg(&run.config)
        .arg("--data-dir")
        .arg(&run.data)
        .env("RUST_LOG", "warn")
        .output()?;
    let report = String::from_utf8_lossy(&audit.stdout).into_owned();
    ensure!(
        audit.status.success() && report.contains("against 5001 identifiers from the raw log: 0 findings"),
        "{report}{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    Ok(())
}

/// A rebalance makes a processor drop what it buffered and read it again; the rows it drops
/// must count when read again (not be taken for retries of themselves).
#[test]
fn rows_dropped_at_a_rebalance_are_read_again_and_counted() -> Result<()> {
    let _serial = one_at_a_time();
    const TOTAL: usize = 20_000;
    let run = OnMockCluster::new()?;
    run.produce("r", 0..TOTAL)?;
    // the first processor buffers everything (its first commit is 15 s after its first read)
    let first_metrics = free_port()?;
    let env = |metrics: u16| {
        vec![
            ("MARSAD_PROCESS__METRICS_ADDR", format!("127.0.0.1:{metrics}")),
            ("MARSAD_PROCESS__BATCH_MAX_INTERVAL_MS", "15000".to_owned()),
        ]
    };
    let first = run.processor("p1", &env(first_metrics))?;
    let commits_of = |port: u16| -> Result<u64> {
        let text = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))?.text()?;
        text.lines()
            .find_map(|l| l.strip_prefix("marsad_process_commits_total")?.trim().parse().ok())
            .context("no commit count in the metrics")
    };
    wait_for("the first processor to read", Duration::from_secs(60), || {
        Ok(assigned_partitions(&first.output()))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    // a second processor joins: the first gives up two partitions and re-reads the two it keeps
    let second = run.processor("p2", &env(free_port()?))?;
    wait_for(
        "the second processor to own partitions",
        Duration::from_secs(60),
        || Ok(assigned_partitions(&second.output())),
    )?;
    ensure!(
        commits_of(first_metrics)? == 0,
        "the first processor committed before the rebalance: nothing buffered was dropped"
    );
    wait_for("every event in Delta", Duration::from_secs(120), || {
        Ok(run.count("SELECT count(*) FROM events")? >= TOTAL as i64)
    })
    .with_context(|| format!("{}\n---- second:\n{}", first.output(), second.output()))?;
    ensure!(
        run.count("SELECT count(DISTINCT event_id) FROM events")? == TOTAL as i64,
        "every event once"
    );
    Ok(())
}

/// The deployment the README describes: ingest, two processors and query, each a process with
/// a data dir of its own, joined by Kafka, the tables in an S3 bucket; a processor killed
/// mid-run; every event once in the tables, as the query service reads them from the bucket.
#[test]
fn separate_stages_on_kafka_with_tables_in_a_bucket() -> Result<()> {
    if !crate::common::tools_for(
        "separate_stages_on_kafka_with_tables_in_a_bucket",
        &[crate::common::Tool::Moto],
    )? {
        return Ok(());
    }
    let _serial = one_at_a_time();
    const BATCHES: usize = 40;
    const BATCH: usize = 500;
    let run = OnMockCluster::new()?;
    let s3 = S3Server::start(&run.tmp.path().join("moto.log"))?;
    s3.create_bucket("marsad-kafka")?;
    // shared: the Kafka topics, the bucket and the targeting key; nothing on disk
    let targeting_key = "5e".repeat(32);
    let env = |metrics: u16| {
        let mut env = s3_env(&s3, "marsad-kafka");
        env.push(("MARSAD_SECRET_TARGETING_KEY", targeting_key.clone()));
        env.push(("MARSAD_PROCESS__METRICS_ADDR", format!("127.0.0.1:{metrics}")));
        env
    };
    let stage = |args: &[&str], name: &str| -> Result<Stage> {
        Stage::start(
            args,
            &run.config,
            &run.tmp.path().join(format!("{name}-data")),
            run.tmp.path().join(format!("{name}.log")),
            &env(free_port()?),
        )
    };
    let (ingest_port, query_port) = (free_port()?, free_port()?);
    let ingest = stage(
        &["ingest", "--ingest-addr", &format!("127.0.0.1:{ingest_port}")],
        "ingest",
    )?;
    let mut first = stage(&["process"], "p1")?;
    let second = stage(&["process"], "p2")?;
    let query = stage(&["query", "--query-addr", &format!("127.0.0.1:{query_port}")], "query")?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let (ingest_url, query_url) = (
        format!("http://127.0.0.1:{ingest_port}"),
        format!("http://127.0.0.1:{query_port}"),
    );
    wait_until_serving(&client, (&ingest, &ingest_url), (&query, &query_url), [&first, &second])?;
    let key = std::fs::read_to_string(run.tmp.path().join("query-data").join("admin.key"))?;
    let count = |sql: &str| -> Result<i64> {
        let body: serde_json::Value = client
            .post(format!("{query_url}/v1/sql"))
            .bearer_auth(key.trim())
            .json(&serde_json::json!({ "sql": sql }))
            .send()?
            .json()?;
        body["rows"][0]["n"].as_i64().with_context(|| format!("{sql}: {body}"))
    };

    for b in 0..BATCHES {
        if b == BATCHES / 2 {
            first.kill_hard()?;
        }
        let ids: Vec<String> = (0..BATCH).map(|i| format!("s-{b}-{i}")).collect();
        ensure!(send_batch(&client, &ingest_url, &ids)?, "batch {b} refused");
    }
    let total = (BATCHES * BATCH) as i64;
    wait_for("every event in the bucket's tables", Duration::from_secs(240), || {
        Ok(count("SELECT count(DISTINCT event_id) AS n FROM events")? >= total)
    })
    .with_context(|| format!("survivor:\n{}", second.output()))?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(count("SELECT count(*) AS n FROM events")? == total, "no event twice");
    // the rollups commit at most every process.rollup_commit_interval_ms after `events`
    wait_for("the rollups to count every event", Duration::from_secs(60), || {
        Ok(count("SELECT sum(events) AS n FROM traffic_hourly")? >= total)
    })?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        count("SELECT sum(events) AS n FROM traffic_hourly")? == total,
        "rollups exactly once"
    );
    ensure!(
        count("SELECT count(DISTINCT visitor_key) AS n FROM events")? == BATCH as i64,
        "both processors (the survivor taking over the partitions of the one killed) hash each of \
         the {BATCH} cookies under the same daily key"
    );
    for name in ["ingest", "p1", "p2", "query"] {
        let local = run.tmp.path().join(format!("{name}-data")).join("tables");
        ensure!(!local.exists(), "{name} wrote tables locally");
    }
    let commits = s3
        .keys("marsad-kafka", "marsad/tables/events/_delta_log/")?
        .into_iter()
        .filter(|k| k.ends_with(".json"))
        .count();
    ensure!(commits > 2, "{commits} commits of events in the bucket");
    Ok(())
}

#[test]
fn ingest_answers_503_while_the_broker_is_down_and_loses_nothing_it_acknowledged() -> Result<()> {
    let _serial = one_at_a_time();
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let cluster = mock_cluster()?;
    let config = kafka_config(tmp.path(), &cluster.bootstrap_servers(), 6000)?;
    let port = free_port()?;
    let metrics_port = free_port()?;
    let env = vec![
        ("MARSAD_INGEST__APPEND_TIMEOUT_MS", "1500".to_owned()),
        ("MARSAD_PROCESS__METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
    ];
    let ingest = Stage::start(
        &["ingest", "--ingest-addr", &format!("127.0.0.1:{port}")],
        &config,
        &data,
        tmp.path().join("ingest.log"),
        &env,
    )?;
    let process = Stage::start(&["process"], &config, &data, tmp.path().join("process.log"), &env)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://127.0.0.1:{port}");
    wait_for("ingest to be ready", Duration::from_secs(30), || {
        Ok(client
            .get(format!("{url}/healthz"))
            .send()
            .is_ok_and(|r| r.status().is_success()))
    })
    .with_context(|| ingest.output())?;
    // the processor serves its metrics once it has loaded the opt-outs: the outage comes after
    // (on a busy machine it could otherwise start before the processor read the opt-out log)
    wait_for("the processor to be ready", Duration::from_secs(60), || {
        Ok(client
            .get(format!("http://127.0.0.1:{metrics_port}/readyz"))
            .send()
            .is_ok_and(|r| r.status().is_success()))
    })
    .with_context(|| process.output())?;

    // batches of 50 with client-made ids; a 503 is retried after Retry-After, as clients do
    let mut acknowledged: HashSet<String> = HashSet::new();
    let mut refusals = Vec::new();
    let mut slowest_refusal = Duration::ZERO;
    for batch in 0..60 {
        if batch == 20 {
            cluster.broker_down(1)?;
        }
        if batch == 40 {
            cluster.broker_up(1)?;
        }
        let ids: Vec<String> = (0..50).map(|i| format!("o-{batch}-{i}")).collect();
        let events: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| serde_json::json!({"type": "page_view", "url": "https://kulshi.example/en/jobs", "cookie_id": format!("c-{id}"), "event_id": id}))
            .collect();
        loop {
            let sent = Instant::now();
            let resp = client.post(format!("{url}/v1/batch")).json(&events).send()?;
            match resp.status().as_u16() {
                202 => {
                    acknowledged.extend(ids.iter().cloned());
                    break;
                }
                503 => {
                    slowest_refusal = slowest_refusal.max(sent.elapsed());
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .context("a 503 says when to retry")?;
                    refusals.push(batch);
                    // the outage lasts until batch 40: move on and come back to this batch's ids
                    if batch < 40 {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(retry_after.min(2)));
                }
                other => bail!("unexpected {other}: {}", resp.text().unwrap_or_default()),
            }
        }
    }
    eprintln!(
        "outage: {} refusals (batches {:?}), slowest {slowest_refusal:?}",
        refusals.len(),
        refusals
    );
    ensure!(!refusals.is_empty(), "the outage was answered with 503");
    ensure!(
        slowest_refusal < Duration::from_secs(5),
        "refused within the append timeout: {slowest_refusal:?}"
    );
    // after the outage, clients resend what was refused (same ids)
    for &batch in refusals.iter().filter(|b| **b < 40) {
        let ids: Vec<String> = (0..50).map(|i| format!("o-{batch}-{i}")).collect();
        let events: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| serde_json::json!({"type": "page_view", "url": "https://kulshi.example/en/jobs", "cookie_id": format!("c-{id}"), "event_id": id}))
            .collect();
        let resp = client.post(format!("{url}/v1/batch")).json(&events).send()?;
        ensure!(resp.status().as_u16() == 202, "after the outage: {}", resp.status());
        acknowledged.extend(ids);
    }
    ensure!(acknowledged.len() == 3_000, "{} acknowledged", acknowledged.len());
    wait_for("every acknowledged event in Delta", Duration::from_secs(120), || {
        Ok(count(&config, &data, "SELECT count(DISTINCT event_id) FROM events")? >= 3_000)
    })
    .with_context(|| process.output())?;
    ensure!(
        count(&config, &data, "SELECT count(*) FROM events")? == 3_000,
        "no event twice"
    );
    Ok(())
}

/// The `tansu` broker binary: on the PATH or where `cargo install` puts it.
pub(crate) fn tansu_binary() -> Result<PathBuf> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|_| PathBuf::from("/root/.cargo"));
    let candidates = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| PathBuf::from(d).join("tansu"))
        .chain([home.join("bin/tansu")])
        .collect::<Vec<_>>();
    candidates.into_iter().find(|p| p.is_file()).context(
        "the Kafka-protocol broker `tansu` is not installed: `cargo install tansu --features dynostore` \
         (.ci/run does this once)",
    )
}

/// A `tansu` broker process on loopback, in-memory storage, stopped when dropped.
struct Tansu {
    child: Child,
    brokers: String,
}

impl Tansu {
    fn start(dir: &Path) -> Result<Self> {
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("tansu.log"))?;
        let child = Command::new(tansu_binary()?)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting tansu")?;
        let brokers = format!("127.0.0.1:{port}");
        wait_for("tansu to listen", Duration::from_secs(30), || {
            Ok(std::net::TcpStream::connect(&brokers).is_ok())
        })?;
        Ok(Tansu { child, brokers })
    }

    /// Freezes the broker (SIGSTOP): connections stay open and nothing is answered.
    fn freeze(&self) -> Result<()> {
        Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status()?;
        Ok(())
    }

    fn thaw(&self) -> Result<()> {
        Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status()?;
        Ok(())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `ids` as one batch; `Ok(true)` when acknowledged, `Ok(false)` on 503.
fn send_batch(client: &reqwest::blocking::Client, url: &str, ids: &[String]) -> Result<bool> {
    let events: Vec<serde_json::Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            serde_json::json!({"type": "page_view", "url": "https://kulshi.example/ar/سيارات",
                "cookie_id": format!("c-{}", i % 700), "event_id": id})
        })
        .collect();
    let resp = client.post(format!("{url}/v1/batch")).json(&events).send()?;
    match resp.status().as_u16() {
        202 => Ok(true),
        503 => {
            ensure!(resp.headers().contains_key("retry-after"), "a 503 says when to retry");
            Ok(false)
        }
        other => bail!("unexpected {other}: {}", resp.text().unwrap_or_default()),
    }
}

#[test]
fn separate_stages_on_a_real_broker_process() -> Result<()> {
    if !crate::common::tools_for(
        "separate_stages_on_a_real_broker_process",
        &[crate::common::Tool::Tansu],
    )? {
        return Ok(());
    }
    let _serial = one_at_a_time();
    const BATCHES: usize = 80;
    const BATCH: usize = 500;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let broker = Tansu::start(tmp.path())?;
    // tansu: classic groups with an eager assignor, as measured to work with it
    let config = kafka_config_with(
        tmp.path(),
        &broker.brokers,
        10_000,
        // it returns nothing for a fetch from inside a record batch
        "seek_from_log_start = true",
        "\"partition.assignment.strategy\" = \"roundrobin\"",
    )?;
    let created = Command::new(marsad_bin())
        .args([
            "topics",
            "create",
            "--partitions",
            "4",
            "--replication",
            "1",
            "--config",
        ])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .output()?;
    ensure!(
        created.status.success(),
        "topics create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let listing = String::from_utf8_lossy(&created.stdout).into_owned();
    ensure!(
        listing.contains(TOPIC_RAW) && listing.contains(SEGMENTS_TOPIC) && listing.contains("5 topics created"),
        "{listing}"
    );

    // ingest, two processors and query, each a process of its own on the same config and data
    let ingest_port = free_port()?;
    let query_port = free_port()?;
    let env = |metrics: u16| {
        vec![
            ("MARSAD_INGEST__APPEND_TIMEOUT_MS", "2000".to_owned()),
            ("MARSAD_PROCESS__METRICS_ADDR", format!("127.0.0.1:{metrics}")),
        ]
    };
    let stage = |args: &[&str], name: &str| -> Result<Stage> {
        Stage::start(
            args,
            &config,
            &data,
            tmp.path().join(format!("{name}.log")),
            &env(free_port()?),
        )
    };
    let ingest = stage(
        &["ingest", "--ingest-addr", &format!("127.0.0.1:{ingest_port}")],
        "ingest",
    )?;
    let mut first = stage(&["process"], "p1")?;
    let mut second = stage(&["process"], "p2")?;
    let query = stage(&["query", "--query-addr", &format!("127.0.0.1:{query_port}")], "query")?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://127.0.0.1:{ingest_port}");
    let query_url = format!("http://127.0.0.1:{query_port}");
    wait_until_serving(&client, (&ingest, &url), (&query, &query_url), [&first, &second])?;

    // load; a quarter of the way in one processor stops (and leaves the group), the other takes
    // its partitions; halfway the broker freezes for a while; at three quarters the survivor is
    // replaced by a new processor, which resumes from the positions in Delta. (tansu 0.6 does
    // not reliably finish a rebalance after a member vanished without leaving the group, as
    // after kill -9: the next join waits for the dead member. The mock-cluster test covers a
    // killed processor's partitions being taken over.)
    let mut third: Option<Stage> = None;
    let mut refused = Vec::new();
    let mut acknowledged = 0;
    for b in 0..BATCHES {
        if b == BATCHES / 4 {
            first.stop()?;
            wait_for(
                "the survivor to take all four partitions",
                Duration::from_secs(60),
                || Ok(owns_all(&second.output())),
            )?;
        }
        if b == BATCHES / 2 {
            broker.freeze()?;
        }
        if b == BATCHES / 2 + 2 {
            broker.thaw()?;
        }
        if b == BATCHES * 3 / 4 {
            second.stop()?;
            third = Some(stage(&["process"], "p3")?);
        }
        let ids: Vec<String> = (0..BATCH).map(|i| format!("t-{b}-{i}")).collect();
        let started = Instant::now();
        if send_batch(&client, &url, &ids)? {
            acknowledged += ids.len();
        } else {
            ensure!(
                started.elapsed() < Duration::from_secs(5),
                "refused within the append timeout"
            );
            refused.push(ids);
        }
    }
    ensure!(!refused.is_empty(), "the frozen broker was answered with 503");
    // clients resend what was refused, with the same ids
    for ids in &refused {
        wait_for("a refused batch to be taken", Duration::from_secs(30), || {
            send_batch(&client, &url, ids)
        })?;
        acknowledged += ids.len();
    }
    ensure!(acknowledged == BATCHES * BATCH, "{acknowledged} acknowledged");
    let total = (BATCHES * BATCH) as i64;
    let third = third.context("the replacement processor")?;
    wait_for("every event in Delta", Duration::from_secs(240), || {
        Ok(count(&config, &data, "SELECT count(DISTINCT event_id) FROM events")? >= total)
    })
    .with_context(|| format!("{}\n---- replaced:\n{}", third.output(), second.output()))?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        count(&config, &data, "SELECT count(*) FROM events")? == total,
        "no event twice"
    );
    // the rollups commit at most every process.rollup_commit_interval_ms after `events`
    wait_for("the rollups to count every event", Duration::from_secs(60), || {
        Ok(count(&config, &data, "SELECT sum(events) FROM traffic_hourly")? >= total)
    })?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        count(&config, &data, "SELECT sum(events) FROM traffic_hourly")? == total,
        "rollups exactly once"
    );

    // the query service, a process of its own, reads the same tables
    let key = std::fs::read_to_string(data.join("admin.key"))?;
    let body: serde_json::Value = client
        .post(format!("{query_url}/v1/sql"))
        .bearer_auth(key.trim())
        .json(&serde_json::json!({"sql": "SELECT count(*) AS n FROM events"}))
        .send()?
        .json()?;
    ensure!(body["rows"][0]["n"] == total, "{body}");
    eprintln!(
        "tansu: {acknowledged} events through ingest → Kafka → two processors (one stopped, the other replaced) → Delta; {} batches refused while frozen",
        refused.len()
    );
    Ok(())
}

/// On Kafka the stages run on several machines: one started without the shared keys would
/// generate its own and disagree with the others, so it refuses to start, saying what to set.
#[test]
fn a_stage_without_the_shared_targeting_key_refuses_to_start() -> Result<()> {
    let _serial = one_at_a_time();
    let run = OnMockCluster::new()?;
    let mut p = run.processor("no-key", &[("MARSAD_SECRET_TARGETING_KEY", String::new())])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = p.child.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "started without a targeting key:\n{}",
            p.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(!status.success(), "{status}");
    ensure!(
        p.output().contains("MARSAD_SECRET_TARGETING_KEY") && p.output().contains("never generates"),
        "{}",
        p.output()
    );
    Ok(())
}

/// An erasure while the processor lags (stopped after reading the subject's events, before
/// committing them): the erasure answers 202 and stays "waiting" while the processor is
/// stopped, and says "done" only once the processor has committed past the opt-out and the
/// rows are deleted — then no file of any table holds them.
#[test]
fn erasure_waits_for_a_lagging_processor() -> Result<()> {
    let _serial = one_at_a_time();
    let run = OnMockCluster::new()?;
    let (ingest_port, query_port) = (free_port()?, free_port()?);
    let env = vec![
        ("MARSAD_PROCESS__BATCH_MAX_INTERVAL_MS", "2500".to_owned()),
        ("MARSAD_QUERY__ERASURE_WAIT_MS", "1000".to_owned()),
        ("MARSAD_PROCESS__METRICS_ADDR", format!("127.0.0.1:{}", free_port()?)),
    ];
    let stage = |args: &[&str], name: &str| {
        Stage::start(
            args,
            &run.config,
            &run.data,
            run.tmp.path().join(format!("{name}.log")),
            &env,
        )
    };
    let ingest = stage(
        &["ingest", "--ingest-addr", &format!("127.0.0.1:{ingest_port}")],
        "ingest",
    )?;
    let mut processor = run.processor("p1", &env)?;
    let query = stage(&["query", "--query-addr", &format!("127.0.0.1:{query_port}")], "query")?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let (ingest_url, query_url) = (
        format!("http://127.0.0.1:{ingest_port}"),
        format!("http://127.0.0.1:{query_port}"),
    );
    wait_for("the stages to serve", Duration::from_secs(60), || {
        let ready = |url: &str| {
            client
                .get(format!("{url}/readyz"))
                .send()
                .is_ok_and(|r| r.status().is_success())
        };
        Ok(ready(&ingest_url) && ready(&query_url) && assigned_partitions(&processor.output()))
    })
    .with_context(|| format!("{}\n{}\n{}", ingest.output(), query.output(), processor.output()))?;
    // a first commit, so the tables exist
    let warmup: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            serde_json::json!({"type": "page_view", "url": "https://kulshi.example/en/cars",
            "event_id": format!("warm-{i}"), "cookie_id": "ck-warm"})
        })
        .collect();
    let post = |events: &[serde_json::Value]| -> Result<()> {
        let resp = client.post(format!("{ingest_url}/v1/batch")).json(&events).send()?;
        ensure!(resp.status().is_success(), "{}: {}", resp.status(), resp.text()?);
        Ok(())
    };
    post(&warmup)?;
    wait_for("the first commit", Duration::from_secs(60), || {
        Ok(run.count("SELECT count(*) FROM events").unwrap_or(0) == 5)
    })?;
    // the subject's events and others', read by the processor, which is then stopped
    let mut batch = Vec::new();
    for i in 0..10 {
        batch.push(
            serde_json::json!({"type": "page_view", "url": "https://kulshi.example/en/cars",
            "event_id": format!("erase-{i}"), "cookie_id": "ck-erase", "consent": {"personalisation": true}}),
        );
        batch.push(
            serde_json::json!({"type": "page_view", "url": "https://kulshi.example/en/cars",
            "event_id": format!("keep-{i}"), "cookie_id": format!("ck-keep-{i}")}),
        );
    }
    post(&batch)?;
    std::thread::sleep(Duration::from_millis(700));
    Command::new("kill")
        .args(["-STOP", &processor.child.id().to_string()])
        .status()?;
    ensure!(
        run.count("SELECT count(*) FROM events")? == 5,
        "the processor committed before it was stopped: nothing lags"
    );
    let key = std::fs::read_to_string(run.data.join("admin.key"))?;
    let resp = client
        .delete(format!("{query_url}/v1/subjects"))
        .query(&[("cookie_id", "ck-erase")])
        .bearer_auth(key.trim())
        .send()?;
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json()?;
    ensure!(status == 202, "{status}: {body}");
    let url = format!("{query_url}{}", body["status_url"].as_str().context("status_url")?);
    let poll = || -> Result<serde_json::Value> { Ok(client.get(&url).bearer_auth(key.trim()).send()?.json()?) };
    std::thread::sleep(Duration::from_secs(4));
    let waiting = poll()?;
    ensure!(
        waiting["status"] == "waiting",
        "done while the processor had not committed: {waiting}"
    );
    Command::new("kill")
        .args(["-CONT", &processor.child.id().to_string()])
        .status()?;
    let mut done = serde_json::Value::Null;
    wait_for("the erasure to finish", Duration::from_secs(60), || {
        done = poll()?;
        Ok(done["status"] != "waiting")
    })?;
    ensure!(done["status"] == "done", "{done}");
    ensure!(done["receipt"]["rows_removed"] == 10, "{done}");
    ensure!(run.count("SELECT count(*) FROM events WHERE event_id LIKE 'erase-%'")? == 0);
    ensure!(run.count("SELECT count(*) FROM events WHERE event_id LIKE 'keep-%'")? == 10);
    let leftovers: Vec<_> = crate::common::parquet_strings(&run.data.join("tables"))?
        .into_iter()
        .filter(|(_, _, v)| v.starts_with("erase-"))
        .collect();
    ensure!(leftovers.is_empty(), "erased rows in files: {leftovers:?}");
    processor.stop()?;
    Ok(())
}

/// Every record of `topic` so far, from its start, with when it was read: (key, payload or
/// `None` for a tombstone, read at).
struct TopicReader {
    consumer: rdkafka::consumer::BaseConsumer,
    records: Vec<(String, Option<serde_json::Value>, Instant)>,
}

impl TopicReader {
    fn new(brokers: &str, topic: &str, partitions: i32) -> Result<Self> {
        use rdkafka::consumer::Consumer;
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "segments-test-reader")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let mut assignment = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            assignment.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(TopicReader {
            consumer,
            records: Vec::new(),
        })
    }

    /// Reads what arrived, for up to `wait`.
    fn read(&mut self, wait: Duration) -> Result<()> {
        use rdkafka::message::Message;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(20)) {
                Some(m) => {
                    let m = m?;
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    let payload = m.payload().map(serde_json::from_slice).transpose()?;
                    self.records.push((key, payload, Instant::now()));
                }
                None => continue,
            }
        }
        Ok(())
    }
}

#[test]
fn segment_changes_and_opt_outs_reach_the_compacted_segments_topic() -> Result<()> {
    use marsad_privacy::keys::SecretKey;
    use marsad_privacy::optout::{OptOutRecord, OptOutScope};
    use marsad_privacy::pseudonym::{Subject, audience_id};
    let _serial = one_at_a_time();
    let run = OnMockCluster::new()?;
    // the Kafka config and segments refreshed every 2 s, served from 3 members
    let config = run.tmp.path().join("marsad-segments.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[audience]\nmin_segment_size = 3\nrefresh_interval_secs = 2\n\n[[audience.segments]]\nid = \"car-intenders\"\n\
             window_days = 14\nrules = [{{ event_type = \"page_view\", page_category = \"cars\", at_least = 2 }}]\n",
            std::fs::read_to_string(&run.config)?
        ),
    )?;
    let processor = Stage::start(
        &["process"],
        &config,
        &run.data,
        run.tmp.path().join("segments.log"),
        &[],
    )?;
    let targeting = SecretKey::from_hex("targeting", &"5e".repeat(32))?;
    let optout_key = SecretKey::from_hex("opt-out", &"0f".repeat(32))?;
    let members: Vec<String> = (0..4).map(|i| format!("kafka-car-fan-{i}")).collect();
    let ids: Vec<String> = members
        .iter()
        .map(|c| audience_id(&targeting, Subject::Cookie(c)))
        .collect();
    let consent = serde_json::json!({"analytics": true, "personalisation": true, "marketing": true});
    let records: Vec<Record> = members
        .iter()
        .flat_map(|c| (0..3).map(move |i| (c.clone(), i)))
        .map(|(c, i)| {
            let event = serde_json::json!({"type": "page_view", "url": format!("https://kulshi.example/en/cars/{i}"),
                "cookie_id": c, "event_id": format!("{c}-{i}"), "consent": consent});
            let env = fixture_envelope(event, Utc::now());
            Record {
                key: Some(env.partition_key()),
                payload: env.to_bytes(),
            }
        })
        .collect();
    run.runtime.block_on(run.producer.append(TOPIC_RAW, records))?;

    let mut reader = TopicReader::new(&run._cluster.bootstrap_servers(), SEGMENTS_TOPIC, 4)?;
    let joined = |records: &[(String, Option<serde_json::Value>, Instant)]| -> HashSet<String> {
        records
            .iter()
            .filter(|(key, v, _)| {
                v.as_ref().is_some_and(|v| {
                    v["audience_id"] == key.as_str()
                        && v["joined"] == serde_json::json!(["car-intenders"])
                        && v["cause"] == "refresh"
                })
            })
            .map(|(k, _, _)| k.clone())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while joined(&reader.records) != ids.iter().cloned().collect() {
        ensure!(
            Instant::now() < deadline,
            "members joining, keyed by audience_id: {:?}\n{}",
            reader.records,
            processor.output()
        );
        reader.read(Duration::from_millis(200))?;
    }

    // an opt-out recorded in the opt-out log: its removal, then a tombstone, within a second
    let record = OptOutRecord::new(
        &optout_key,
        &targeting,
        Subject::Cookie(&members[0]),
        OptOutScope::Personalisation,
    );
    let payload = record.to_bytes();
    run.runtime.block_on(run.producer.append(
        TOPIC_OPTOUTS,
        vec![Record {
            key: Some(record.log_key()),
            payload,
        }],
    ))?;
    let recorded = Instant::now();
    let seen_before = reader.records.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    let tombstone_at = loop {
        reader.read(Duration::from_millis(20))?;
        let new = &reader.records[seen_before..];
        let removal = new.iter().position(|(k, v, _)| {
            k == &ids[0]
                && v.as_ref()
                    .is_some_and(|v| v["cause"] == "opt_out" && v["segments"] == serde_json::json!([]))
        });
        let tombstone = new.iter().position(|(k, v, _)| k == &ids[0] && v.is_none());
        if let (Some(r), Some(t)) = (removal, tombstone) {
            ensure!(r < t, "the removal comes before the tombstone: {new:?}");
            break new[t].2;
        }
        ensure!(
            Instant::now() < deadline,
            "no removal of the opted-out member: {new:?}\n{}",
            processor.output()
        );
    };
    let latency = tombstone_at.saturating_duration_since(recorded);
    eprintln!(
        "opt-out recorded → removal and tombstone read: {} ms",
        latency.as_millis()
    );
    ensure!(latency <= Duration::from_secs(1), "the removal took {latency:?}");
    // nobody else was touched by it
    ensure!(
        reader.records[seen_before..].iter().all(|(k, _, _)| k == &ids[0]),
        "{:?}",
        &reader.records[seen_before..]
    );
    Ok(())
}
