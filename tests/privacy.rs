use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, counts_by, marsad_bin, parquet_strings, write_fixture_geoip};

fn post_event(client: &Client, m: &Marsad, event: &Value, ip: &str) -> Result<Value> {
    let resp = client
        .post(format!("{}/v1/events", m.ingest))
        .header("x-forwarded-for", ip)
        .json(event)
        .send()?;
    let status = resp.status();
    let body: Value = resp.json()?;
    ensure!(status.as_u16() == 202, "{status}: {body}");
    Ok(body)
}

fn audit(data: &std::path::Path) -> Result<(bool, String)> {
    let out = Command::new(marsad_bin())
        .args(["audit", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
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

/// Personal data in every form goes in; markers come out, and the audit finds nothing.
#[test]
fn pii_in_every_form_never_reaches_a_table() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let geoip = tmp.path().join("fixture.mmdb");
    write_fixture_geoip(&geoip)?;
    let data = tmp.path().join("data");
    let m = Marsad::start(&data, Some(&geoip))?;
    let client = Client::new();
    let pii_urls = [
        (
            "https://kulshi.example/ar/%D8%B3%D9%8A%D8%A7%D8%B1%D8%A7%D8%AA/%D9%A0%D9%A7%D9%A9%D9%A1%D9%A2%D9%A3%D9%A4%D9%A5%D9%A6%D9%A7",
            "/ar/سيارات/[phone]",
            "cars",
        ),
        (
            "https://kulshi.example/en/jobs/contact/Sara.Haddad%40Example.com",
            "/en/jobs/contact/[email]",
            "jobs",
        ),
        (
            "https://kulshi.example/en/cars/call-+962-79-123-4567?page=2&email=x%40y.com",
            "/en/cars/call-[phone]?page=2",
            "cars",
        ),
        (
            "https://kulshi.example/ar/عقارات/۰۵۰۱۲۳۴۵۶۷?utm_source=mail%2540leak.org",
            "/ar/عقارات/[phone]",
            "real_estate",
        ),
        (
            "https://kulshi.example/en/services/00201012345678/a.b%2540mail.com#me@x.com",
            "/en/services/[phone]/[email]",
            "services",
        ),
        (
            "https://kulshi.example/en/electronics/card/4111111111111111",
            "/en/electronics/card/[card]",
            "electronics",
        ),
    ];
    for (i, (url, _, _)) in pii_urls.iter().enumerate() {
        let event = json!({
            "type": "page_view", "url": url, "event_id": format!("pii-{i}"),
            "cookie_id": format!("ck-pii-{i}"), "identity": crate::common::identity_token(&format!("usr-pii-{i}"), Some("25-34"), Some("female")),
            "referrer": "https://mail.example.com/inbox?to=someone@example.com&phone=0791234567",
            "props": {"search_query": "اتصل ٠٧٩١٢٣٤٥٦٧ or mail me@example.com"},
            "consent": {"personalisation": true},
        });
        post_event(&client, &m, &event, "176.29.9.9")?;
    }
    m.wait_for_count(
        "SELECT count(*) FROM events",
        pii_urls.len() as i64,
        Duration::from_secs(60),
    )?;
    for (i, (_, path, category)) in pii_urls.iter().enumerate() {
        let rows = m.sql(&format!(
            "SELECT page_path, page_category, referrer_domain, utm_source FROM events WHERE event_id = 'pii-{i}'"
        ))?;
        let row = rows.first().context("row")?;
        assert_eq!(row["page_path"], *path, "{row}");
        assert_eq!(row["page_category"], *category, "{row}");
        assert_eq!(row["referrer_domain"], "mail.example.com");
    }
    let utm = m.sql("SELECT utm_source FROM events WHERE event_id = 'pii-3'")?;
    assert_eq!(utm[0]["utm_source"], "[email]");

    let (clean, report) = audit(&data)?;
    assert!(clean, "audit found personal data:\n{report}");
    assert!(report.contains(" 0 findings"), "{report}");
    let values = parquet_strings(&data.join("tables"))?;
    let leaks: Vec<_> = values
        .iter()
        .filter(|(_, _, v)| looks_like_email(v) || v.contains("ck-pii") || v.contains("usr-pii"))
        .collect();
    assert!(leaks.is_empty(), "personal data in table files: {leaks:?}");

    // the audit can fail: a file that leaks an e-mail and a raw cookie id is caught
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "note",
        arrow::datatypes::DataType::Utf8,
        false,
    )]));
    let batch = arrow::record_batch::RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(arrow::array::StringArray::from(vec![
            "write to leak@example.com",
            "ck-pii-0",
        ]))],
    )?;
    let leak = data.join("tables").join("events").join("leak.parquet");
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&leak)?, schema, None)?;
    writer.write(&batch)?;
    writer.close()?;
    let (clean, report) = audit(&data)?;
    assert!(!clean, "{report}");
    assert!(
        report.contains("email") && report.contains("identifier") && report.contains("leak.parquet"),
        "{report}"
    );
    Ok(())
}

