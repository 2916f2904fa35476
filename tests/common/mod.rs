use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use marsad_privacy::mmdb_writer::{MmdbValue, MmdbWriter};
use reqwest::blocking::Client;
use serde_json::{Value, json};

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Countries of the fixture database: (ISO code, IPv4 /16 prefix, region, city).
pub const FIXTURE_COUNTRIES: &[(&str, [u8; 2], &str, &str)] = &[
    ("JO", [176, 29], "Amman Governorate", "Amman"),
    ("SA", [188, 48], "Riyadh Region", "Riyadh"),
    ("AE", [94, 200], "Dubai", "Dubai"),
    ("EG", [41, 32], "Cairo Governorate", "Cairo"),
    ("IQ", [37, 236], "Baghdad", "Baghdad"),
];

/// Writes a small GeoIP2-City style database placing each fixture /16 in its country.
pub fn write_fixture_geoip(path: &Path) -> Result<()> {
    let mut w = MmdbWriter::new("GeoIP2-City");
    for (code, p, region, city) in FIXTURE_COUNTRIES {
        let names = |n: &str| MmdbValue::map([("en", MmdbValue::str(n))]);
        let record = MmdbValue::map([
            (
                "country",
                MmdbValue::map([("iso_code", MmdbValue::str(code)), ("names", names(code))]),
            ),
            (
                "subdivisions",
                MmdbValue::Array(vec![MmdbValue::map([("names", names(region))])]),
            ),
            ("city", MmdbValue::map([("names", names(city))])),
        ]);
        w.insert(format!("{}.{}.0.0/16", p[0], p[1]).parse()?, &record);
    }
    std::fs::write(path, w.to_bytes())?;
    Ok(())
}

/// The environment that lifts the clamp (`process.max_events_per_visitor_day`) out of reach,
/// for tests that count each of many events per visitor in the rollups. It also scales the
/// noise of released numbers, so such tests read exact numbers only (engineer SQL).
pub fn no_clamp() -> (&'static str, String) {
    ("MARSAD_PROCESS__MAX_EVENTS_PER_VISITOR_DAY", "1000000".into())
}

/// A moment of yesterday as late as the processor takes a client's clock (24 hours less two
/// minutes ago); `None` in the two minutes before midnight UTC, when it would be today.
pub fn late_yesterday() -> Option<chrono::DateTime<chrono::Utc>> {
    let now = chrono::Utc::now();
    let at = now - chrono::Duration::minutes(24 * 60 - 2);
    (at.date_naive() != now.date_naive()).then_some(at)
}

/// Posts `events` to `m`'s `/v1/batch` in batches of 100 from an address in the fixture
/// `country` (with `user_agent`, if given); each must be accepted (202).
pub fn post_events_from(m: &Marsad, country: &str, user_agent: Option<&str>, events: &[Value]) -> Result<()> {
    let prefix = FIXTURE_COUNTRIES
        .iter()
        .find(|c| c.0 == country)
        .map(|c| c.1)
        .with_context(|| format!("no fixture country {country}"))?;
    let client = Client::new();
    for chunk in events.chunks(100) {
        let mut req = client
            .post(format!("{}/v1/batch", m.ingest))
            .header("x-forwarded-for", format!("{}.{}.1.7", prefix[0], prefix[1]));
        if let Some(agent) = user_agent {
            req = req.header("user-agent", agent);
        }
        let resp = req.json(&chunk).send()?;
        ensure!(resp.status().as_u16() == 202, "{}", resp.status());
    }
    Ok(())
}

/// A running `marsad up`.
pub struct Marsad {
    pub child: Child,
    pub data_dir: PathBuf,
    pub ingest: String,
    pub query: String,
    pub ingest_port: u16,
    pub query_port: u16,
    /// The Postgres wire protocol port.
    pub pg_port: u16,
    pub log_path: PathBuf,
}

