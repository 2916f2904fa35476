//! Promises that must hold with time, on a quiet site, and across an operator's key
//! rotation: raw records deleted within retention and its slack though no event arrives,
//! expired daily keys destroyed by an idle processor, opt-outs in force after the targeting
//! key is rotated (and a stage with the wrong key refused), a user id's erasure taking the
//! cookie it was sent with.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
use marsad_schemas::{TOPIC_DEAD, TOPIC_RAW};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, collect_files, fixture_envelope, marsad_bin};

/// Records left in the local log's segments of `topic`.
fn records_in(data: &Path, topic: &str) -> Result<u64> {
    let mut segments = Vec::new();
    let dir = data.join("log").join(topic);
    if dir.is_dir() {
        collect_files(&dir, "log", &mut segments)?;
    }
    let mut records = 0;
    for seg in segments {
        records += marsad_eventlog::scan_segment(&seg, |_| {})?.records;
    }
    Ok(records)
}

/// Appends `payload` to `topic` of the local log in `data` (Marsad not running).
fn append_to_log(data: &Path, topic: &str, payload: Vec<u8>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let log = LocalLog::open(data.join("log"), LocalLogOptions::default())?;
        log.append(topic, vec![Record { key: None, payload }]).await?;
        anyhow::Ok(())
    })
}

