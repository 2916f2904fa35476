//! The attacks the reports issue lists, run against the release mechanism on many seeded
//! datasets, each in two builds: with noise (what analysts and advertisers get) and with the
//! noise turned off (`analysts = "threshold_only"`).
//!
//! A country with 3 visitors (IQ) sits beside large ones, and each attack estimates its
//! events. The criterion: with the noise off every attack recovers IQ's events exactly (so
//! the test can fail), and with the noise on no attack's root-mean-square error over the
//! datasets is below the standard deviation of the noise on a single released cell — the
//! attacks learn no more than one noisy release would tell. (The datasets and noise keys
//! come from the seeds, so the outcome is the same on every run.) Error messages are probed
//! too: none may quote a stored value. (40 datasets; the averaging attack repeats its query
//! 1,000 times on the first and 10 times on the others, every repeat answered alike; the
//! rephrasing attack averages 16 differently worded questions over the same rows.)

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Date32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder};
use arrow::record_batch::RecordBatch;
use chrono::{NaiveDate, Utc};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use datasketches::hll::{HllSketch, HllType};
use marsad_config::Config;
use marsad_privacy::keys::SecretKey;
use marsad_query::release::{Mechanism, Release};
use marsad_query::reports::{ReportKind, ReportRequest};
use marsad_query::sql::{Access, run_with_params};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const COUNTRIES: [&str; 4] = ["JO", "SA", "AE", "EG"];
const SEEDS: u64 = 40;

/// One seeded dataset: the large countries on `day`, IQ's three visitors alone the day before.
struct Dataset {
    ctx: SessionContext,
    iq_events: i64,
    day: NaiveDate,
}

fn micros(day: NaiveDate, hour: u32) -> i64 {
    day.and_hms_opt(hour, 0, 0)
        .unwrap_or_default()
        .and_utc()
        .timestamp_micros()
}

async fn dataset(seed: u64) -> Dataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let day = Utc::now().date_naive() - chrono::Duration::days(10);
    // (country, region, day, visitor, events)
    let mut visits: Vec<(&str, &str, NaiveDate, String, i64)> = Vec::new();
    for c in COUNTRIES {
        for v in 0..rng.random_range(80..400) {
            visits.push((c, "Capital", day, format!("{c}-{seed}-{v}"), rng.random_range(1..8)));
        }
    }
    let mut iq_events = 0;
    for v in 0..3 {
        let n = rng.random_range(8..20);
        iq_events += n;
        visits.push((
            "IQ",
            "Baghdad",
            day - chrono::Duration::days(1),
            format!("IQ-{seed}-{v}"),
            n,
        ));
    }
    // traffic_hourly: one row per (day, country, region) at noon, page views
    let mut cells: HashMap<(NaiveDate, &str, &str), (i64, HllSketch)> = HashMap::new();
    for (c, region, d, visitor, events) in &visits {
        let cell = cells.entry((*d, *c, *region)).or_insert_with(|| {
            (
                0,
                HllSketch::new(marsad_schemas::HLL_LG_K, HllType::Hll8).unwrap_or_else(|e| panic!("{e}")),
            )
        });
        cell.0 += events;
        cell.1.update(visitor.as_str());
    }
    let schema = marsad_schemas::traffic_hourly_schema();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for field in schema.fields() {
        let column: ArrayRef = match field.name().as_str() {
            "hour" => {
                let mut b = TimestampMicrosecondBuilder::new().with_timezone("UTC");
                cells.keys().for_each(|(d, _, _)| b.append_value(micros(*d, 12)));
                Arc::new(b.finish())
            }
            "date" => {
                let mut b = Date32Builder::new();
                let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
                cells
                    .keys()
                    .for_each(|(d, _, _)| b.append_value((*d - epoch).num_days() as i32));
                Arc::new(b.finish())
            }
            "events" | "sessions" => {
                let mut b = Int64Builder::new();
                cells.values().for_each(|(e, _)| b.append_value(*e));
                Arc::new(b.finish())
            }
            "bounces" | "session_seconds" => {
                let mut b = Int64Builder::new();
                cells.values().for_each(|_| b.append_value(0));
                Arc::new(b.finish())
            }
            "visitors" => {
                let mut b = BinaryBuilder::new();
                cells.values().for_each(|(_, s)| b.append_value(s.serialize()));
                Arc::new(b.finish())
            }
            name => {
                let mut b = StringBuilder::new();
                for (_, c, region) in cells.keys() {
                    match name {
                        "country" => b.append_value(c),
                        "region" => b.append_value(region),
                        "event_type" => b.append_value("page_view"),
                        "page_category" => b.append_value("cars"),
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish())
            }
        };
        columns.push(column);
    }
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap_or_else(|e| panic!("{e}"));
    let ctx = SessionContext::new();
    marsad_query::sketches::register(&ctx);
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap_or_else(|e| panic!("{e}"));
    ctx.register_table("traffic_hourly", Arc::new(table))
        .unwrap_or_else(|e| panic!("{e}"));
    Dataset { ctx, iq_events, day }
}