/// The envelope ingest would write for `event` (JSON), received at `received_at` from a
/// fixture address in Jordan, without user agent or privacy signals.
pub fn fixture_envelope(event: Value, received_at: chrono::DateTime<chrono::Utc>) -> marsad_schemas::Envelope {
    marsad_schemas::Envelope {
        v: marsad_schemas::ENVELOPE_VERSION,
        event: serde_json::from_value(event).unwrap_or_else(|e| panic!("fixture event: {e}")),
        received_at,
        client_ip: "176.29.1.1".parse().ok(),
        user_agent: None,
        accept_language: None,
        dnt: false,
        gpc: false,
    }
}

/// The identity key every test process signs and checks identity tokens with.
pub const TEST_IDENTITY_KEY: [u8; 32] = [0x1d; 32];

/// What every test process gets before its own settings: no per-address rates (the tests all
/// come from 127.0.0.1; the rate-limit tests set their own) and the test identity key.
pub fn test_env() -> Vec<(&'static str, String)> {
    vec![
        ("MARSAD_INGEST__LIMITS__RATE_PER_SECOND", "0".into()),
        ("MARSAD_INGEST__OPT_OUT_RATE_PER_MINUTE", "1000000".into()),
        ("MARSAD_QUERY__LIMITS__RATE_PER_SECOND", "0".into()),
        ("MARSAD_QUERY__AUDIENCE_RATE_PER_SECOND", "1000000".into()),
        ("MARSAD_SECRET_IDENTITY_KEY", hex::encode(TEST_IDENTITY_KEY)),
    ]
}

/// An identity token for `uid` as the site's backend signs it, valid for an hour.
pub fn identity_token(uid: &str, age_band: Option<&str>, gender: Option<&str>) -> String {
    let key = marsad_privacy::keys::SecretKey::from_bytes(TEST_IDENTITY_KEY);
    let claims = marsad_privacy::identity::IdentityClaims {
        uid: uid.to_owned(),
        exp: chrono::Utc::now().timestamp() + 3600,
        age_band: age_band.map(str::to_owned),
        gender: gender.map(str::to_owned),
    };
    marsad_privacy::identity::sign(&key, &claims)
}

pub fn marsad_bin() -> &'static str {
    env!("CARGO_BIN_EXE_marsad")
}

/// A `[[query.keys]]` entry for `key` (the config holds only its hash).
pub fn key_entry(name: &str, role: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    format!("[[query.keys]]\nname = \"{name}\"\nroles = [\"{role}\"]\nsha256 = \"{digest}\"\n")
}

impl Marsad {
    /// Starts `marsad up` on free ports, trusting 127.0.0.1 as a proxy.
    pub fn start(data_dir: &Path, geoip: Option<&Path>) -> Result<Self> {
        Self::start_with_config(data_dir, geoip, None)
    }

    /// Starts with a configuration file too.
    pub fn start_with_config(data_dir: &Path, geoip: Option<&Path>, config: Option<&Path>) -> Result<Self> {
        Self::start_with_env(data_dir, geoip, config, &[])
    }

    /// Starts with a configuration file and extra environment variables.
    pub fn start_with_env(
        data_dir: &Path,
        geoip: Option<&Path>,
        config: Option<&Path>,
        env: &[(&str, String)],
    ) -> Result<Self> {
        // a free port can be taken by a parallel test between our probe and marsad's bind: try again
        let mut attempt = 0;
        loop {
            match Self::launch(data_dir, geoip, config, env, free_port()?, free_port()?) {
                Err(e) if attempt < 3 && e.to_string().contains("cannot listen") => attempt += 1,
                other => return other,
            }
        }
    }

    /// Starts on given ports (a restart keeps the addresses clients use).
    pub fn start_on(data_dir: &Path, geoip: Option<&Path>, ingest_port: u16, query_port: u16) -> Result<Self> {
        Self::launch(data_dir, geoip, None, &[], ingest_port, query_port)
    }

