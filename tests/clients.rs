//! The Postgres clients BI tools and notebooks are built on, from PyPI, against `marsad up`
//! over TLS: SQLAlchemy 2 (psycopg2 and psycopg 3), pandas, asyncpg, and Apache Superset's
//! own connection and dataset code. Each connects, reflects a table and queries as that tool
//! does; the test compares what each saw with what it sent.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::common::{Marsad, Tool, free_port, key_entry, superset_python, tools_for, write_fixture_geoip};
use crate::pg::send_visitors;

const ANALYST_KEY: &str = "clients-analyst-key-0123456789abcdef";
const ENGINEER_KEY: &str = "clients-engineer-key-0123456789abcdef";

/// `marsad up` with an engineer and an analyst key and TLS on the Postgres port, holding
/// visitors from three countries: 30 from JO, 20 from SA and one from EG, each with two page
/// views and an ad impression.
fn marsad_with_visitors(dir: &std::path::Path) -> Result<Marsad> {
    marsad_with_visitors_and(dir, &[])
}

/// [`marsad_with_visitors`], with extra environment variables for `marsad up`.
fn marsad_with_visitors_and(dir: &std::path::Path, env: &[(&str, String)]) -> Result<Marsad> {
    let geoip = dir.join("geo.mmdb");
    write_fixture_geoip(&geoip)?;
    let tls = crate::common::TestCertificate::write(dir)?;
    // for clients that are told which authority to trust
    std::fs::write(dir.join("ca.pem"), &tls.ca_pem)?;
    let config = dir.join("marsad.toml");
    // 51 visitors are few for the default noise (scale 40/2 = 20 against a threshold of 20: a
    // one-in-ten chance that an ungrouped total is held back, with a fresh noise key each run);
    // these tests are about the clients, so the noise is made small (scale 1)
    std::fs::write(
        &config,
        format!(
            "[release]\nepsilon_per_measure = 40.0\n\n[query]\npg_tls_cert = \"{}\"\npg_tls_key = \"{}\"\n\n{}{}",
            tls.cert.display(),
            tls.key.display(),
            key_entry("marketing", "analyst", ANALYST_KEY),
            key_entry("data-eng", "engineer", ENGINEER_KEY),
        ),
    )?;
    let m = Marsad::start_with_env(&dir.join("data"), Some(&geoip), Some(&config), env)?;
    let mut sent = send_visitors(&m, "JO", 30)?;
    sent += send_visitors(&m, "SA", 20)?;
    sent += send_visitors(&m, "EG", 1)?;
    m.wait_for_count("SELECT count(*) FROM events", sent as i64, Duration::from_secs(60))?;
    m.wait_for_count(
        "SELECT sum(events) FROM traffic_hourly",
        sent as i64,
        Duration::from_secs(60),
    )?;
    Ok(m)
}

/// Page views per country, as sent.
fn page_views_sent() -> BTreeMap<String, i64> {
    BTreeMap::from([("EG".into(), 2), ("JO".into(), 60), ("SA".into(), 40)])
}

/// Runs `python` on a script of `tests/data` and parses the one JSON object it prints.
fn run_json(python: &str, script: &str, args: &[&str], env: &[(&str, String)]) -> Result<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(script);
    let out = Command::new(python)
        .arg(&path)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .with_context(|| format!("running {python} {script}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{script} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("{script} printed {stdout}"))
}

/// `section` of the output, failing with the client's own error when it had one.
fn client<'a>(out: &'a Value, section: &str) -> Result<&'a Value> {
    let v = out.get(section).with_context(|| format!("{section} missing: {out}"))?;
    if let Some(e) = v.get("error") {
        bail!("{e}\n{}", v["trace"].as_str().unwrap_or_default());
    }
    Ok(v)
}

fn counts(v: &Value) -> BTreeMap<String, i64> {
    v.as_object()
        .map(|o| o.iter().filter_map(|(k, n)| Some((k.clone(), n.as_i64()?))).collect())
        .unwrap_or_default()
}