/// Opt-outs are in force at once: no audience id after `personalisation`, nothing stored after `analytics`.
#[test]
fn opt_outs_take_effect_within_a_second() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let m = Marsad::start(&data, None)?;
    let client = Client::new();
    let event = |id: &str, cookie: &str| {
        json!({"type": "page_view", "url": "https://kulshi.example/en/cars", "event_id": id, "cookie_id": cookie,
               "consent": {"analytics": true, "personalisation": true}})
    };
    // before: an audience id
    post_event(&client, &m, &event("before", "c-perso"), "127.0.0.1")?;
    m.wait_for_count("SELECT count(*) FROM events", 1, Duration::from_secs(60))?;
    // an opt-out applies to the caller's own `_mid` cookie
    let opt_out = |own_cookie: &str, body: Value| {
        client
            .post(format!("{}/v1/opt-outs", m.ingest))
            .header("cookie", format!("_mid={own_cookie}"))
            .json(&body)
            .send()
    };
    let started = Instant::now();
    let resp = opt_out("c-perso", json!({"scope": "personalisation"}))?;
    assert_eq!(resp.status().as_u16(), 202);
    let resp = opt_out("c-gone", json!({"scope": "analytics"}))?;
    assert_eq!(resp.status().as_u16(), 202);
    post_event(&client, &m, &event("after", "c-perso"), "127.0.0.1")?;
    let answer = post_event(&client, &m, &event("dropped", "c-gone"), "127.0.0.1")?;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        answer,
        json!({"accepted": 0, "not_collected": 1}),
        "analytics opt-out: nothing stored"
    );

    m.wait_for_count("SELECT count(*) FROM events", 2, Duration::from_secs(60))?;
    let rows = counts_by(&m.sql("SELECT event_id AS k, count(audience_id) AS n FROM events GROUP BY event_id")?);
    assert_eq!(rows.get("before"), Some(&1), "audience id before the opt-out");
    assert_eq!(rows.get("after"), Some(&0), "none after");
    assert_eq!(rows.get("dropped"), None);

    // user ids need the admin key; bad scopes are refused
    let resp = opt_out("c-1", json!({"user_id": "u-1", "scope": "all"}))?;
    assert_eq!(resp.status().as_u16(), 401);
    let resp = client
        .post(format!("{}/v1/opt-outs", m.ingest))
        .bearer_auth(m.admin_key()?)
        .json(&json!({"user_id": "u-1", "scope": "all"}))
        .send()?;
    assert_eq!(resp.status().as_u16(), 202);
    let resp = opt_out("c-1", json!({"scope": "everything"}))?;
    assert_eq!(resp.status().as_u16(), 400);

    // an attacker posting someone else's cookie id opts out only their own cookie
    let resp = opt_out("c-attacker", json!({"cookie_id": "c-victim", "scope": "analytics"}))?;
    assert_eq!(resp.status().as_u16(), 202);
    let answer: Value = resp.json()?;
    assert_eq!(answer["ignored"], json!(["cookie_id"]), "{answer}");
    let victim = post_event(&client, &m, &event("victim-still-counted", "c-victim"), "127.0.0.1")?;
    assert_eq!(victim["accepted"], 1, "the victim's cookie is not opted out: {victim}");
    let attacker = post_event(&client, &m, &event("attacker-gone", "c-attacker"), "127.0.0.1")?;
    assert_eq!(attacker["not_collected"], 1, "the caller's own cookie is: {attacker}");
    // without a cookie of its own, a body cookie id records nothing
    let resp = client
        .post(format!("{}/v1/opt-outs", m.ingest))
        .json(&json!({"cookie_id": "c-victim", "scope": "all"}))
        .send()?;
    assert_eq!(resp.status().as_u16(), 400);
    let victim = post_event(&client, &m, &event("victim-again", "c-victim"), "127.0.0.1")?;
    assert_eq!(victim["accepted"], 1, "{victim}");

    // opt-outs survive a restart: they are read back from the opt-out log
    drop(m);
    let m = Marsad::start(&data, None)?;
    let answer = post_event(&client, &m, &event("dropped-again", "c-gone"), "127.0.0.1")?;
    assert_eq!(answer["not_collected"], 1);
    Ok(())
}