    fn launch(
        data_dir: &Path,
        geoip: Option<&Path>,
        config: Option<&Path>,
        env: &[(&str, String)],
        ingest_port: u16,
        query_port: u16,
    ) -> Result<Self> {
        let log_path = data_dir.with_extension("marsad.log");
        let pg_port = free_port()?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new(marsad_bin());
        cmd.arg("up")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ingest-addr")
            .arg(format!("127.0.0.1:{ingest_port}"))
            .arg("--query-addr")
            .arg(format!("127.0.0.1:{query_port}"))
            .arg("--pg-addr")
            .arg(format!("127.0.0.1:{pg_port}"))
            .arg("--trusted-proxy")
            .arg("127.0.0.1/32")
            .env("MARSAD_PROCESS__BATCH_MAX_INTERVAL_MS", "300")
            // an error's message, not its backtrace, ends the log a failing test shows
            .env("RUST_LIB_BACKTRACE", "0")
            .env(
                "RUST_LOG",
                "info,deltalake=warn,deltalake_core=warn,buoyant_kernel=warn,delta_kernel=warn,datafusion=warn",
            )
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        if let Some(g) = geoip {
            cmd.env("MARSAD_GEOIP__DATABASES", format!("[{}]", g.display()));
        }
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.envs(test_env());
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().context("spawning marsad up")?;
        let mut m = Marsad {
            child,
            data_dir: data_dir.to_owned(),
            ingest: format!("http://127.0.0.1:{ingest_port}"),
            query: format!("http://127.0.0.1:{query_port}"),
            ingest_port,
            query_port,
            pg_port,
            log_path,
        };
        m.wait_ready()?;
        Ok(m)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::blocking::Client::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("marsad exited early ({status}):\n{}", self.log_tail());
            }
            let ok = |url: String| client.get(url).send().map(|r| r.status().is_success()).unwrap_or(false);
            if ok(format!("{}/healthz", self.ingest)) && ok(format!("{}/healthz", self.query)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("marsad did not become ready:\n{}", self.log_tail())
    }

    /// The last lines marsad logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The admin key `marsad up` wrote.
    pub fn admin_key(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("admin.key"))?
            .trim()
            .to_owned())
    }

    /// Runs SQL over `/v1/sql` and returns the rows.
    pub fn sql(&self, sql: &str) -> Result<Vec<Value>> {
        let resp = reqwest::blocking::Client::new()
            .post(format!("{}/v1/sql", self.query))
            .bearer_auth(self.admin_key()?)
            .json(&json!({ "sql": sql }))
            .send()?;
        let status = resp.status();
        let body: Value = resp.json()?;
        if !status.is_success() {
            bail!("{sql}: {status} {body}");
        }
        Ok(body["rows"].as_array().cloned().unwrap_or_default())
    }

    /// A single integer from SQL.
    pub fn sql_count(&self, sql: &str) -> Result<i64> {
        let rows = self.sql(sql)?;
        let row = rows.first().and_then(|r| r.as_object()).context("no row")?;
        row.values().next().and_then(Value::as_i64).context("not an integer")
    }

    /// Waits until `sql` gives `want`, or fails with what it gave last.
    pub fn wait_for_count(&self, sql: &str, want: i64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = -1;
        while Instant::now() < deadline {
            last = self.sql_count(sql).unwrap_or(-1);
            if last == want {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "{sql}: wanted {want}, still {last} after {timeout:?}\n{}",
            self.log_tail()
        )
    }

    /// `kill -9`.
    pub fn kill_hard(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Marsad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every text value (and every binary value that is valid UTF-8) of every Parquet file under `dir`,
/// as (file, column, value).
pub fn parquet_strings(dir: &Path) -> Result<Vec<(String, String, String)>> {
    use arrow::array::AsArray;
    use arrow::datatypes::DataType;
    let mut out = Vec::new();
    let mut files = Vec::new();
    collect_files(dir, "parquet", &mut files)?;
    for file in files {
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file)?)?
                .build()?;
        for batch in reader {
            let batch = batch?;
            for (i, field) in batch.schema().fields().iter().enumerate() {
                let col = batch.column(i);
                let values: Vec<String> = match field.data_type() {
                    DataType::Utf8 => col.as_string::<i32>().iter().flatten().map(str::to_owned).collect(),
                    DataType::LargeUtf8 => col.as_string::<i64>().iter().flatten().map(str::to_owned).collect(),
                    DataType::Utf8View => col.as_string_view().iter().flatten().map(str::to_owned).collect(),
                    // text kept as bytes is still text; opaque bytes (sketches) are not, and their
                    // random bytes would match any short pattern now and then
                    DataType::Binary => col
                        .as_binary::<i32>()
                        .iter()
                        .flatten()
                        .filter_map(|b| std::str::from_utf8(b).ok().map(str::to_owned))
                        .collect(),
                    DataType::BinaryView => col
                        .as_binary_view()
                        .iter()
                        .flatten()
                        .filter_map(|b| std::str::from_utf8(b).ok().map(str::to_owned))
                        .collect(),
                    _ => continue,
                };
                for v in values {
                    out.push((file.display().to_string(), field.name().clone(), v));
                }
            }
        }
    }
    Ok(out)
}