/// The names of `events`' columns, as `/v1/sql` gives them.
fn events_columns(m: &Marsad) -> Result<Vec<String>> {
    let body: Value = reqwest::blocking::Client::new()
        .post(format!("{}/v1/sql", m.query))
        .bearer_auth(m.admin_key()?)
        .json(&serde_json::json!({ "sql": "SELECT * FROM events LIMIT 0" }))
        .send()?
        .error_for_status()?
        .json()?;
    Ok(body["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect())
}

#[test]
fn sqlalchemy_pandas_and_asyncpg_connect_reflect_and_query() -> Result<()> {
    if !tools_for(
        "sqlalchemy_pandas_and_asyncpg_connect_reflect_and_query",
        &[Tool::Psql, Tool::PythonClients],
    )? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let m = marsad_with_visitors(tmp.path())?;
    let port = m.pg_port.to_string();
    let out = run_json(
        "python3",
        "pg_clients.py",
        &[&port, "data-eng", ENGINEER_KEY, "marketing", ANALYST_KEY],
        &[],
    )?;
    eprintln!("client versions: {}", out["versions"]);
    let columns = events_columns(&m)?;
    ensure!(columns.len() > 20, "{columns:?}");
    let page_views = page_views_sent();
    let total: i64 = page_views.values().sum();

    for driver in ["psycopg2", "psycopg"] {
        let c = client(&out, &format!("sqlalchemy_{driver}"))?;
        // SQLAlchemy reads the version from `version()` on connect and refuses any other shape
        ensure!(c["server_version_info"] == serde_json::json!([16, 6]), "{driver}: {c}");
        ensure!(c["page_views_since"] == total, "{driver}: {}", c["page_views_since"]);
        ensure!(
            counts(&c["pandas_page_views_by_country"]) == page_views,
            "{driver}: pandas.read_sql {}",
            c["pandas_page_views_by_country"]
        );
        // a correlated subquery in a column is answered, not blanked (the compatibility
        // parser's catalog rewrite once turned it into NULL)
        let events_by_country: BTreeMap<String, i64> = page_views.iter().map(|(k, n)| (k.clone(), n / 2 * 3)).collect();
        ensure!(
            counts(&c["correlated"]) == events_by_country,
            "{driver}: correlated subquery {}",
            c["correlated"]
        );
        let tables: Vec<&str> = c["tables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for t in [
            "events",
            "traffic_hourly",
            "ad_performance_hourly",
            "demographics_daily",
        ] {
            ensure!(tables.contains(&t), "{driver}: {t} in {tables:?}");
        }
        ensure!(
            c["schemas"] == serde_json::json!(["public"]),
            "{driver}: {}",
            c["schemas"]
        );
        ensure!(c["has_events"] == true, "{driver}");
        let reflected: Vec<&str> = c["events_columns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|col| col[0].as_str())
            .collect();
        ensure!(reflected == columns, "{driver}: {reflected:?} != {columns:?}");
        let ts = c["events_columns"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|col| col[0] == "ts")
            .context("ts")?;
        ensure!(
            ts[1] == "TIMESTAMP(timezone=True)" && ts[2] == false,
            "{driver}: ts reflected as {ts}"
        );
        // Marsad's tables have no keys, indexes, constraints or comments, and say so
        for empty in [
            "primary_key",
            "foreign_keys",
            "indexes",
            "unique_constraints",
            "check_constraints",
            "views",
        ] {
            ensure!(
                c[empty].as_array().is_some_and(Vec::is_empty),
                "{driver}: {empty} {}",
                c[empty]
            );
        }
        ensure!(c["table_comment"].is_null(), "{driver}");

        let a = client(&out, &format!("sqlalchemy_{driver}_analyst"))?;
        ensure!(
            a["tables"]
                == serde_json::json!([
                    "ad_performance_hourly",
                    "demographics_daily",
                    "funnels_hourly",
                    "goals_hourly",
                    "pages_hourly",
                    "sources_hourly",
                    "traffic_hourly"
                ]),
            "{driver}: an analyst sees the rollups only: {}",
            a["tables"]
        );
        ensure!(
            a["count_refused"] == "42501",
            "{driver}: count(*) is not released to analysts: {}",
            a["count_refused"]
        );
        // a released number, with a datetime bound as a timestamp parameter (psycopg 3)
        ensure!(
            a["released_page_views"].is_i64(),
            "{driver}: {}",
            a["released_page_views"]
        );
    }

    let a = client(&out, "asyncpg")?;
    ensure!(
        a["parameter_types"] == serde_json::json!(["text", "timestamptz"]),
        "{}",
        a["parameter_types"]
    );
    ensure!(
        a["column_types"]
            == serde_json::json!({"country": "text", "page_views": "int8", "visitors": "int8",
                "first_seen": "timestamptz", "last_day": "date", "any_bot": "bool", "half": "float8"}),
        "{}",
        a["column_types"]
    );
    let rows = a["rows"].as_array().context("rows")?;
    let by_country: BTreeMap<String, i64> = rows
        .iter()
        .filter_map(|r| Some((r["country"][1].as_str()?.to_owned(), r["page_views"][1].as_i64()?)))
        .collect();
    ensure!(by_country == page_views, "asyncpg: {by_country:?}");
    let today = m.sql("SELECT CAST(max(date) AS VARCHAR) AS d FROM events")?;
    let bots: BTreeMap<String, bool> = m
        .sql("SELECT country, bool_or(is_bot) AS b FROM events WHERE event_type = 'page_view' GROUP BY country")?
        .iter()
        .filter_map(|r| Some((r["country"].as_str()?.to_owned(), r["b"].as_bool()?)))
        .collect();
    for r in rows {
        // binary results decoded into the Python types they are
        ensure!(
            r["visitors"] == serde_json::json!(["int", r["page_views"][1].as_i64().unwrap_or(0) / 2]),
            "{r}"
        );
        ensure!(
            r["first_seen"][0] == "datetime" && r["first_seen"][1].as_str().is_some_and(|t| t.ends_with("+00:00")),
            "{r}"
        );
        ensure!(
            r["last_day"] == serde_json::json!(["date", today[0]["d"]]),
            "{r} {today:?}"
        );
        let country = r["country"][1].as_str().unwrap_or_default();
        ensure!(
            r["any_bot"] == serde_json::json!(["bool", bots.get(country)]),
            "{r} {bots:?}"
        );
        ensure!(r["half"] == serde_json::json!(["float", 2.5]), "{r}");
    }
    ensure!(
        a["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("PostgreSQL 16.6 (Marsad ")),
        "{}",
        a["version"]
    );
    Ok(())
}

#[test]
fn superset_connects_lists_and_charts_marsad_tables() -> Result<()> {
    if !tools_for(
        "superset_connects_lists_and_charts_marsad_tables",
        &[Tool::Psql, Tool::Superset],
    )? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let m = marsad_with_visitors(tmp.path())?;
    let home = tmp.path().join("superset");
    std::fs::create_dir_all(&home)?;
    let python = superset_python();
    let python = python.to_str().context("the virtualenv's path")?;
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/superset_config.py");
    let uri = format!(
        "postgresql+psycopg2://data-eng:{ENGINEER_KEY}@127.0.0.1:{}/marsad?sslmode=require",
        m.pg_port
    );
    let out = run_json(
        python,
        "superset_check.py",
        &[&uri],
        &[
            ("SUPERSET_HOME", home.display().to_string()),
            ("SUPERSET_CONFIG_PATH", config.display().to_string()),
            (
                "SUPERSET_SECRET_KEY",
                "test-only-secret-for-a-throwaway-superset".into(),
            ),
        ],
    )?;
    if let Some(e) = out.get("error") {
        bail!(
            "Superset {}: {e}\n{}",
            out["superset"],
            out["trace"].as_str().unwrap_or_default()
        );
    }
    eprintln!("Superset {}", out["superset"]);
    ensure!(
        out["engine_spec"] == "PostgresEngineSpec" && out["ping"] == true,
        "{out}"
    );
    ensure!(
        out["default_schema"] == "public" && out["schemas"] == serde_json::json!(["public"]),
        "{out}"
    );
    let tables: Vec<&str> = out["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        tables.contains(&"events") && tables.contains(&"traffic_hourly"),
        "{tables:?}"
    );
    let columns: Vec<&str> = out["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c[0].as_str())
        .collect();
    ensure!(columns == events_columns(&m)?, "{columns:?}");
    ensure!(
        out["indexes"].as_array().is_some_and(Vec::is_empty)
            && out["foreign_keys"].as_array().is_some_and(Vec::is_empty),
        "{out}"
    );
    ensure!(
        counts(&out["page_views_by_country"]) == page_views_sent(),
        "{}",
        out["page_views_by_country"]
    );
    Ok(())
}

#[test]
fn adbc_and_polars_pull_arrow_over_flight_sql_with_the_same_keys_and_roles() -> Result<()> {
    if !tools_for(
        "adbc_and_polars_pull_arrow_over_flight_sql_with_the_same_keys_and_roles",
        &[Tool::Psql, Tool::PythonFlight],
    )? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let port = free_port()?;
    let m = marsad_with_visitors_and(
        tmp.path(),
        &[("MARSAD_QUERY__FLIGHT_ADDR", format!("127.0.0.1:{port}"))],
    )?;
    // the certificate of the Postgres port serves Flight too: the client trusts the test authority
    let ca = tmp.path().join("ca.pem");
    let uri = format!("grpc+tls://127.0.0.1:{port}");
    let ca_arg = ca.display().to_string();
    let out = run_json(
        "python3",
        "flight_clients.py",
        &[&uri, &ca_arg, "data-eng", ENGINEER_KEY, "marketing", ANALYST_KEY],
        &[],
    )?;
    eprintln!("client versions: {}", out["versions"]);
    let page_views = page_views_sent();
    let total_events = m.sql_count("SELECT count(*) FROM events")?;

    let e = client(&out, "engineer_by_header")?;
    ensure!(
        counts(&e["page_views_by_country"]) == page_views,
        "{}",
        e["page_views_by_country"]
    );
    // every row, as Arrow, in the table's types
    ensure!(
        e["rows"] == total_events && e["distinct_event_ids"] == total_events,
        "{e}"
    );
    ensure!(
        e["types"]["ts"].as_str().is_some_and(|t| t.starts_with("timestamp[us")) && e["types"]["is_bot"] == "bool",
        "{}",
        e["types"]
    );
    ensure!(
        e["tables"]
            == serde_json::json!([
                "ad_performance_hourly",
                "demographics_daily",
                "events",
                "funnels_hourly",
                "goals_hourly",
                "pages_hourly",
                "sources_hourly",
                "traffic_hourly"
            ]),
        "{}",
        e["tables"]
    );
    ensure!(e["vendor"] == "Marsad", "{e}");

    let p = client(&out, "engineer_by_password")?;
    ensure!(
        counts(&p["polars_page_views_by_country"]) == page_views && p["polars_type"] == "DataFrame",
        "{p}"
    );

    let a = client(&out, "analyst")?;
    ensure!(
        a["tables"]
            == serde_json::json!([
                "ad_performance_hourly",
                "demographics_daily",
                "funnels_hourly",
                "goals_hourly",
                "pages_hourly",
                "sources_hourly",
                "traffic_hourly"
            ]),
        "an analyst's table list holds the rollups only: {a}"
    );
    ensure!(a["raw_events"] != "answered", "raw events are refused to analysts: {a}");
    ensure!(
        a["count"].as_str().is_some_and(|c| c.contains("not released")),
        "count(*) is not released over Flight either: {a}"
    );
    ensure!(a["released_page_views"].is_i64(), "a released number: {a}");
    ensure!(
        out["wrong_key"].as_str().is_some_and(|w| w.contains("UNAUTHENTICATED")),
        "an unknown key is refused: {}",
        out["wrong_key"]
    );
    Ok(())
}