/// Erasure removes every row linkable to the subject, from every version, and nothing else.
#[test]
fn erasure_removes_the_subject_everywhere_and_nothing_else() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let m = Marsad::start(&data, None)?;
    let client = Client::new();
    let mut batch = Vec::new();
    for i in 0..30 {
        // the subject, with and without personalisation consent (visitor_key and audience_id paths)
        batch.push(
            json!({"type": "page_view", "url": "https://kulshi.example/en/cars", "event_id": format!("subject-{i}"),
            "cookie_id": "ck-subject", "consent": {"personalisation": i % 2 == 0}}),
        );
        batch.push(
            json!({"type": "page_view", "url": "https://kulshi.example/en/jobs", "event_id": format!("other-{i}"),
            "cookie_id": format!("ck-other-{}", i % 5), "consent": {"personalisation": true}}),
        );
    }
    // logged-in events of another subject by user id only
    for i in 0..5 {
        batch.push(json!({"type": "search", "event_id": format!("user-{i}"), "identity": crate::common::identity_token("usr-erase", None, None), "cookie_id": format!("ck-user-{i}"),
            "consent": {"personalisation": true}}));
    }
    // several commits, so older Delta versions hold the subject's rows too
    for chunk in batch.chunks(13) {
        let resp = client.post(format!("{}/v1/batch", m.ingest)).json(&chunk).send()?;
        assert_eq!(resp.status().as_u16(), 202);
        std::thread::sleep(Duration::from_millis(400));
    }
    m.wait_for_count("SELECT count(*) FROM events", 65, Duration::from_secs(60))?;

    let erase = |param: &str, id: &str| -> Result<Value> {
        let resp = client
            .delete(format!("{}/v1/subjects", m.query))
            .query(&[(param, id)])
            .bearer_auth(m.admin_key()?)
            .send()?;
        let status = resp.status();
        let body: Value = resp.json()?;
        ensure!(status.is_success(), "{status}: {body}");
        Ok(body)
    };
    let receipt = erase("cookie_id", "ck-subject")?;
    assert_eq!(receipt["rows_removed"], 30, "{receipt}");
    assert_eq!(receipt["tables"][0]["table"], "events");
    assert_eq!(receipt["opt_out_recorded"], true);
    assert!(
        receipt["tables"][0]["files_vacuumed"].as_u64().unwrap_or(0) > 0,
        "{receipt}"
    );
    assert_eq!(
        m.sql_count("SELECT count(*) FROM events WHERE event_id LIKE 'subject-%'")?,
        0
    );
    assert_eq!(
        m.sql_count("SELECT count(*) FROM events WHERE event_id LIKE 'other-%'")?,
        30,
        "others untouched"
    );

    let receipt = erase("user_id", "usr-erase")?;
    assert_eq!(receipt["rows_removed"], 5, "{receipt}");
    assert_eq!(m.sql_count("SELECT count(*) FROM events")?, 30);

    // no file on disk, of any version, still holds the subject's rows
    let leftovers = parquet_strings(&data.join("tables"))?
        .into_iter()
        .filter(|(_, _, v)| v.starts_with("subject-") || v.starts_with("user-"))
        .count();
    assert_eq!(leftovers, 0, "erased rows survive in older files");

    // and the subject is not collected again
    let resp = client
        .post(format!("{}/v1/events", m.ingest))
        .json(&json!({"type": "search", "cookie_id": "ck-subject"}))
        .send()?;
    let body: Value = resp.json()?;
    assert_eq!(body["not_collected"], 1, "{body}");

    // erasure is for admins only
    let resp = client.delete(format!("{}/v1/subjects?cookie_id=x", m.query)).send()?;
    assert_eq!(resp.status().as_u16(), 401);
    Ok(())
}