/// Files with extension `ext` under `dir`, recursively.
pub fn collect_files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, ext, out)?;
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    Ok(())
}

/// Counts of rows by a column, from SQL rows with columns `k` and `n`.
/// What Python's `deltalake` and `duckdb` count in the tables at `tables` (a directory or an
/// `s3://` URL, reached with `env`): the JSON object `tests/data/interop.py` prints.
pub fn python_counts(tables: &str, env: &[(&str, String)]) -> Result<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/interop.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(tables)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "the interop script failed (pip install deltalake duckdb pyarrow; .ci/run does):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn counts_by(rows: &[Value]) -> HashMap<String, i64> {
    rows.iter()
        .map(|r| {
            (
                r["k"].as_str().unwrap_or("NULL").to_owned(),
                r["n"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

/// A moto S3 server on a free loopback port, stopped on drop.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
}

impl S3Server {
    /// Starts the server, logging to `log`. The free port can be taken by another test's
    /// server between the probe and moto's bind: then the answer on it is not ours (and dies
    /// with the other test), so the start is tried again on another port.
    pub fn start(log: &Path) -> Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(log)? {
                Some(server) => return Ok(server),
                None if attempt < 5 => continue,
                None => bail!("moto's S3 server could not bind a free port in {attempt} tries"),
            }
        }
    }

    fn start_once(log: &Path) -> Result<Option<Self>> {
        let port = free_port()?;
        let log = std::fs::File::create(log)?;
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting python3 -m moto.server")?;
        let mut server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answered = Client::new().get(&server.endpoint).send().is_ok();
            if let Some(status) = server.child.try_wait()? {
                if answered {
                    // someone else's server answers on the port ours could not bind
                    return Ok(None);
                }
                bail!("moto's S3 server exited ({status}); pip install 'moto[server]' (./test does)");
            }
            if answered {
                // ours is alive and something answers: make sure ours holds the port
                std::thread::sleep(Duration::from_millis(300));
                if server.child.try_wait()?.is_some() {
                    return Ok(None);
                }
                return Ok(Some(server));
            }
            ensure!(
                Instant::now() < deadline,
                "moto's S3 server did not answer on {}",
                server.endpoint
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        let resp = Client::new().put(format!("{}/{bucket}", self.endpoint)).send()?;
        ensure!(
            resp.status().is_success(),
            "creating bucket {bucket}: {}",
            resp.status()
        );
        Ok(())
    }

    /// Every key under `prefix` (ListObjectsV2, following continuation tokens).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type", "2".to_owned()), ("prefix", prefix.to_owned())];
            if let Some(t) = &token {
                query.push(("continuation-token", t.clone()));
            }
            let body = Client::new()
                .get(format!("{}/{bucket}", self.endpoint))
                .query(&query)
                .send()?
                .error_for_status()?
                .text()?;
            keys.extend(xml_values(&body, "Key"));
            token = xml_values(&body, "NextContinuationToken").into_iter().next();
            if token.is_none() {
                return Ok(keys);
            }
        }
    }

    /// The object at `key`.
    pub fn get(&self, bucket: &str, key: &str) -> Result<bytes::Bytes> {
        Ok(Client::new()
            .get(format!("{}/{bucket}/{key}", self.endpoint))
            // moto refuses anonymous object reads; it checks the credential's shape, not the signature
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=marsad-test/20260101/us-east-1/s3/aws4_request, \
                 SignedHeaders=host, Signature=0",
            )
            .send()?
            .error_for_status()?
            .bytes()?)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text of every `<tag>…</tag>` in `xml` (S3 listings escape nothing our keys contain but `&`).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(v, _)| v.replace("&amp;", "&")))
        .collect()
}

