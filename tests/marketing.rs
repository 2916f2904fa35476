//! The marketing views on a generated fortnight whose true answers the test knows: sources
//! by channel, referrer and UTM tags; top, entry and exit pages; goals with their conversion
//! rates; a funnel's steps and drop-off; and reports compared with the previous period. Exact numbers where the mechanism allows (threshold only), within
//! the stated interval where noise applies; a row below the threshold is not shown, in a
//! report or in its comparison, and asking twice gives the same noise.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::{DateTime, NaiveDate, Utc};
use marsad_config::Config;
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions, Record};
use marsad_privacy::keys::SecretKey;
use marsad_process::{ProcessMetrics, Processor};
use marsad_query::TableCatalog;
use marsad_query::release::{Mechanism, Release};
use marsad_query::reports::{ReportKind, ReportRequest};
use marsad_schemas::TOPIC_RAW;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::common::fixture_envelope;

const SITE: &str = "kulshi.example";

/// How a generated visitor landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Landing {
    Google,
    Facebook,
    Newsletter,
    Direct,
    /// One visitor in the fortnight: under every threshold.
    Tiny,
}

impl Landing {
    fn channel(self) -> &'static str {
        match self {
            Landing::Google => "organic_search",
            Landing::Facebook => "social",
            Landing::Newsletter => "email",
            Landing::Direct => "direct",
            Landing::Tiny => "referral",
        }
    }

    /// Visitors a day in the current week and in the week before.
    fn per_day(self) -> (usize, usize) {
        match self {
            Landing::Google => (30, 20),
            Landing::Facebook => (25, 25),
            Landing::Newsletter => (20, 40),
            Landing::Direct => (22, 10),
            Landing::Tiny => (0, 0),
        }
    }
}

/// The pages of a session, by the visitor's number: a bounce, two pages, three pages.
fn pages_of(i: usize) -> &'static [&'static str] {
    match i % 3 {
        0 => &["/en/cars/kia"],
        1 => &["/", "/en/jobs/driver"],
        _ => &["/en/jobs/driver", "/", "/ar/سيارات/كيا"],
    }
}