fn release(seed: u64) -> Release {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    Release::new(
        &Config::default(),
        std::sync::Arc::new(SecretKey::from_bytes(key)),
        None,
    )
}

async fn report(d: &Dataset, r: &Release, m: Mechanism, params: &[(&str, String)]) -> Value {
    let params: HashMap<String, String> = params.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let req = ReportRequest::parse(ReportKind::Geo, &params, Utc::now().date_naive()).unwrap_or_else(|e| panic!("{e}"));
    marsad_query::reports::run(&d.ctx, &req, r, m, Utc::now())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn sql(d: &Dataset, r: &Release, m: Mechanism, statement: &str) -> Result<Vec<Value>, String> {
    let access = Access::Released {
        key: "analyst".into(),
        mechanism: m,
    };
    let result = run_with_params(&d.ctx, statement, None, 1000, &access, Some(r))
        .await
        .map_err(|e| e.to_string())?;
    let bytes = marsad_query::sql::render(&result, marsad_query::sql::Format::Json).map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok(body["rows"].as_array().cloned().unwrap_or_default())
}

fn first_number(rows: &[Value]) -> i64 {
    rows.first()
        .and_then(|r| r.as_object())
        .and_then(|o| o.values().find_map(Value::as_i64))
        .unwrap_or(0)
}

fn events(v: &Value) -> i64 {
    v["events"].as_i64().unwrap_or(0)
}

/// Each attack's estimate of IQ's events; the averaging attack repeats its query `repeats` times.
async fn attacks(d: &Dataset, r: &Release, m: Mechanism, repeats: usize) -> Vec<(&'static str, i64)> {
    let (from, to) = ((d.day - chrono::Duration::days(1)).to_string(), d.day.to_string());
    let mut out = Vec::new();

    // 1. report differencing: the total minus every row shown (IQ's row is not)
    let geo = report(d, r, m, &[("from", from.clone()), ("to", to.clone())]).await;
    let shown: i64 = geo["rows"]
        .as_array()
        .map(|rows| rows.iter().map(events).sum())
        .unwrap_or(0);
    out.push(("report differencing", events(&geo["total"]) - shown));

    // 2. date differencing: IQ's day is the only one before the others'
    let both = report(d, r, m, &[("from", from.clone()), ("to", to.clone())]).await;
    let last = report(d, r, m, &[("from", to.clone()), ("to", to.clone())]).await;
    out.push(("date differencing", events(&both["total"]) - events(&last["total"])));

    // 3. SQL complement: everything minus the other countries
    let others = "'JO', 'SA', 'AE', 'EG'";
    let all = first_number(
        &sql(d, r, m, "SELECT sum(events) AS e FROM traffic_hourly")
            .await
            .unwrap_or_default(),
    );
    let rest = first_number(
        &sql(
            d,
            r,
            m,
            &format!("SELECT sum(events) AS e FROM traffic_hourly WHERE country IN ({others})"),
        )
        .await
        .unwrap_or_default(),
    );
    out.push(("SQL complement", all - rest));

    // 4. HAVING oracle: a binary search on the total's `HAVING sum(events) >= n`, then the complement
    let (mut lo, mut hi) = (0i64, 1 << 20);
    while lo < hi {
        let mid = (lo + hi + 1) / 2;
        let rows = sql(
            d,
            r,
            m,
            &format!("SELECT sum(events) AS e FROM traffic_hourly HAVING sum(events) >= {mid}"),
        )
        .await
        .unwrap_or_default();
        if rows.is_empty() { hi = mid - 1 } else { lo = mid }
    }
    out.push(("HAVING search", lo - rest));

    // 5. averaging repeats of the complement: every repeat gets the same answer, so the mean
    //    is one answer
    let mut answers = Vec::new();
    for _ in 0..repeats {
        answers.push(first_number(
            &sql(d, r, m, "SELECT sum(events) AS e FROM traffic_hourly")
                .await
                .unwrap_or_default(),
        ));
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "repeats answered alike: {answers:?}"
    );
    let mean = answers.iter().sum::<i64>() / repeats.max(1) as i64;
    out.push(("averaging repeats", mean - rest));

    // 6. averaging rephrasings: the same rows asked with padded IN lists (a value that matches
    //    nothing, a region of another country) and ranges that start before the data; each is
    //    another question, and would get its own noise if the noise followed the words
    let mut totals = Vec::new();
    let mut rests = Vec::new();
    for i in 0..REPHRASINGS {
        let since = format!("20{:02}-01-01 00:00:00", 10 + i % 10);
        totals.push(first_number(
            &sql(
                d,
                r,
                m,
                &format!("SELECT sum(events) AS e FROM traffic_hourly WHERE hour >= TIMESTAMP '{since}'"),
            )
            .await
            .unwrap_or_default(),
        ));
        // a country that matches nothing, or a region present elsewhere (IQ's) but not here
        let statement = if i % 2 == 0 {
            format!("SELECT sum(events) AS e FROM traffic_hourly WHERE country IN ({others}, 'X{i}')")
        } else {
            format!(
                "SELECT sum(events) AS e FROM traffic_hourly WHERE country IN ({others}) \
                 AND region IN ('Capital', 'Baghdad', 'R{i}')"
            )
        };
        rests.push(first_number(&sql(d, r, m, &statement).await.unwrap_or_default()));
    }
    let mean = |v: &[i64]| v.iter().sum::<i64>() as f64 / v.len().max(1) as f64;
    out.push(("averaging rephrasings", (mean(&totals) - mean(&rests)).round() as i64));
    out
}

/// Differently worded questions over the same rows that the averaging-rephrasings attack asks.
const REPHRASINGS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_attack_beats_the_noise_and_every_attack_beats_no_noise() {
    let mut errors: HashMap<&str, (f64, f64)> = HashMap::new(); // attack -> (noise sq err, exact sq err)
    let mut sigma = 0.0;
    for seed in 0..SEEDS {
        let d = dataset(seed).await;
        let r = release(seed);
        sigma = r.distribution("sum(events)").variance().sqrt();
        // 1,000 repeats on the first dataset, 10 on the others (they are all alike anyway)
        let repeats = if seed == 0 { 1000 } else { 10 };
        for (m, noisy) in [(Mechanism::Noise, true), (Mechanism::ThresholdOnly, false)] {
            for (attack, estimate) in attacks(&d, &r, m, repeats).await {
                let err = (estimate - d.iq_events) as f64;
                let e = errors.entry(attack).or_default();
                if noisy { e.0 += err * err } else { e.1 += err * err }
            }
        }
    }
    let mut report = Vec::new();
    for (attack, (noisy, exact)) in &errors {
        let (noisy, exact) = ((noisy / SEEDS as f64).sqrt(), (exact / SEEDS as f64).sqrt());
        report.push(format!("{attack}: rmse {noisy:.1} with noise, {exact:.1} without"));
        assert_eq!(
            exact, 0.0,
            "{attack} must recover IQ exactly without noise (so this test can fail)"
        );
        assert!(
            noisy >= sigma,
            "{attack}: rmse {noisy:.1} is below the noise's standard deviation {sigma:.1}"
        );
    }
    println!("noise sd {sigma:.1} per cell; {}", report.join("; "));
    assert_eq!(errors.len(), 6, "every attack ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_never_quote_a_stored_value() {
    let d = dataset(7).await;
    let r = release(7);
    for probe in [
        "SELECT sum(events) FROM traffic_hourly WHERE CAST(region AS INT) = 1",
        "SELECT region, sum(CAST(region AS BIGINT)) FROM traffic_hourly GROUP BY region",
        "SELECT region FROM traffic_hourly",
        "SELECT max(region) FROM traffic_hourly",
        "SELECT sum(events) FROM traffic_hourly WHERE region > 1",
        "SELECT sum(events) FROM traffic_hourly GROUP BY CAST(region AS INT)",
        "SELECT arrow_cast(region, 'Int64') FROM traffic_hourly GROUP BY region",
    ] {
        let answer = sql(&d, &r, Mechanism::Noise, probe).await;
        let text = match &answer {
            Ok(rows) => serde_json::to_string(rows).unwrap_or_default(),
            Err(e) => e.clone(),
        };
        assert!(
            !text.contains("Baghdad") && !text.contains("Capital"),
            "{probe}: {text}"
        );
    }
}