/// The environment every Marsad process (and Python) of a test gets for tables at
/// `s3://{bucket}/marsad/tables`: the location from `MARSAD_TABLES__*`, the credentials from
/// the standard AWS variables.
pub fn s3_env(server: &S3Server, bucket: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MARSAD_TABLES__LOCATION", format!("s3://{bucket}/marsad/tables")),
        ("MARSAD_TABLES__STORAGE__AWS_ENDPOINT", server.endpoint.clone()),
        ("MARSAD_TABLES__STORAGE__AWS_ALLOW_HTTP", "true".into()),
        ("MARSAD_TABLES__STORAGE__AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "marsad-test".into()),
        ("AWS_SECRET_ACCESS_KEY", "marsad-test-secret".into()),
    ]
}

/// A program some tests need beyond the Rust toolchain (`./test` installs each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// Debian's Chromium and ChromeDriver, for the browser tests.
    Chromium,
    /// The Postgres client `psql` and `openssl` (for a test certificate).
    Psql,
    /// Python with `deltalake`, `duckdb` and `pyarrow`, for the interop test.
    PythonEngines,
    /// moto's S3 server (`python3 -m moto.server`), for the object-storage tests.
    Moto,
    /// The Kafka-protocol broker `tansu`.
    Tansu,
    /// schemathesis (PyPI), the property-based tester of OpenAPI documents.
    Schemathesis,
    /// SQLAlchemy 2, psycopg2, psycopg 3, asyncpg and pandas (PyPI), the Postgres clients of BI tools.
    PythonClients,
    /// Apache Superset, in its own virtualenv (it pins its own SQLAlchemy 1.4).
    Superset,
    /// The ADBC Flight SQL driver, pyarrow and Polars (PyPI).
    PythonFlight,
    /// aiosmtpd (PyPI), an SMTP server with STARTTLS and AUTH, for the e-mail reports.
    Aiosmtpd,
}

/// The Python of the virtualenv `./test` installs Apache Superset into.
pub fn superset_python() -> PathBuf {
    if let Some(p) = std::env::var_os("SUPERSET_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/marsad-test/superset-6.1.0/bin/python")
}

impl Tool {
    fn present(self) -> bool {
        let runs = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        match self {
            Tool::Chromium => {
                Path::new(crate::browser::CHROMIUM).exists() && Path::new(crate::browser::CHROMEDRIVER).exists()
            }
            Tool::Psql => runs("psql", &["--version"]) && runs("openssl", &["version"]),
            Tool::PythonEngines => runs("python3", &["-c", "import deltalake, duckdb, pyarrow"]),
            Tool::Moto => runs("python3", &["-c", "import moto.server"]),
            Tool::Tansu => crate::kafka::tansu_binary().is_ok(),
            Tool::Schemathesis => runs("python3", &["-c", "import schemathesis.cli"]),
            Tool::PythonClients => runs(
                "python3",
                &["-c", "import sqlalchemy, psycopg, psycopg2, asyncpg, pandas"],
            ),
            Tool::PythonFlight => runs(
                "python3",
                &["-c", "import adbc_driver_flightsql.dbapi, polars, pyarrow"],
            ),
            Tool::Superset => superset_python()
                .to_str()
                .is_some_and(|python| runs(python, &["-c", "import superset.app"])),
            Tool::Aiosmtpd => runs("python3", &["-c", "import aiosmtpd.controller"]),
        }
    }