fn audit(data: &Path, env: &[(&str, String)]) -> Result<(bool, String)> {
    let out = Command::new(marsad_bin())
        .args(["audit", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn post_batch(client: &Client, m: &Marsad, events: &[Value]) -> Result<()> {
    let resp = client.post(format!("{}/v1/batch", m.ingest)).json(&events).send()?;
    ensure!(resp.status().as_u16() == 202, "{}", resp.text()?);
    Ok(())
}

/// Retention of 4 s: a segment closes when its first record is 1 s old, retention runs every
/// 250 ms, so every record is gone 4 + 1 + 0.25 s after it arrived at the latest — with no
/// further event to trigger anything, dead letters included. The audit holds the oldest
/// record against that promise: it passes while the log keeps it, and fails on a record kept
/// past it (Marsad stopped, so nothing deletes).
#[test]
fn a_quiet_site_keeps_no_raw_record_past_retention() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let retention_s = 4.0;
    let promise = Duration::from_secs_f64(retention_s * 1.25 + 0.25);
    let env = [("MARSAD_EVENTLOG__RETENTION_HOURS", format!("{}", retention_s / 3600.0))];
    // a dead letter from before this start: the full raw payload of a refused event
    let letter = json!({"partition": 0, "offset": 0, "reason": "a refused event",
        "payload": "{\"client_ip\":\"198.51.100.7\"}", "at": chrono::Utc::now()});
    append_to_log(&data, TOPIC_DEAD, serde_json::to_vec(&letter)?)?;
    let m = Marsad::start_with_env(&data, None, None, &env)?;
    let client = Client::new();
    let events: Vec<Value> = (0..20)
        .map(|i| json!({"type": "page_view", "url": "https://kulshi.example/en/cars", "event_id": format!("q-{i}"), "cookie_id": "ck-quiet"}))
        .collect();
    post_batch(&client, &m, &events)?;
    let last_event = Instant::now();
    m.wait_for_count("SELECT count(*) FROM events", 20, Duration::from_secs(60))?;
    let (ok, out) = audit(&data, &env)?;
    ensure!(ok, "the audit fails on records within their retention:\n{out}");
    ensure!(out.contains("marsad.events.raw") && out.contains("20 records"), "{out}");

    // the site goes quiet: nothing arrives, and everything goes within the promise
    let deadline = last_event + promise + Duration::from_secs(2);
    loop {
        let left = (records_in(&data, TOPIC_RAW)?, records_in(&data, TOPIC_DEAD)?);
        if left == (0, 0) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{left:?} raw and dead-letter records {:?} after the last event (promise {promise:?}):\n{}",
            last_event.elapsed(),
            m.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, out) = audit(&data, &env)?;
    ensure!(ok && out.contains("empty"), "{out}");
    drop(m);

    // nothing deletes while Marsad is stopped: a record older than the promise fails the audit
    let old = fixture_envelope(
        json!({"type": "page_view", "event_id": "old", "cookie_id": "ck-old"}),
        chrono::Utc::now() - chrono::Duration::hours(1),
    );
    append_to_log(&data, TOPIC_RAW, old.to_bytes())?;
    let (ok, out) = audit(&data, &env)?;
    ensure!(!ok && out.contains("KEPT PAST THE PROMISE"), "{out}");
    Ok(())
}

fn files_holding(dir: &Path, needle: &[u8]) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)?.windows(needle.len()).any(|w| w == needle) {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// A day's key whose grace ends while the site is idle is destroyed on the processor's timer,
/// not at the next event: with the destruction interval at 300 ms, an expired key appearing
/// on disk is gone within a second, and no file of the data dir holds it afterwards.
#[test]
fn an_idle_processor_destroys_an_expired_daily_key() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let m = Marsad::start_with_env(
        &data,
        None,
        None,
        &[("MARSAD_PRIVACY__KEY_DESTRUCTION_INTERVAL_MS", "300".into())],
    )?;
    // started, idle; then a day's key is past its grace (written as the store writes it)
    let day = chrono::Utc::now().date_naive() - chrono::Duration::days(3);
    let secret = format!("{:064x}", rand::random::<u128>());
    let path = data.join("keys").join("daily").join(format!("{day}.key"));
    std::fs::create_dir_all(path.parent().context("keys dir")?)?;
    std::fs::write(&path, &secret)?;
    let written = Instant::now();
    while path.exists() {
        if written.elapsed() > Duration::from_secs(5) {
            bail!("the expired key survived an idle processor:\n{}", m.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let holders = files_holding(&data, secret.as_bytes())?;
    ensure!(holders.is_empty(), "the destroyed key is still in {holders:?}");
    ensure!(
        m.log_tail().contains("destroyed daily visitor keys"),
        "{}",
        m.log_tail()
    );
    Ok(())
}

fn audience_of(client: &Client, m: &Marsad, cookie: &str) -> Result<Value> {
    let resp = client
        .get(format!("{}/v1/audience", m.query))
        .query(&[("cookie_id", cookie)])
        .bearer_auth(m.admin_key()?)
        .send()?;
    ensure!(resp.status().is_success(), "{}", resp.status());
    Ok(resp.json()?)
}

/// The targeting key is rotated as the README says: a stage started with the new key is
/// refused until the rotation is adopted (`marsad keys adopt-targeting`); afterwards every
/// earlier opt-out is still in force — the processor gives the subject no `audience_id` under
/// the new key, and the audience API answers nothing for it.
#[test]
fn opt_outs_outlive_a_rotation_of_the_targeting_key() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let key = |k: &str| vec![("MARSAD_SECRET_TARGETING_KEY", k.repeat(32))];
    let client = Client::new();
    let events = |prefix: &str| -> Vec<Value> {
        (0..10)
            .map(|i| {
                json!({"type": "page_view", "url": "https://kulshi.example/en/cars", "event_id": format!("{prefix}-{i}"),
                    "cookie_id": if i % 2 == 0 { "ck-opted" } else { "ck-other" }, "consent": {"personalisation": true}})
            })
            .collect()
    };
    {
        let m = Marsad::start_with_env(&data, None, None, &key("11"))?;
        post_batch(&client, &m, &events("before"))?;
        m.wait_for_count("SELECT count(*) FROM events", 10, Duration::from_secs(60))?;
        let resp = client
            .post(format!("{}/v1/opt-outs", m.ingest))
            .header("cookie", "_mid=ck-opted")
            .json(&json!({"scope": "personalisation"}))
            .send()?;
        ensure!(resp.status().as_u16() == 202, "{}", resp.text()?);
        ensure!(audience_of(&client, &m, "ck-opted")?["segments"] == json!([]));
    }
    // another key, not adopted: refused, saying what to do
    match Marsad::start_with_env(&data, None, None, &key("22")) {
        Ok(_) => bail!("a stage with another targeting key started"),
        Err(e) => {
            let why = format!("{e:#}");
            ensure!(why.contains("fingerprint") && why.contains("adopt-targeting"), "{why}");
        }
    }
    let out = Command::new(marsad_bin())
        .args(["keys", "adopt-targeting", "--data-dir"])
        .arg(&data)
        .envs(key("22"))
        .output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = Marsad::start_with_env(&data, None, None, &key("22"))?;
    post_batch(&client, &m, &events("after"))?;
    m.wait_for_count("SELECT count(*) FROM events", 20, Duration::from_secs(60))?;
    let with_id = |prefix: &str, cookie_even: bool| -> Result<i64> {
        let parity = if cookie_even { 0 } else { 1 };
        m.sql_count(&format!(
            "SELECT count(*) FROM events WHERE event_id LIKE '{prefix}-%' AND audience_id IS NOT NULL \
             AND CAST(substr(event_id, {}) AS INT) % 2 = {parity}",
            prefix.len() + 2
        ))
    };
    ensure!(
        with_id("after", true)? == 0,
        "the opted-out cookie got an audience_id under the new key"
    );
    ensure!(with_id("after", false)? == 5, "others keep theirs");
    ensure!(audience_of(&client, &m, "ck-opted")?["segments"] == json!([]));
    Ok(())
}

/// A user id's erasure also erases the cookie the site sent with it: that cookie's rows from
/// before the visitor logged in, which carry no user id, go too.
#[test]
fn a_user_id_erasure_takes_the_cookie_it_was_sent_with() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let m = Marsad::start(&data, None)?;
    let client = Client::new();
    let mut events = Vec::new();
    for i in 0..6 {
        events.push(
            json!({"type": "page_view", "url": "https://kulshi.example/en/cars", "event_id": format!("anon-{i}"),
            "cookie_id": "ck-linked", "consent": {"personalisation": true}}),
        );
    }
    for i in 0..3 {
        events.push(
            json!({"type": "page_view", "url": "https://kulshi.example/en/cars", "event_id": format!("login-{i}"),
            "cookie_id": "ck-linked", "identity": crate::common::identity_token("u-erase", None, None),
            "consent": {"personalisation": true}}),
        );
    }
    for i in 0..5 {
        events.push(
            json!({"type": "page_view", "url": "https://kulshi.example/en/cars", "event_id": format!("other-{i}"),
            "cookie_id": "ck-unrelated", "consent": {"personalisation": true}}),
        );
    }
    post_batch(&client, &m, &events)?;
    m.wait_for_count("SELECT count(*) FROM events", 14, Duration::from_secs(60))?;
    let resp = client
        .delete(format!("{}/v1/subjects", m.query))
        .query(&[("user_id", "u-erase")])
        .bearer_auth(m.admin_key()?)
        .send()?;
    let status = resp.status();
    let receipt: Value = resp.json()?;
    ensure!(status.as_u16() == 200, "{status}: {receipt}");
    ensure!(
        receipt["linked_cookies"] == 1 && receipt["rows_removed"] == 9,
        "{receipt}"
    );
    ensure!(m.sql_count("SELECT count(*) FROM events WHERE event_id NOT LIKE 'other-%'")? == 0);
    ensure!(m.sql_count("SELECT count(*) FROM events")? == 5, "others untouched");
    // and the cookie is not collected again
    let resp = client
        .post(format!("{}/v1/events", m.ingest))
        .json(&json!({"type": "search", "cookie_id": "ck-linked"}))
        .send()?;
    let body: Value = resp.json()?;
    ensure!(body["not_collected"] == 1, "{body}");
    Ok(())
}

/// A user id's opt-out covers the cookie the site sends with it: once an event carries both,
/// the cookie's own visits (not logged in) get no `audience_id` either.
#[test]
fn a_user_id_opt_out_covers_the_cookie_sent_with_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let m = Marsad::start(&data, None)?;
    let client = Client::new();
    let resp = client
        .post(format!("{}/v1/opt-outs", m.ingest))
        .bearer_auth(m.admin_key()?)
        .json(&json!({"user_id": "u-out", "scope": "personalisation"}))
        .send()?;
    ensure!(resp.status().as_u16() == 202, "{}", resp.text()?);
    let event = |id: &str, user: Option<&str>| {
        json!({"type": "page_view", "url": "https://kulshi.example/en/cars", "event_id": id,
            "cookie_id": "ck-of-u-out", "identity": user.map(|u| crate::common::identity_token(u, None, None)),
            "consent": {"personalisation": true}})
    };
    post_batch(&client, &m, &[event("logged-in", Some("u-out"))])?;
    m.wait_for_count("SELECT count(*) FROM events", 1, Duration::from_secs(60))?;
    post_batch(&client, &m, &[event("cookie-only", None)])?;
    m.wait_for_count("SELECT count(*) FROM events", 2, Duration::from_secs(60))?;
    ensure!(
        m.sql_count("SELECT count(*) FROM events WHERE audience_id IS NOT NULL")? == 0,
        "the cookie sent with an opted-out user id was targeted on its own"
    );
    ensure!(audience_of(&client, &m, "ck-of-u-out")?["segments"] == json!([]));
    Ok(())
}

/// Starts once with `first` as the key in `env`, then with `second`, which must be refused.
fn another_key_refused(env: &'static str, describe: &str, first: &str, second: &str) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let key = |k: &str| vec![(env, k.repeat(32))];
    drop(Marsad::start_with_env(&data, None, None, &key(first))?);
    match Marsad::start_with_env(&data, None, None, &key(second)) {
        Ok(_) => bail!("a process with another {describe} started"),
        Err(e) => {
            let why = format!("{e:#}");
            ensure!(why.contains(describe) && why.contains("fingerprint"), "{why}");
        }
    }
    Ok(())
}

/// Query processes must draw the same noise for a cell, or asking two of them would average it
/// away: one started with another noise key than the one recorded refuses to start.
#[test]
fn a_query_process_with_another_noise_key_refuses_to_start() -> Result<()> {
    another_key_refused("MARSAD_SECRET_NOISE_KEY", "noise key", "33", "44")
}

/// An ingest process with another identity key than the site signs with would count every
/// signed-in visitor as anonymous, silently: it refuses to start.
#[test]
fn an_ingest_process_with_another_identity_key_refuses_to_start() -> Result<()> {
    another_key_refused("MARSAD_SECRET_IDENTITY_KEY", "identity key", "55", "66")
}
