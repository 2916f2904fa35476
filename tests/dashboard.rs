//! The dashboard at `/` of the query service, in a real headless Chromium
//! against `marsad up` with a simulated population: it loads, refuses a wrong
//! key, signs in with an analyst key, draws non-empty charts from the reports,
//! follows the date range, drills from country to region, exports CSV and
//! switches to Arabic, right to left. Screenshots land in the target dir.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fantoccini::{Client as Browser, Locator};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::browser::{chromium, start_driver};
use crate::common::{FIXTURE_COUNTRIES, Marsad, key_entry, write_fixture_geoip};

const ANALYST_KEY: &str = "dashboard-analyst-key-0123456789";
const AGENTS: [&str; 3] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
];
const PAGES: [&str; 3] = [
    "https://kulshi.example/ar/سيارات/تويوتا",
    "https://kulshi.example/en/jobs/driver",
    "https://kulshi.example/ar/عقارات/شقق",
];

/// 1,600 visitors over four countries and three devices; all view pages, all see two ads,
/// every third clicks; half declare an age band and gender. Returns the events sent. (Every
/// country has enough visitors that the noise never takes it under the release threshold.)
fn simulate(m: &Marsad) -> Result<usize> {
    let client = Client::new();
    let weights = [("JO", 600), ("SA", 450), ("AE", 350), ("EG", 200)];
    let mut sent = 0;
    let mut visitor = 0;
    for (country, n) in weights {
        let prefix = FIXTURE_COUNTRIES
            .iter()
            .find(|c| c.0 == country)
            .map(|c| c.1)
            .context("fixture country")?;
        for _ in 0..n {
            visitor += 1;
            let cookie = format!("c-dash-{visitor}");
            let mut events = Vec::new();
            // those who declare an age band and gender also consent to personalisation
            let consent = json!({"analytics": true, "personalisation": visitor % 2 == 0});
            let demographics = if visitor % 2 == 0 {
                json!({"age_band": if visitor % 4 == 0 { "25-34" } else { "35-44" },
                       "gender": if visitor % 8 < 4 { "female" } else { "male" }})
            } else {
                Value::Null
            };
            for (i, page) in PAGES.iter().enumerate().take(1 + visitor % 3) {
                // declared demographics count only inside the site's signed identity token
                let identity = demographics.as_object().map(|d| {
                    crate::common::identity_token(
                        &format!("u-dash-{visitor}"),
                        d.get("age_band").and_then(Value::as_str),
                        d.get("gender").and_then(Value::as_str),
                    )
                });
                let mut event = json!({"type": "page_view", "url": page, "cookie_id": cookie,
                    "event_id": format!("{cookie}-v{i}"), "identity": identity, "consent": consent});
                // a third land from a search engine, a third from a social network
                if i == 0 && visitor % 3 > 0 {
                    event["referrer"] =
                        json!(["https://www.google.com.sa/search?q=x", "https://l.facebook.com/"][visitor % 3 - 1]);
                }
                events.push(event);
            }
            for (i, campaign) in ["ramadan-cars", "summer-jobs"].iter().enumerate() {
                events.push(json!({"type": "ad_impression", "url": PAGES[0], "cookie_id": cookie,
                    "event_id": format!("{cookie}-i{i}"),
                    "ad": {"ad_id": format!("ad-{i}"), "campaign_id": campaign, "placement": "top"}}));
            }
            if visitor % 3 == 0 {
                events.push(json!({"type": "ad_click", "url": PAGES[0], "cookie_id": cookie,
                    "event_id": format!("{cookie}-c"),
                    "ad": {"ad_id": "ad-0", "campaign_id": "ramadan-cars", "placement": "top"}}));
            }
            let resp = client
                .post(format!("{}/v1/batch", m.ingest))
                .header(
                    "x-forwarded-for",
                    format!("{}.{}.{}.7", prefix[0], prefix[1], visitor % 250),
                )
                .header("user-agent", AGENTS[visitor % AGENTS.len()])
                .json(&events)
                .send()?;
            ensure!(resp.status().as_u16() == 202, "{}", resp.status());
            sent += events.len();
        }
    }
    Ok(sent)
}