    /// What it is and how to install it by hand.
    fn install_hint(self) -> &'static str {
        match self {
            Tool::Chromium => "Chromium (apt-get install chromium chromium-driver)",
            Tool::Psql => "psql and openssl (apt-get install postgresql-client openssl)",
            Tool::PythonEngines => "Python's deltalake, duckdb and pyarrow (pip install deltalake duckdb pyarrow)",
            Tool::Moto => "moto's S3 server (pip install 'moto[server]')",
            Tool::Tansu => "the Kafka broker tansu (cargo install tansu --features dynostore)",
            Tool::Schemathesis => "schemathesis (pip install schemathesis)",
            Tool::PythonClients => {
                "SQLAlchemy, psycopg, psycopg2, asyncpg and pandas (pip install sqlalchemy 'psycopg[binary]' psycopg2-binary asyncpg pandas)"
            }
            Tool::Superset => "Apache Superset in ~/.cache/marsad-test/superset-6.1.0 (see ./test)",
            Tool::PythonFlight => {
                "the ADBC Flight SQL driver and Polars (pip install adbc-driver-flightsql polars pyarrow)"
            }
            Tool::Aiosmtpd => "the SMTP server aiosmtpd (pip install aiosmtpd)",
        }
    }
}

/// Whether `test` can run: `true` when every tool it needs is here. Otherwise, under a plain
/// `cargo test`, prints one line naming what is missing and `false` (the test returns early, so
/// it passes as skipped); under `./test` (`REQUIRE_ALL_TEST_TOOLS=1`), where everything was
/// installed, a missing tool is an error.
pub fn tools_for(test: &str, tools: &[Tool]) -> Result<bool> {
    let missing: Vec<Tool> = tools.iter().copied().filter(|t| !t.present()).collect();
    if missing.is_empty() {
        return Ok(true);
    }
    let needs = missing.iter().map(|t| t.install_hint()).collect::<Vec<_>>().join(", ");
    if std::env::var_os("REQUIRE_ALL_TEST_TOOLS").is_some() {
        bail!("{test} needs {needs}, which ./test should have installed");
    }
    eprintln!("SKIPPED {test}: needs {needs}; `./test` installs everything and runs all tests");
    Ok(false)
}

/// A test certificate authority and a server certificate it signed for 127.0.0.1 and
/// localhost, written as PEM files.
pub struct TestCertificate {
    /// The authority's certificate (PEM), for clients to trust.
    pub ca_pem: String,
    /// The server's certificate chain file.
    pub cert: PathBuf,
    /// The server's private key file.
    pub key: PathBuf,
}

impl TestCertificate {
    pub fn write(dir: &Path) -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?.signed_by(&key, &ca)?;
        let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&cert_path, server.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(TestCertificate {
            ca_pem: ca.pem(),
            cert: cert_path,
            key: key_path,
        })
    }

    /// A blocking HTTP client that trusts only this authority.
    pub fn client(&self) -> Result<reqwest::blocking::Client> {
        Ok(reqwest::blocking::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?)
            .timeout(Duration::from_secs(30))
            .build()?)
    }

    /// A Postgres TLS connector that trusts only this authority.
    pub fn postgres_tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("CA PEM: {e}"))?;
        roots.add(der)?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

/// The statements fuzzing found that take sqlparser 17-105 s of CPU to reject (fuzz/findings).
pub fn runaway_statements() -> anyhow::Result<Vec<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/findings");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("analyst_sql-slow-unit-"))
        {
            found.push(String::from_utf8(std::fs::read(&path)?)?);
        }
    }
    anyhow::ensure!(found.len() >= 3, "the fuzz findings in {}", dir.display());
    found.sort();
    Ok(found)
}

/// One of [`runaway_statements`].
pub fn runaway_sql() -> anyhow::Result<String> {
    runaway_statements()?.into_iter().next().context("a finding")
}
