use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fantoccini::{ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::common::{Marsad, counts_by, free_port};

/// The system Chromium and its driver (Debian packages `chromium` and `chromium-driver`).
pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";
pub(crate) const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub(crate) struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_driver() -> Result<(Driver, u16)> {
    let port = free_port()?;
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {CHROMEDRIVER} (apt-get install chromium chromium-driver)"))?;
    let driver = Driver(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((driver, port))
}

/// A headless Chromium session through the driver on `port`, with a fresh profile.
pub(crate) async fn chromium(port: u16, profile: &std::path::Path) -> Result<fantoccini::Client> {
    let caps = json!({"goog:chromeOptions": {"binary": CHROMIUM, "args": [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,1800", format!("--user-data-dir={}", profile.display()),
    ]}});
    let Value::Object(caps) = caps else {
        bail!("capabilities")
    };
    Ok(
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await?,
    )
}

async fn wait_for_tracker(c: &fantoccini::Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if c.execute("return typeof window.marsad", vec![]).await? == json!("object") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the tracker did not load");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the events table holds `want` rows (async: called inside the WebDriver session).
async fn wait_for_events(query: &str, key: &str, want: i64) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body: Value = client
            .post(format!("{query}/v1/sql"))
            .bearer_auth(key)
            .json(&json!({"sql": "SELECT count(*) AS n FROM events"}))
            .send()
            .await?
            .json()
            .await?;
        if body["rows"][0]["n"] == json!(want) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "events table never reached {want} rows: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tracker in a real headless Chromium against `marsad up`: cookie, beacons, consent,
/// GPC, refused analytics and opt-outs.
#[test]
fn the_tracker_in_a_real_chromium() -> Result<()> {
    if !crate::common::tools_for("the_tracker_in_a_real_chromium", &[crate::common::Tool::Chromium])? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let m = Marsad::start(&tmp.path().join("data"), None)?;
    let (_driver, port) = start_driver()?;
    let profile = tmp.path().join("profile");
    let screenshot = tmp.path().join("demo.png");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let cookie: String = runtime.block_on(async {
        let c = chromium(port, &profile).await?;
        let demo = format!("{}/demo", m.ingest);
        // 1: the automatic page view, default consent (no personalisation)
        c.goto(&demo).await?;
        wait_for_tracker(&c).await?;
        let cookie = c.execute("return document.cookie", vec![]).await?;
        let cookie = cookie.as_str().unwrap_or_default().to_owned();
        ensure!(cookie.contains("_mid=c-"), "first-party cookie set: {cookie}");
        // 2: the visitor accepts personalisation, then clicks the ad
        c.find(Locator::Id("consent-all")).await?.click().await?;
        c.find(Locator::Id("ad-click")).await?.click().await?;
        // 3: GPC turns personalisation off before anything is sent
        let sent = c
            .execute("Object.defineProperty(navigator, 'globalPrivacyControl', {get: () => true}); return marsad.track('search', {props: {q: 'x'}})", vec![])
            .await?;
        ensure!(sent == json!(true), "search sent");
        // refused analytics: nothing leaves the browser
        let sent = c.execute("window.marsadConsent = {analytics: false}; return marsad.track('page_view')", vec![]).await?;
        ensure!(sent == json!(false), "nothing sent without analytics consent");
        // 4: a new page: consent remembered, GPC override gone
        c.goto(&demo).await?;
        wait_for_tracker(&c).await?;
        // the processor applies opt-outs to what it has not yet stored: let 1-4 land first
        wait_for_events(&m.query, &m.admin_key()?, 4).await?;
        // 5: opt out of personalisation, then an impression
        let done = c
            .execute_async("const done = arguments[0]; marsad.optOut('personalisation').then(done)", vec![])
            .await?;
        ensure!(done == json!(true), "opt-out sent");
        c.execute("return marsad.track('ad_impression', {ad: {ad_id: 'ad-2'}})", vec![]).await?;
        // let the impression's beacon land before the next opt-out, which would drop it
        wait_for_events(&m.query, &m.admin_key()?, 5).await?;
        // after opting out of everything nothing is sent
        c.execute_async("const done = arguments[0]; marsad.optOut('all').then(done)", vec![]).await?;
        let sent = c.execute("return marsad.track('page_view')", vec![]).await?;
        ensure!(sent == json!(false), "nothing sent after opting out");
        std::fs::write(&screenshot, c.screenshot().await?)?;
        c.close().await?;
        Ok(cookie)
    })?;

    m.wait_for_count("SELECT count(*) FROM events", 5, Duration::from_secs(60))?;
    let with_audience =
        counts_by(&m.sql("SELECT event_type AS k, count(audience_id) AS n FROM events GROUP BY event_type")?);
    assert_eq!(with_audience.get("ad_click"), Some(&1), "{with_audience:?}");
    assert_eq!(with_audience.get("search"), Some(&0), "GPC: {with_audience:?}");
    assert_eq!(
        with_audience.get("page_view"),
        Some(&1),
        "first view without consent, second with: {with_audience:?}"
    );
    assert_eq!(
        with_audience.get("ad_impression"),
        Some(&0),
        "after the opt-out: {with_audience:?}"
    );
    assert_eq!(
        m.sql_count("SELECT count(DISTINCT visitor_key) FROM events")?,
        1,
        "one browser, one visitor"
    );
    let paths = counts_by(&m.sql("SELECT page_path AS k, count(*) AS n FROM events GROUP BY page_path")?);
    assert_eq!(paths.get("/demo"), Some(&5), "{paths:?}");
    // the cookie id is in no value of any column of any table file
    let cookie_id = cookie
        .split(';')
        .find_map(|c| c.trim().strip_prefix("_mid="))
        .context("the _mid cookie")?
        .to_owned();
    ensure!(cookie_id.len() > 8, "a cookie id worth looking for: {cookie_id}");
    let values = crate::common::parquet_strings(&m.data_dir.join("tables"))?;
    ensure!(values.len() > 50, "too few values read back: {}", values.len());
    let leaks: Vec<_> = values.iter().filter(|(_, _, v)| v.contains(&cookie_id)).collect();
    assert!(leaks.is_empty(), "the cookie id is stored: {leaks:?}");
    assert!(std::fs::metadata(&screenshot)?.len() > 1000, "screenshot saved");
    Ok(())
}