/// 300 visitors of Jordan yesterday (as late as the processor takes a client's clock), one
/// page view each: the period a comparison of today is made with. `None` in the two minutes
/// before midnight UTC, when "yesterday" would be today.
fn yesterday(m: &Marsad) -> Result<Option<usize>> {
    let Some(at) = crate::common::late_yesterday() else {
        return Ok(None);
    };
    let events: Vec<Value> = (0..300)
        .map(|v| {
            json!({"type": "page_view", "url": PAGES[0], "cookie_id": format!("c-yesterday-{v}"),
                "event_id": format!("c-yesterday-{v}"), "ts": at.to_rfc3339(),
                "consent": {"analytics": true}})
        })
        .collect();
    crate::common::post_events_from(m, "JO", Some(AGENTS[0]), &events)?;
    Ok(Some(events.len()))
}

async fn wait_for(c: &Browser, what: &str, script: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = c.execute(script, vec![]).await?;
        if !(value.is_null() || value == json!(false)) {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the `n`th complete load of every view.
async fn wait_loaded(c: &Browser, n: u32) -> Result<()> {
    wait_for(
        c,
        &format!("load {n}"),
        &format!("return document.body.dataset.loaded === '{n}'"),
    )
    .await?;
    Ok(())
}

/// The live view's released visitors of the last half hour, as the page holds them.
async fn marsad_live_visitors(c: &Browser) -> Result<u64> {
    let v = c
        .execute("return marsadDashboard.state.live.total.visitors", vec![])
        .await?;
    v.as_u64().context("live visitors")
}

/// For each view, how many points its chart draws with a value above zero.
async fn drawn_points(c: &Browser) -> Result<Vec<(String, u64)>> {
    let value = c
        .execute(
            "return marsadDashboard.views.map(v => { \
               const chart = Chart.getChart(document.querySelector('#view-' + v + ' canvas')); \
               const points = chart ? chart.data.datasets[0].data.filter(x => x > 0).length : 0; \
               return [v, points]; })",
            vec![],
        )
        .await?;
    let mut out = Vec::new();
    for pair in value.as_array().context("views")? {
        out.push((
            pair[0].as_str().unwrap_or_default().to_owned(),
            pair[1].as_u64().unwrap_or(0),
        ));
    }
    Ok(out)
}

async fn set_dates(c: &Browser, from: &str, to: &str) -> Result<()> {
    c.execute(
        "document.getElementById('from').value = arguments[0]; document.getElementById('to').value = arguments[1];",
        vec![json!(from), json!(to)],
    )
    .await?;
    c.find(Locator::Css("#controls button[type=submit]"))
        .await?
        .click()
        .await?;
    Ok(())
}

/// Whether the hour changed since `then` (recent numbers are released anew each hour).
fn hour_turned(then: chrono::DateTime<chrono::Utc>) -> bool {
    chrono::Utc::now().timestamp() / 3600 != then.timestamp() / 3600
}

/// A report of the last 30 days (the dashboard's default range) straight from the API.
async fn api_report(m: &Marsad, kind: &str) -> Result<Value> {
    let today = chrono::Utc::now().date_naive();
    let from = today - chrono::Duration::days(29);
    Ok(reqwest::Client::new()
        .get(format!("{}/v1/reports/{kind}?from={from}&to={today}", m.query))
        .bearer_auth(ANALYST_KEY)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

#[test]
fn the_dashboard_in_a_real_chromium() -> Result<()> {
    if !crate::common::tools_for("the_dashboard_in_a_real_chromium", &[crate::common::Tool::Chromium])? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let geoip = tmp.path().join("geo.mmdb");
    write_fixture_geoip(&geoip)?;
    let config = tmp.path().join("marsad.toml");
    // a goal and a funnel the simulated visitors reach: all see a cars page, every third clicks
    std::fs::write(
        &config,
        format!(
            "{}\n[[process.goals]]\nid = \"clicked-ad\"\nevent_type = \"ad_click\"\n\n\
             [[process.funnels]]\nid = \"cars-then-click\"\n\
             steps = [{{ event_type = \"page_view\", page_category = \"cars\" }}, {{ event_type = \"ad_click\" }}]\n",
            key_entry("marketing", "analyst", ANALYST_KEY)
        ),
    )?;
    let m = Marsad::start_with_config(&tmp.path().join("data"), Some(&geoip), Some(&config))?;
    let yesterday = yesterday(&m)?;
    let sent = simulate(&m)? + yesterday.unwrap_or(0);
    m.wait_for_count(
        "SELECT sum(events) FROM traffic_hourly",
        sent as i64,
        Duration::from_secs(90),
    )?;
    m.wait_for_count(
        "SELECT sum(impressions) FROM ad_performance_hourly",
        3200,
        Duration::from_secs(30),
    )?;

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots)?;
    let (_driver, port) = start_driver()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let c = chromium(port, &tmp.path().join("profile")).await?;
        c.goto(&format!("{}/", m.query)).await?;
        let title = c.find(Locator::Css("header h1")).await?.text().await?;
        ensure!(title == "Marsad — audience analytics", "{title}");
        let attribution = c.find(Locator::Id("attribution")).await?.text().await?;
        ensure!(attribution.contains("geolocation"), "GeoIP credit shown: {attribution}");

        // a wrong key is refused with a clear message
        c.find(Locator::Id("api-key")).await?.send_keys("not-a-key").await?;
        c.find(Locator::Css("#sign-in-form button")).await?.click().await?;
        let error = wait_for(&c, "the sign-in error", "return document.getElementById('sign-in-error').textContent || null").await?;
        ensure!(error.as_str().unwrap_or("").contains("analyst"), "{error}");

        // the analyst key signs in and every view draws data
        let asked_at = chrono::Utc::now();
        c.find(Locator::Id("api-key")).await?.clear().await?;
        c.find(Locator::Id("api-key")).await?.send_keys(ANALYST_KEY).await?;
        c.find(Locator::Css("#sign-in-form button")).await?.click().await?;
        wait_loaded(&c, 1).await?;
        let sign_in_shown = c
            .execute("return getComputedStyle(document.getElementById('sign-in')).display !== 'none'", vec![])
            .await?;
        ensure!(sign_in_shown == json!(false), "the sign-in form is gone once signed in");
        let points = drawn_points(&c).await?;
        for (view, n) in &points {
            let report = c
                .execute(&format!("return JSON.stringify(marsadDashboard.state.reports['{view}'])"), vec![])
                .await?;
            ensure!(*n > 0, "view {view} drew nothing: {points:?}: {report}");
        }
        let countries = c
            .execute("return marsadDashboard.state.reports.geo.rows.length", vec![])
            .await?;
        ensure!(countries == json!(4), "four countries shown: {countries}");
        // the live view: the simulated visitors came in the last minutes; it refreshes by itself
        let live = wait_for(
            &c,
            "the live view",
            "const t = document.querySelector('#live .totals .total[data-measure=visitors]'); \
             return t && /≈ [0-9]/.test(t.textContent) ? t.textContent : null",
        )
        .await?;
        let visitors = marsad_live_visitors(&c).await?;
        ensure!(
            (1_400..=1_800).contains(&visitors),
            "about the 1,600 simulated visitors live: {live} ({visitors})"
        );
        let refreshes = c.execute("return Number(document.getElementById('live').dataset.loaded)", vec![]).await?;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let later = c.execute("return Number(document.getElementById('live').dataset.loaded)", vec![]).await?;
        ensure!(later.as_u64() > refreshes.as_u64(), "the live view refreshes: {refreshes} then {later}");
        let bars = c
            .execute("return marsadDashboard.state.live.per_minute.filter(r => r.page_views > 0).length", vec![])
            .await?;
        ensure!(bars.as_u64().is_some_and(|n| n > 0), "page views per minute drawn: {bars}");
        // the map: every country's shape, the four with visitors shaded, the busiest darkest
        let shaded = wait_for(
            &c,
            "the map",
            "const p = document.querySelectorAll('#view-geo .map path[data-visitors]'); \
             return p.length ? Array.from(p).map(e => [e.dataset.country, e.getAttribute('class')]).sort() : null",
        )
        .await?;
        let shapes = c
            .execute("return document.querySelectorAll('#view-geo .map path').length", vec![])
            .await?;
        ensure!(shapes.as_u64().is_some_and(|n| n > 200), "the world's countries drawn: {shapes}");
        let shade = |country: &str| {
            shaded.as_array().into_iter().flatten().find(|p| p[0] == country).and_then(|p| {
                p[1].as_str()
                    .and_then(|c| c.strip_prefix("country shade-"))
                    .and_then(|n| n.parse::<u8>().ok())
            })
        };
        let (jo, sa, ae, eg) = (shade("JO"), shade("SA"), shade("AE"), shade("EG"));
        ensure!(
            jo == Some(4) && sa <= jo && ae <= sa && eg <= ae && eg.is_some() && shaded.as_array().map(Vec::len) == Some(4),
            "JO 600 (and 300 yesterday), SA 450, AE 350, EG 200 visitors: {shaded}"
        );
        // released numbers read as estimates, with their 95% interval on hover
        let first = c.find(Locator::Css("#view-geo tbody td.num")).await?;
        let (text, hover) = (first.text().await?, first.attr("title").await?.unwrap_or_default());
        ensure!(text.starts_with('≈') && hover.starts_with("95% interval:"), "{text} / {hover}");

        // CSV of a view: header, the same numbers as the API gives, and each one's interval
        let csv = c.execute("return marsadDashboard.csv('campaigns')", vec![]).await?;
        let csv = csv.as_str().context("csv")?;
        ensure!(
            csv.starts_with("campaign_id,impressions,clicks,ctr,impressions_ci95,clicks_ci95\r\n"),
            "{csv}"
        );
        let api = api_report(&m, "campaigns").await?;
        let ramadan = api["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["campaign_id"] == "ramadan-cars"))
            .context("ramadan-cars from the API")?;
        let line = format!("ramadan-cars,{},{},", ramadan["impressions"], ramadan["clicks"]);
        // recent numbers are drawn anew each hour: across an hour's turn the two may differ
        ensure!(
            csv.contains(&line) || hour_turned(asked_at),
            "the dashboard shows the API's numbers: {line} in {csv}"
        );
        // declared demographics (with consent) by age band and gender: 80 declaring visitors in four cells
        let demo_csv = c.execute("return marsadDashboard.csv('demographics')", vec![]).await?;
        let demo_csv = demo_csv.as_str().context("csv")?;
        for cell in ["25-34,female,", "25-34,male,", "35-44,female,", "35-44,male,"] {
            ensure!(demo_csv.contains(cell), "{cell} in {demo_csv}");
        }
        let geo_csv = c.execute("return marsadDashboard.csv('geo')", vec![]).await?;
        let geo = api_report(&m, "geo").await?;
        let jo = geo["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["country"] == "JO"))
            .context("JO from the API")?;
        let line = format!("\r\nJO,{},{},", jo["visitors"], jo["page_views"]);
        ensure!(
            geo_csv.as_str().unwrap_or("").contains(&line) || hour_turned(asked_at),
            "{line} in {geo_csv}"
        );
        std::fs::write(shots.join("dashboard-en.png"), c.screenshot().await?)?;

        // a date range without data empties the charts; the last 30 days bring them back
        set_dates(&c, "2025-01-01", "2025-01-31").await?;
        wait_loaded(&c, 2).await?;
        let points = drawn_points(&c).await?;
        ensure!(points.iter().all(|(_, n)| *n == 0), "old range has no data: {points:?}");
        let empty = c.find(Locator::Css("#view-categories .empty")).await?.text().await?;
        ensure!(empty == "No data in this range", "{empty}");
        let today = chrono::Utc::now().date_naive();
        let from = today - chrono::Duration::days(29);
        set_dates(&c, &from.to_string(), &today.to_string()).await?;
        wait_loaded(&c, 3).await?;
        ensure!(drawn_points(&c).await?.iter().all(|(_, n)| *n > 0));

        // geography: from a country to its regions
        c.find(Locator::Css("#view-geo td a.drill")).await?.click().await?;
        wait_for(
            &c,
            "the regions of JO",
            "const r = marsadDashboard.state.reports.geo; return r.filters && r.filters.country === 'JO' && r.rows.length > 0",
        )
        .await?;
        let region = c.find(Locator::Css("#view-geo tbody td:nth-child(2)")).await?.text().await?;
        ensure!(region == "Amman Governorate", "{region}");

        // sources: the channels visitors landed from, named; pages with entries and exits
        let channels = c
            .execute("return marsadDashboard.state.reports.sources.rows.map(r => r.channel).sort()", vec![])
            .await?;
        ensure!(channels == json!(["direct", "organic_search", "social"]), "{channels}");
        let channel = c.find(Locator::Css("#view-sources tbody td")).await?.text().await?;
        ensure!(["Direct", "Organic search", "Social"].contains(&channel.as_str()), "{channel}");
        let pages = c
            .execute("return marsadDashboard.state.reports.pages.rows.map(r => [r.page_path, r.entries > 0, r.exits > 0])", vec![])
            .await?;
        ensure!(pages.as_array().is_some_and(|p| p.len() >= 3), "{pages}");
        // the funnel's two steps in order, with the share kept from the first to the second
        let steps = c
            .execute("return marsadDashboard.state.reports.funnels.rows.map(r => [r.step, r.from_previous])", vec![])
            .await?;
        let kept = steps[1][1].as_f64().unwrap_or(0.0);
        ensure!(steps[0][0] == "1" && steps[1][0] == "2" && kept > 0.2 && kept < 0.5, "a third click: {steps}");
        let goal = c
            .execute("return marsadDashboard.state.reports.goals.rows.map(r => r.goal_id)", vec![])
            .await?;
        ensure!(goal == json!(["clicked-ad"]), "{goal}");

        // today compared with yesterday: arrows on the totals and on the rows both days have
        if yesterday.is_some() {
            c.execute("document.getElementById('compare').value = 'previous_period'", vec![])
                .await?;
            set_dates(&c, &today.to_string(), &today.to_string()).await?;
            wait_loaded(&c, 4).await?;
            let arrows = c
                .execute(
                    "return Array.from(document.querySelectorAll('#view-traffic .totals .change')).map(e => e.dataset.direction)",
                    vec![],
                )
                .await?;
            // 1,600 visitors today against 300 yesterday
            ensure!(arrows == json!(["up", "up", "up"]), "traffic totals compared: {arrows}");
            let direct = c
                .execute(
                    "return Array.from(document.querySelectorAll('#view-sources tbody tr')).filter(tr => tr.querySelector('.change')).length",
                    vec![],
                )
                .await?;
            ensure!(direct == json!(1), "only direct had visitors yesterday: {direct}");
            let dashed = c
                .execute(
                    "return Chart.getChart(document.querySelector('#view-traffic canvas')).data.datasets.filter(d => d.borderDash).length",
                    vec![],
                )
                .await?;
            ensure!(dashed == json!(3), "yesterday drawn under today: {dashed}");
            std::fs::write(shots.join("dashboard-compare.png"), c.screenshot().await?)?;
        } else {
            eprintln!("two minutes before midnight UTC: no yesterday to compare with");
        }

        // the filters offer what the reports released: the four countries, the three devices
        let offered = c
            .execute(
                "return ['country', 'device'].map(id => Array.from(document.getElementById(id).options).map(o => o.value))",
                vec![],
            )
            .await?;
        ensure!(
            offered == json!([["", "AE", "EG", "JO", "SA"], ["", "desktop", "mobile"]]),
            "{offered}"
        );
        let loaded = c.execute("return Number(document.body.dataset.loaded)", vec![]).await?;
        let loaded = loaded.as_u64().context("loads")? as u32;
        c.execute("document.getElementById('country').value = 'SA'", vec![]).await?;
        c.find(Locator::Css("#controls button[type=submit]")).await?.click().await?;
        wait_loaded(&c, loaded + 1).await?;
        let filtered = c
            .execute("return marsadDashboard.state.reports.categories.filters.country", vec![])
            .await?;
        ensure!(filtered == json!("SA"), "{filtered}");
        c.execute("document.getElementById('country').value = ''", vec![]).await?;
        c.find(Locator::Css("#controls button[type=submit]")).await?.click().await?;
        wait_loaded(&c, loaded + 2).await?;

        // Arabic, right to left
        c.find(Locator::Id("language")).await?.click().await?;
        let dir = c.execute("return document.documentElement.dir", vec![]).await?;
        ensure!(dir == json!("rtl"), "{dir}");
        let title = c.find(Locator::Css("header h1")).await?.text().await?;
        ensure!(title == "مرصد — تحليلات الجمهور", "{title}");
        let heading = c.find(Locator::Css("#view-categories h2")).await?.text().await?;
        ensure!(heading == "أهم الفئات", "{heading}");
        let live_heading = c.find(Locator::Css("#live h2")).await?.text().await?;
        ensure!(live_heading == "الآن: آخر 30 دقيقة", "{live_heading}");
        let first_category = c.find(Locator::Css("#view-categories tbody td")).await?.text().await?;
        ensure!(first_category == "سيارات", "categories are named in Arabic: {first_category}");
        let hover = c
            .find(Locator::Css("#view-geo tbody td.num"))
            .await?
            .attr("title")
            .await?
            .unwrap_or_default();
        ensure!(hover.starts_with("مجال الثقة"), "the interval in Arabic: {hover}");
        let status = c.find(Locator::Id("status")).await?.text().await?;
        ensure!(status.starts_with("حُدّث"), "{status}");
        let legend = c
            .execute("return Chart.getChart(document.querySelector('#view-traffic canvas')).data.datasets[0].label", vec![])
            .await?;
        ensure!(legend == json!("مشاهدات الصفحات"), "{legend}");
        let channel = c.find(Locator::Css("#view-sources tbody td")).await?.text().await?;
        ensure!(["مباشر", "بحث مجاني", "شبكات التواصل"].contains(&channel.as_str()), "{channel}");
        // a phone's width: one column, nothing wider than the screen
        c.set_window_size(390, 844).await?;
        let overflow = c
            .execute("return document.documentElement.scrollWidth - document.documentElement.clientWidth", vec![])
            .await?;
        let widest = c
            .execute(
                "const w = document.documentElement.clientWidth; return Array.from(document.querySelectorAll('body *')) \
                 .filter(e => { const r = e.getBoundingClientRect(); return r.right > w + 1 || r.left < -1; }) \
                 .slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().width))",
                vec![],
            )
            .await?;
        ensure!(overflow.as_i64().is_some_and(|o| o <= 0), "wider than a phone by {overflow} px: {widest}");
        std::fs::write(shots.join("dashboard-ar.png"), c.screenshot().await?)?;
        c.close().await?;
        Ok(())
    })?;
    for name in ["dashboard-en.png", "dashboard-ar.png"] {
        ensure!(std::fs::metadata(shots.join(name))?.len() > 10_000, "{name} saved");
    }
    Ok(())
}
