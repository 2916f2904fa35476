//! The Postgres wire protocol of the query service, driven by the real `psql`
//! (and a prepared statement from a Rust client, as BI tools send them):
//! user = key name, password = API key, the same role rules as `/v1/sql`,
//! read-only, TLS when configured.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use reqwest::blocking::Client;
use serde_json::json;

use crate::common::{FIXTURE_COUNTRIES, Marsad, key_entry, write_fixture_geoip};

const ANALYST_KEY: &str = "pg-analyst-key-0123456789abcdef";
const ENGINEER_KEY: &str = "pg-engineer-key-0123456789abcdef";
const ADSERVER_KEY: &str = "pg-adserver-key-0123456789abcdef";

/// What one `psql` run printed, and whether it succeeded.
struct Psql {
    ok: bool,
    out: String,
    err: String,
}

fn psql(m: &Marsad, user: &str, password: &str, ssl: &str, command: &str) -> Result<Psql> {
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user={user} dbname=marsad sslmode={ssl} connect_timeout=10",
            m.pg_port
        ))
        .args(["-X", "-A", "-F", ",", "-v", "ON_ERROR_STOP=1", "-c", command])
        .env("PGPASSWORD", password)
        .env("PGAPPNAME", "marsad-test")
        .output()
        .context("running psql (Debian package postgresql-client)")?;
    Ok(Psql {
        ok: out.status.success(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `n` visitors of `country`, each with two page views and an ad impression.
pub(crate) fn send_visitors(m: &Marsad, country: &str, n: usize) -> Result<usize> {
    let prefix = FIXTURE_COUNTRIES
        .iter()
        .find(|c| c.0 == country)
        .map(|c| c.1)
        .context("fixture country")?;
    let client = Client::new();
    let mut sent = 0;
    for v in 0..n {
        let cookie = format!("c-pg-{country}-{v}");
        let events = json!([
            {"type": "page_view", "url": "https://kulshi.example/ar/سيارات/كيا", "cookie_id": cookie, "event_id": format!("{cookie}-1")},
            {"type": "page_view", "url": "https://kulshi.example/en/jobs", "cookie_id": cookie, "event_id": format!("{cookie}-2")},
            {"type": "ad_impression", "url": "https://kulshi.example/en/jobs", "cookie_id": cookie, "event_id": format!("{cookie}-3"),
             "ad": {"ad_id": "ad-1", "campaign_id": "cmp-1", "placement": "top"}},
        ]);
        let resp = client
            .post(format!("{}/v1/batch", m.ingest))
            .header("x-forwarded-for", format!("{}.{}.{}.9", prefix[0], prefix[1], v % 250))
            .json(&events)
            .send()?;
        ensure!(resp.status().as_u16() == 202, "{}", resp.status());
        sent += 3;
    }
    Ok(sent)
}

#[test]
fn psql_lists_tables_groups_and_is_refused_what_it_may_not_do() -> Result<()> {
    if !crate::common::tools_for(
        "psql_lists_tables_groups_and_is_refused_what_it_may_not_do",
        &[crate::common::Tool::Psql],
    )? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let geoip = tmp.path().join("geo.mmdb");
    write_fixture_geoip(&geoip)?;
    // a certificate from a test authority: the Postgres port speaks TLS, and takes keys only over it
    let tls = crate::common::TestCertificate::write(tmp.path())?;
    let (cert, key) = (tls.cert.clone(), tls.key.clone());
    let config = tmp.path().join("marsad.toml");
    std::fs::write(
        &config,
        format!(
            "[query]\npg_tls_cert = \"{}\"\npg_tls_key = \"{}\"\n\n{}{}{}",
            cert.display(),
            key.display(),
            key_entry("marketing", "analyst", ANALYST_KEY),
            key_entry("data-eng", "engineer", ENGINEER_KEY),
            key_entry("ads", "adserver", ADSERVER_KEY),
        ),
    )?;
    let m = Marsad::start_with_config(&tmp.path().join("data"), Some(&geoip), Some(&config))?;
    let mut sent = send_visitors(&m, "JO", 30)?;
    sent += send_visitors(&m, "SA", 20)?;
    sent += send_visitors(&m, "EG", 1)?; // a lone visitor: analysts must not see that cell
    m.wait_for_count(
        "SELECT sum(events) FROM traffic_hourly",
        sent as i64,
        Duration::from_secs(60),
    )?;

    // engineers: every table is listed, a GROUP BY over raw events, over TLS
    let tables = psql(&m, "data-eng", ENGINEER_KEY, "require", "\\dt")?;
    ensure!(tables.ok, "\\dt: {}", tables.err);
    for t in [
        "events",
        "traffic_hourly",
        "ad_performance_hourly",
        "demographics_daily",
    ] {
        ensure!(tables.out.contains(&format!(",{t},")), "{t} listed: {}", tables.out);
    }
    // one table's columns: `\d` looks the table's oid up, then its columns by that oid
    let columns = psql(&m, "data-eng", ENGINEER_KEY, "require", "\\d events")?;
    ensure!(columns.ok, "\\d events: {}", columns.err);
    for c in [
        "event_id,",
        "visitor_key,",
        "page_category,",
        "ts,timestamp with time zone",
    ] {
        ensure!(columns.out.contains(c), "{c} in {}", columns.out);
    }
    let sizes = psql(&m, "data-eng", ENGINEER_KEY, "require", "\\dt+")?;
    ensure!(sizes.ok, "\\dt+: {}", sizes.err);
    let grouped = psql(
        &m,
        "data-eng",
        ENGINEER_KEY,
        "require",
        "SELECT country, count(*) AS events, count(DISTINCT visitor_key) AS visitors FROM events GROUP BY country ORDER BY country",
    )?;
    ensure!(grouped.ok, "{}", grouped.err);
    let lines: Vec<&str> = grouped.out.lines().collect();
    ensure!(
        lines.starts_with(&["country,events,visitors", "EG,3,1", "JO,90,30", "SA,60,20"]),
        "{}",
        grouped.out
    );
    ensure!(lines.contains(&"(3 rows)"), "{}", grouped.out);

    // analysts: only the rollups exist for them, and their numbers come with noise
    let tables = psql(&m, "marketing", ANALYST_KEY, "require", "\\dt")?;
    ensure!(tables.ok, "{}", tables.err);
    ensure!(
        tables.out.contains(",traffic_hourly,") && !tables.out.contains(",events,"),
        "{}",
        tables.out
    );
    let by_country = psql(
        &m,
        "marketing",
        ANALYST_KEY,
        "require",
        "SELECT country, sum(events) AS events, round(hll_estimate(hll_merge(visitors))) AS visitors \
         FROM traffic_hourly GROUP BY country ORDER BY country",
    )?;
    ensure!(by_country.ok, "{}", by_country.err);
    ensure!(
        by_country.out.starts_with("country,events,visitors"),
        "{}",
        by_country.out
    );
    ensure!(
        by_country.err.contains("released with noise") && by_country.err.contains("95% intervals"),
        "the client is told how exact the numbers are: {}",
        by_country.err
    );
    let refused = psql(
        &m,
        "marketing",
        ANALYST_KEY,
        "require",
        "SELECT country, hll_merge(visitors) FROM traffic_hourly GROUP BY country",
    )?;
    ensure!(
        !refused.ok && refused.err.contains("no sketches"),
        "a sketch never leaves, over Postgres either: {}",
        refused.err
    );
    let raw = psql(&m, "marketing", ANALYST_KEY, "require", "SELECT * FROM events")?;
    ensure!(
        !raw.ok && raw.err.contains("events"),
        "raw events refused to analysts: {}",
        raw.err
    );

    // read-only for everyone: DDL and DML are refused with the reason
    for statement in [
        "CREATE TABLE notes (body TEXT)",
        "DROP TABLE events",
        "INSERT INTO events (event_id) VALUES ('x')",
    ] {
        let refused = psql(&m, "data-eng", ENGINEER_KEY, "require", statement)?;
        ensure!(
            !refused.ok && refused.err.contains("read-only"),
            "{statement}: {}",
            refused.err
        );
    }
    ensure!(
        psql(&m, "data-eng", ENGINEER_KEY, "require", "SELECT count(*) FROM events")?
            .out
            .contains(&sent.to_string()),
        "nothing changed"
    );
    // a statement that sends sqlparser backtracking for minutes (found by fuzzing) is refused
    // (also behind a statement only the Postgres parser knows, and padded with a comment)
    let runaway = crate::common::runaway_sql()?;
    for statement in [
        runaway.clone(),
        format!("ABORT; {runaway}"),
        format!("/* {} */ {runaway}", "x".repeat(100_000)),
    ] {
        let refused = psql(&m, "data-eng", ENGINEER_KEY, "require", &statement)?;
        ensure!(!refused.ok && refused.err.contains("too complex"), "{}", refused.err);
    }

    // no key over a plain connection: refused before a password is asked
    let plain = psql(&m, "data-eng", ENGINEER_KEY, "disable", "SELECT 1")?;
    ensure!(!plain.ok && plain.err.contains("sslmode=require"), "{}", plain.err);

    // wrong password, a key under another name, a key without a SQL role
    for (user, password, why) in [
        ("data-eng", "not-the-key", "authentication failed"),
        ("marketing", ENGINEER_KEY, "authentication failed"),
        ("ads", ADSERVER_KEY, "neither the engineer nor the analyst role"),
    ] {
        let refused = psql(&m, user, password, "require", "SELECT 1")?;
        ensure!(!refused.ok && refused.err.contains(why), "{user}: {}", refused.err);
    }

    // a prepared statement with a parameter (the extended protocol BI tools use)
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let counted: i64 = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=data-eng password={ENGINEER_KEY} dbname=marsad sslmode=require",
                m.pg_port
            ),
            tls.postgres_tls()?,
        )
        .await?;
        let conn = tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT count(*) AS n FROM events WHERE country = $1 AND event_type = $2",
                &[&"JO", &"page_view"],
            )
            .await?;
        drop(client);
        let _ = conn.await;
        anyhow::Ok(row.try_get::<_, i64>(0)?)
    })?;
    ensure!(counted == 60, "30 Jordanian visitors viewed two pages each: {counted}");
    Ok(())
}