/// What the generated traffic holds, per week (0: the current one, 1: the one before).
#[derive(Default)]
struct Truth {
    sessions: [BTreeMap<&'static str, i64>; 2],
    bounces: [BTreeMap<&'static str, i64>; 2],
    views: [BTreeMap<&'static str, i64>; 2],
    entries: [BTreeMap<&'static str, i64>; 2],
    exits: [BTreeMap<&'static str, i64>; 2],
    /// Per goal: matching events, and visitors with one.
    conversions: [BTreeMap<&'static str, i64>; 2],
    converting: [BTreeMap<&'static str, i64>; 2],
    /// Sessions reaching each step of `cars-to-signup`.
    steps: [BTreeMap<String, i64>; 2],
}

/// The goals and the funnel the test defines, read from a `marsad.toml` as an operator writes it.
fn goals_and_funnels(config: &mut Config) -> Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(
        file.path(),
        r#"
[[process.goals]]
id = "clicked-ad"
description = "clicked an ad"
event_type = "ad_click"

[[process.goals]]
id = "signed-up"
event_type = "signup"

[[process.goals]]
id = "viewed-cars"
event_type = "page_view"
path = "/en/cars/*"

[[process.funnels]]
id = "cars-to-signup"
steps = [{ event_type = "page_view", page_category = "cars" }, { event_type = "ad_click" }, { event_type = "signup" }]
"#,
    )?;
    let read = Config::load(Some(file.path()))?;
    config.process.goals = read.process.goals;
    config.process.funnels = read.process.funnels;
    ensure!(config.process.goals.len() == 3 && config.process.funnels.len() == 1);
    Ok(())
}

/// A fortnight of sessions ending yesterday, one per visitor, each landing as its [`Landing`]
/// says (page views a minute apart, the first one carrying the source).
fn fortnight(today: NaiveDate) -> (Vec<Record>, Truth) {
    let mut records = Vec::new();
    let mut truth = Truth::default();
    for age in 1..=14i64 {
        let week = usize::from(age > 7);
        let day = today - chrono::Duration::days(age);
        let noon: DateTime<Utc> = day.and_hms_opt(10, 0, 0).map(|t| t.and_utc()).unwrap_or_default();
        for landing in [
            Landing::Google,
            Landing::Facebook,
            Landing::Newsletter,
            Landing::Direct,
            Landing::Tiny,
        ] {
            let (now, before) = landing.per_day();
            let visitors = match (landing, week) {
                (Landing::Tiny, _) => usize::from(age == 3),
                (_, 0) => now,
                _ => before,
            };
            for i in 0..visitors {
                let pages = pages_of(i);
                // after the pages, every fourth visitor clicks an ad, every eighth then signs up
                let (clicks, signs_up) = (i % 4 == 0, i % 8 == 0);
                let events = pages.len() + usize::from(clicks) + usize::from(signs_up);
                *truth.sessions[week].entry(landing.channel()).or_default() += 1;
                *truth.bounces[week].entry(landing.channel()).or_default() += i64::from(events == 1);
                let cars = pages.iter().any(|p| p.contains("cars") || p.contains("سيارات"));
                for (goal, hit, n) in [
                    ("clicked-ad", clicks, 1),
                    ("signed-up", signs_up, 1),
                    ("viewed-cars", pages.contains(&"/en/cars/kia"), 1),
                ] {
                    if hit {
                        *truth.conversions[week].entry(goal).or_default() += n;
                        *truth.converting[week].entry(goal).or_default() += 1;
                    }
                }
                for (step, reached) in [("1", cars), ("2", cars && clicks), ("3", cars && signs_up)] {
                    if reached {
                        *truth.steps[week].entry(step.to_owned()).or_default() += 1;
                    }
                }
                *truth.entries[week].entry(pages[0]).or_default() += 1;
                *truth.exits[week].entry(pages[pages.len() - 1]).or_default() += 1;
                for (n, page) in pages.iter().enumerate() {
                    *truth.views[week].entry(page).or_default() += 1;
                    let mut url = format!("https://{SITE}{page}");
                    let mut event = serde_json::json!({
                        "type": "page_view",
                        "cookie_id": format!("c-{age}-{landing:?}-{i}"),
                        "event_id": format!("e-{age}-{landing:?}-{i}-{n}"),
                        "consent": {"analytics": true, "personalisation": true, "marketing": false},
                    });
                    if n == 0 {
                        match landing {
                            Landing::Google => event["referrer"] = "https://www.google.com.sa/search?q=kia".into(),
                            Landing::Facebook => event["referrer"] = "https://m.facebook.com/".into(),
                            Landing::Newsletter => {
                                url.push_str("?utm_source=newsletter&utm_medium=email&utm_campaign=nov")
                            }
                            Landing::Tiny => event["referrer"] = "https://tiny.example/".into(),
                            Landing::Direct => {}
                        }
                    } else {
                        event["referrer"] = format!("https://{SITE}/").into();
                    }
                    event["url"] = url.into();
                    let at = noon + chrono::Duration::seconds(i as i64 * 20 + n as i64 * 60);
                    records.push(Record {
                        key: None,
                        payload: fixture_envelope(event, at).to_bytes(),
                    });
                }
                let after = [("ad_click", clicks), ("signup", signs_up)];
                for (n, (kind, _)) in after.iter().filter(|(_, yes)| *yes).enumerate() {
                    let mut event = serde_json::json!({
                        "type": kind,
                        "url": format!("https://{SITE}{}", pages[pages.len() - 1]),
                        "referrer": format!("https://{SITE}/"),
                        "cookie_id": format!("c-{age}-{landing:?}-{i}"),
                        "event_id": format!("e-{age}-{landing:?}-{i}-{kind}"),
                        "consent": {"analytics": true, "personalisation": true, "marketing": false},
                    });
                    if *kind == "ad_click" {
                        event["ad"] = serde_json::json!({"ad_id": "ad-1", "campaign_id": "cmp-1", "placement": "top"});
                    }
                    let at = noon + chrono::Duration::seconds(i as i64 * 20 + (pages.len() + n) as i64 * 60);
                    records.push(Record {
                        key: None,
                        payload: fixture_envelope(event, at).to_bytes(),
                    });
                }
            }
        }
    }
    (records, truth)
}

/// A processor drains `records` from a local log in `dir`; the config it used.
async fn process(dir: &std::path::Path, records: Vec<Record>) -> Result<Config> {
    let mut config = Config {
        data_dir: dir.to_owned(),
        ..Config::default()
    };
    config.process.batch_max_interval_ms = 100;
    config.process.rollup_commit_interval_ms = 0;
    config.process.channels.own_domains = vec![SITE.into()];
    goals_and_funnels(&mut config)?;
    // the fortnight is in the past: its daily keys are made now, and kept while it is processed
    config.privacy.daily_key_grace_hours = 24 * 30;
    let log = Arc::new(LocalLog::open(config.log_dir(), LocalLogOptions::default())?);
    let want = records.len() as u64;
    for chunk in records.chunks(500) {
        log.append(TOPIC_RAW, chunk.to_vec()).await?;
    }
    let metrics = Arc::new(ProcessMetrics::new());
    let processor = Processor::new(&config, log, Arc::default(), metrics.clone()).await?;
    let stop = CancellationToken::new();
    let run = tokio::spawn(processor.run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while metrics.events_written.get() < want && tokio::time::Instant::now() < deadline {
        ensure!(!run.is_finished(), "the processor stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    run.await??;
    ensure!(
        metrics.events_written.get() >= want,
        "{} of {want} events written",
        metrics.events_written.get()
    );
    Ok(config)
}

struct Reports {
    catalog: TableCatalog,
    release: Release,
    today: NaiveDate,
}

impl Reports {
    async fn get(&self, kind: ReportKind, mechanism: Mechanism, params: &[(&str, String)]) -> Result<Value> {
        let params: HashMap<String, String> = params.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        let req = ReportRequest::parse(kind, &params, self.today).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ctx = self.catalog.session().await?;
        marsad_query::reports::run(&ctx, &req, &self.release, mechanism, Utc::now())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// The week ending yesterday, and compared with what.
fn current_week(today: NaiveDate, compare: Option<&str>) -> Vec<(&'static str, String)> {
    let mut params = vec![
        ("from", (today - chrono::Duration::days(7)).to_string()),
        ("to", (today - chrono::Duration::days(1)).to_string()),
    ];
    if let Some(c) = compare {
        params.push(("compare", c.to_owned()));
    }
    params
}

/// `rows[name]` keyed by `dimension`.
fn by(report: &Value, list: &str, dimension: &str, name: &str) -> BTreeMap<String, i64> {
    report[list]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| Some((r[dimension].as_str()?.to_owned(), r[name].as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn owned(m: &BTreeMap<&'static str, i64>, without: &[&str]) -> BTreeMap<String, i64> {
    m.iter()
        .filter(|(k, _)| !without.contains(k))
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_pages_goals_funnels_and_comparisons_give_the_known_answers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let today = Utc::now().date_naive();
    let (records, truth) = fortnight(today);
    let config = process(dir.path(), records).await?;
    let reports = Reports {
        catalog: TableCatalog::new(config.tables()?),
        release: Release::new(&config, Arc::new(SecretKey::from_bytes([7; 32])), None),
        today,
    };
    let exact = Mechanism::ThresholdOnly;

    // sources by channel: every session in the channel of its landing page view; the one
    // referral visitor is under the threshold, so its row is not shown
    let sources = reports
        .get(ReportKind::Sources, exact, &current_week(today, None))
        .await?;
    let referral = ["referral"];
    assert_eq!(
        by(&sources, "rows", "channel", "sessions"),
        owned(&truth.sessions[0], &referral),
        "{sources}"
    );
    assert_eq!(
        by(&sources, "rows", "channel", "bounces"),
        owned(&truth.bounces[0], &referral)
    );
    for row in sources["rows"].as_array().context("rows")? {
        let (s, b) = (
            row["sessions"].as_f64().unwrap_or(0.0),
            row["bounces"].as_f64().unwrap_or(0.0),
        );
        assert_eq!(row["bounce_rate"].as_f64(), Some(b / s), "{row}");
        // one visitor per session here (HLL is exact at this size, within a percent)
        let v = row["visitors"].as_f64().unwrap_or(0.0);
        assert!((v - s).abs() <= s * 0.02 + 1.0, "visitors {v} vs {s} sessions: {row}");
    }
    // the total counts every session, the hidden referral's too (it is one cell of its own)
    let all: i64 = truth.sessions[0].values().sum();
    assert_eq!(sources["total"]["sessions"].as_i64(), Some(all), "{}", sources["total"]);

    // UTM tags: the newsletter's campaign, and the search engine's domain as referrer
    let mut params = current_week(today, None);
    params.push(("by", "utm_campaign".into()));
    params.push(("channel", "email".into()));
    let campaigns = reports.get(ReportKind::Sources, exact, &params).await?;
    assert_eq!(
        by(&campaigns, "rows", "utm_campaign", "sessions").get("nov"),
        truth.sessions[0].get("email"),
        "{campaigns}"
    );
    let mut params = current_week(today, None);
    params.push(("by", "referrer_domain".into()));
    let referrers = reports.get(ReportKind::Sources, exact, &params).await?;
    let referrers = by(&referrers, "rows", "referrer_domain", "sessions");
    assert_eq!(referrers.get("google.com.sa"), truth.sessions[0].get("organic_search"));
    assert_eq!(referrers.get("m.facebook.com"), truth.sessions[0].get("social"));
    assert!(!referrers.contains_key("tiny.example"), "one visitor: {referrers:?}");

    // pages: views, entries and exits per page; ordered by entries and cut to two rows
    let pages = reports
        .get(ReportKind::Pages, exact, &current_week(today, None))
        .await?;
    assert_eq!(
        by(&pages, "rows", "page_path", "page_views"),
        owned(&truth.views[0], &[])
    );
    let entries = by(&pages, "rows", "page_path", "entries");
    assert_eq!(
        entries.get("/ar/سيارات/كيا"),
        Some(&0),
        "seen, but never first: {pages}"
    );
    let entries: BTreeMap<String, i64> = entries.into_iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(entries, owned(&truth.entries[0], &[]));
    let exits = by(&pages, "rows", "page_path", "exits");
    assert_eq!(exits.get("/"), Some(&0), "seen, but never last");
    let exits: BTreeMap<String, i64> = exits.into_iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(exits, owned(&truth.exits[0], &[]), "{pages}");
    assert!(exits.contains_key("/ar/سيارات/كيا"), "an Arabic path: {exits:?}");
    let mut params = current_week(today, None);
    params.push(("order", "entries".into()));
    params.push(("limit", "2".into()));
    let top = reports.get(ReportKind::Pages, exact, &params).await?;
    let entries: Vec<i64> = top["rows"]
        .as_array()
        .context("rows")?
        .iter()
        .filter_map(|r| r["entries"].as_i64())
        .collect();
    let mut want: Vec<i64> = truth.entries[0].values().copied().collect();
    want.sort_by(|a, b| b.cmp(a));
    want.truncate(2);
    assert_eq!(entries, want, "the two top entry pages, largest first: {top}");

    // compared with the week before: both weeks, and the change of each row and of the total
    let compared = reports
        .get(
            ReportKind::Sources,
            exact,
            &current_week(today, Some("previous_period")),
        )
        .await?;
    assert_eq!(compared["compare"]["with"], "previous_period");
    assert_eq!(
        compared["compare"]["from"].as_str(),
        Some((today - chrono::Duration::days(14)).to_string().as_str())
    );
    assert_eq!(
        by(&compared, "rows", "channel", "sessions"),
        owned(&truth.sessions[0], &referral)
    );
    assert_eq!(
        by(&compared["compare"], "rows", "channel", "sessions"),
        owned(&truth.sessions[1], &referral)
    );
    for row in compared["rows"].as_array().context("rows")? {
        let channel = row["channel"].as_str().context("channel")?;
        let (now, before) = (truth.sessions[0][channel], truth.sessions[1][channel]);
        let change = &row["change"]["sessions"];
        assert_eq!(change["difference"].as_f64(), Some((now - before) as f64), "{row}");
        let direction = match now.cmp(&before) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "flat",
        };
        assert_eq!(change["direction"], direction, "{channel}: {row}");
        assert_eq!(
            change["relative"].as_f64(),
            Some((now - before) as f64 / before as f64),
            "{row}"
        );
    }
    let (now, before): (i64, i64) = (truth.sessions[0].values().sum(), truth.sessions[1].values().sum());
    assert_eq!(
        compared["change"]["sessions"]["difference"].as_f64(),
        Some((now - before) as f64),
        "{}",
        compared["change"]
    );
    // the same pages compared: the traffic report's periods meet by position
    let traffic = reports
        .get(
            ReportKind::Traffic,
            exact,
            &current_week(today, Some("previous_period")),
        )
        .await?;
    let days = traffic["rows"].as_array().context("rows")?;
    assert_eq!(days.len(), 7, "{traffic}");
    assert!(days.iter().all(|d| d["change"]["page_views"].is_object()), "{traffic}");
    let views: (i64, i64) = (truth.views[0].values().sum(), truth.views[1].values().sum());
    assert_eq!(
        traffic["change"]["page_views"]["difference"].as_f64(),
        Some((views.0 - views.1) as f64)
    );
    // a year before there was nothing: both shown, no change claimed
    let year = reports
        .get(ReportKind::Sources, exact, &current_week(today, Some("previous_year")))
        .await?;
    assert!(year["compare"]["total"].is_null(), "{}", year["compare"]);
    assert!(year["change"].is_null());
    assert!(
        year["rows"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["change"].is_null()))
    );

    // goals: conversions exactly, converting visitors and their share of the site's visitors
    let goals = reports
        .get(ReportKind::Goals, exact, &current_week(today, None))
        .await?;
    assert_eq!(
        by(&goals, "rows", "goal_id", "conversions"),
        owned(&truth.conversions[0], &[]),
        "{goals}"
    );
    let site: i64 = truth.sessions[0].values().sum();
    for row in goals["rows"].as_array().context("rows")? {
        let goal = row["goal_id"].as_str().context("goal")?;
        let want = truth.converting[0][goal] as f64;
        let got = row["visitors"].as_f64().context("visitors")?;
        assert!(
            (got - want).abs() <= want * 0.02 + 1.0,
            "{goal}: {got} converting vs {want}"
        );
        let rate = row["conversion_rate"].as_f64().context("a rate")?;
        assert!(
            (rate - want / site as f64).abs() <= 0.03 * want / site as f64,
            "{goal}: rate {rate} vs {want}/{site}"
        );
    }
    // funnels: sessions per step in order, the share kept from step to step
    let funnels = reports
        .get(
            ReportKind::Funnels,
            exact,
            &current_week(today, Some("previous_period")),
        )
        .await?;
    assert_eq!(
        by(&funnels, "rows", "step", "sessions"),
        truth.steps[0].clone(),
        "{funnels}"
    );
    let rows = funnels["rows"].as_array().context("rows")?;
    let steps = &truth.steps[0];
    for row in rows {
        let step = row["step"].as_str().context("step")?;
        let (here, first) = (steps[step] as f64, steps["1"] as f64);
        let previous = match step {
            "1" => here,
            "2" => first,
            _ => steps["2"] as f64,
        };
        assert_eq!(row["from_previous"].as_f64(), Some(here / previous), "{row}");
        assert_eq!(row["drop_off"].as_f64(), Some(1.0 - here / previous), "{row}");
        assert_eq!(row["from_start"].as_f64(), Some(here / first), "{row}");
        let change = &row["change"]["sessions"]["difference"];
        assert_eq!(
            change.as_f64(),
            Some((steps[step] - truth.steps[1][step]) as f64),
            "step {step} compared: {row}"
        );
    }
    // a comparison pays for both periods; a goal's rate for the site's visitors too
    let params: HashMap<String, String> = current_week(today, Some("previous_year"))
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let asked = ReportRequest::parse(ReportKind::Goals, &params, today).map_err(|e| anyhow::anyhow!("{e}"))?;
    let paid = asked.identities(Utc::now());
    assert_eq!(paid.len(), 4, "goals and site visitors, now and a year before");
    let distinct: std::collections::BTreeSet<&String> = paid.iter().map(|(i, _)| i).collect();
    assert_eq!(distinct.len(), 4, "four questions");

    // with noise, as analysts and advertisers get it: each number within a few of its stated
    // intervals of the truth, the small row still hidden, the change made of released numbers
    let noisy = reports
        .get(
            ReportKind::Sources,
            Mechanism::Noise,
            &current_week(today, Some("previous_period")),
        )
        .await?;
    // (the one referral visitor's row is decided by its noisy visitor count, like any row:
    // shown now and then, with numbers the noise drowns; the threshold-only answers above
    // never show it)
    for row in noisy["rows"].as_array().context("rows")? {
        let channel = row["channel"].as_str().context("channel")?;
        if channel == "referral" {
            continue;
        }
        let ci95 = row["ci95"]["sessions"].as_f64().context("an interval")?;
        let got = row["sessions"].as_f64().context("sessions")?;
        let want = truth.sessions[0][channel] as f64;
        // P(|noise| > 4 × its 95% interval) = 20^-4 per number
        assert!((got - want).abs() <= 4.0 * ci95, "{channel}: {got} vs {want} ± {ci95}");
        let before = by(&noisy["compare"], "rows", "channel", "sessions");
        if let (Some(b), Some(d)) = (before.get(channel), row["change"]["sessions"]["difference"].as_f64()) {
            assert_eq!(d, got - *b as f64, "the change of the released numbers");
        }
    }
    // asked again, the same numbers (consistent noise): a comparison cannot be averaged away
    let again = reports
        .get(
            ReportKind::Sources,
            Mechanism::Noise,
            &current_week(today, Some("previous_period")),
        )
        .await?;
    assert_eq!(noisy["rows"], again["rows"]);
    assert_eq!(noisy["compare"]["rows"], again["compare"]["rows"]);
    Ok(())
}

#[test]
fn report_parameters_are_checked_with_clear_errors() {
    let today = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap_or_default();
    let parse = |kind, pairs: &[(&str, &str)]| {
        let params: HashMap<String, String> = pairs.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect();
        ReportRequest::parse(kind, &params, today)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    for (kind, pairs, says) in [
        (ReportKind::Sources, vec![("compare", "last_week")], "previous_period"),
        (ReportKind::Sources, vec![("by", "page_path")], "utm_campaign"),
        (ReportKind::Pages, vec![("order", "sessions")], "entries"),
        (ReportKind::Pages, vec![("limit", "0")], "1 to 1000"),
        (
            ReportKind::Geo,
            vec![("by", "country")],
            "only the campaigns, sources and pages",
        ),
        (ReportKind::Pages, vec![("channel", "email")], "page_path"),
    ] {
        match parse(kind, &pairs) {
            Ok(()) => panic!("{kind:?} {pairs:?} was accepted"),
            Err(e) => assert!(e.contains(says), "{kind:?} {pairs:?}: {e}"),
        }
    }
    assert_eq!(parse(ReportKind::Pages, &[("order", "exits"), ("limit", "10")]), Ok(()));
    assert_eq!(parse(ReportKind::Traffic, &[("compare", "previous_year")]), Ok(()));
}