/// Erasures while `marsad up` keeps compacting `events` (every second, any date with two small
/// files) and other visitors' events keep arriving: a compaction and an erasure of the same
/// files must never both commit, and the loser's files must not stay in storage. Every
/// erasure finishes, no file on disk (committed or not) holds a subject's row, and every
/// other event is there exactly once.
#[test]
fn erasures_racing_the_events_compaction_leave_nothing_behind_and_double_nothing() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    const SUBJECTS: usize = 4;
    const ROUNDS: usize = 6;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let m = Marsad::start_with_env(
        &data,
        None,
        None,
        &[
            ("MARSAD_PROCESS__BATCH_MAX_INTERVAL_MS", "50".into()),
            ("MARSAD_PROCESS__ROLLUP_COMPACTION_INTERVAL_SECS", "1".into()),
            ("MARSAD_PROCESS__ROLLUP_COMMIT_INTERVAL_MS", "500".into()),
            ("MARSAD_PROCESS__EVENTS_COMPACTION_MIN_FILES", "2".into()),
        ],
    )?;
    let client = Client::new();
    let post = |client: &Client, batch: &[Value]| -> Result<()> {
        let resp = client
            .post(format!("{}/v1/batch", m.ingest))
            .json(batch)
            .send()
            .with_context(|| m.log_tail())?;
        ensure!(resp.status().as_u16() == 202, "{}", resp.status());
        Ok(())
    };
    let other = |id: String, i: usize| {
        json!({"type": "page_view", "url": "https://kulshi.example/en/jobs", "event_id": id,
            "cookie_id": format!("ck-other-{}", i % 7)})
    };
    // the subjects' events first, each round its own commit, beside others'
    let mut others = 0;
    for round in 0..ROUNDS {
        let mut batch: Vec<Value> = (0..SUBJECTS)
            .map(|s| {
                json!({"type": "page_view", "url": "https://kulshi.example/en/cars",
                    "event_id": format!("subject-{s}-{round}"), "cookie_id": format!("ck-subject-{s}")})
            })
            .collect();
        batch.extend((0..10).map(|i| other(format!("other-{round}-{i}"), i)));
        others += 10;
        post(&client, &batch)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    m.wait_for_count(
        "SELECT count(*) FROM events",
        (ROUNDS * (SUBJECTS + 10)) as i64,
        Duration::from_secs(60),
    )?;

    // others keep arriving, each batch a small file for the compaction, while the erasures run
    let stop = Arc::new(AtomicBool::new(false));
    let sender = std::thread::scope(|scope| -> Result<usize> {
        let stop_sending = Arc::clone(&stop);
        let live = scope.spawn(|| -> Result<usize> {
            let stop = stop_sending;
            let client = Client::new();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<Value> = (0..5).map(|i| other(format!("live-{}", sent + i), i)).collect();
                post(&client, &batch)?;
                sent += batch.len();
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(sent)
        });
        let erased: Result<()> = (|| {
            // the service answers within its erasure wait (30 s): the receipt, or 202 and where
            // to ask; an admin's tool follows the 202 as this does
            let admin = Client::builder().timeout(Duration::from_secs(60)).build()?;
            for s in 0..SUBJECTS {
                let resp = admin
                    .delete(format!("{}/v1/subjects", m.query))
                    .query(&[("cookie_id", format!("ck-subject-{s}"))])
                    .bearer_auth(m.admin_key()?)
                    .send()
                    .with_context(|| m.log_tail())?;
                let status = resp.status();
                let mut receipt: Value = resp.json()?;
                ensure!(status.is_success(), "{status}: {receipt}\n{}", m.log_tail());
                if status.as_u16() == 202 {
                    let url = format!("{}{}", m.query, receipt["status_url"].as_str().context("status_url")?);
                    let deadline = Instant::now() + Duration::from_secs(120);
                    receipt = loop {
                        let answer: Value = admin.get(&url).bearer_auth(m.admin_key()?).send()?.json()?;
                        match answer["status"].as_str() {
                            Some("done") => break answer["receipt"].clone(),
                            Some("waiting") if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(500))
                            }
                            _ => anyhow::bail!("subject {s}: {answer}\n{}", m.log_tail()),
                        }
                    };
                }
                eprintln!("subject {s}: erased in {} ms", receipt["duration_ms"]);
                ensure!(receipt["rows_removed"] == ROUNDS, "subject {s}: {receipt}");
                // the compaction runs between the erasures, over the files they rewrote
                std::thread::sleep(Duration::from_millis(1500));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        let sent = live.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
        erased.map(|()| sent)
    })?;
    let total = (others + sender) as i64;
    m.wait_for_count("SELECT count(*) FROM events", total, Duration::from_secs(60))
        .with_context(|| m.log_tail())?;
    ensure!(
        m.sql_count("SELECT count(DISTINCT event_id) FROM events")? == total,
        "an event twice"
    );
    ensure!(m.sql_count("SELECT count(*) FROM events WHERE event_id LIKE 'subject-%'")? == 0);
    // the compaction did run beside the erasures
    let log = std::fs::read_to_string(&m.log_path)?;
    let compactions = log.matches("events files compacted").count();
    let lost = log.matches("compaction failed; removed the files it wrote").count()
        + log.matches("the table changed under the delete").count();
    // (the races themselves are forced in `process`'s unit tests: here the erasure's notice
    // holds the compaction off while it runs, so a lost conflict is rare)
    eprintln!("{compactions} events compactions, {lost} rewrites that lost a conflict, {total} events");
    ensure!(compactions > 0, "no events compaction ran:\n{}", m.log_tail());
    // no file in storage, of any version or none, holds a subject's row
    let leftovers: Vec<_> = parquet_strings(&data.join("tables"))?
        .into_iter()
        .filter(|(_, _, v)| v.starts_with("subject-"))
        .collect();
    ensure!(leftovers.is_empty(), "erased rows left in storage: {leftovers:?}");
    Ok(())
}

/// An `@` between a local part and a dotted domain, the shape every e-mail the test sends has.
fn looks_like_email(value: &str) -> bool {
    let chars: Vec<char> = value.chars().collect();
    chars.iter().enumerate().any(|(i, c)| {
        *c == '@'
            && i > 0
            && chars[i - 1].is_alphanumeric()
            && chars.get(i + 1).is_some_and(|c| c.is_alphanumeric())
            && chars[i + 1..]
                .iter()
                .take_while(|c| !c.is_whitespace())
                .any(|c| *c == '.')
    })
}
