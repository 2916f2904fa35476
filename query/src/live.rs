//! `GET /v1/live`: visitors and top pages of the last 30 minutes, from the
//! processor's in-memory window, released like every report.
//!
//! The window is cells of processing time that never change once ended (see
//! `marsad_schemas::live`): the ended minutes, then the ended 2-second slots of
//! the current minute. Each cell gets its own noise, drawn from the noise key
//! and the cell's identity, so a cell has one number however often and by
//! whomever it is asked; the window's numbers are sums of released cells. One
//! visitor-day moves the cells of a measure, all of them together, by at most
//! its clamp, and each event is in two releases (its slot, then its minute) at
//! ε/2 each: the live view as a whole costs ε per measure per visitor-day,
//! which each key pays once a day. Rows (the total, each minute, each page)
//! are shown only when their noisy visitors reach the threshold plus the
//! interval of that sum, so a sum of many noisy cells cannot carry a small
//! page over the threshold on noise alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use marsad_schemas::live::{LIVE_SLOT_SECONDS, LIVE_VISITS_PER_VISITOR_DAY, LIVE_WINDOW_MINUTES};
use marsad_schemas::{LiveCell, LiveSource};
use serde_json::{Value, json};

use crate::QueryState;
use crate::error::ApiError;
use crate::release::{Mechanism, Release};
use crate::routes::authorization;

/// Pages listed unless `limit` says otherwise.
const DEFAULT_PAGES: usize = 10;
/// Most pages one answer lists.
const MAX_PAGES: usize = 100;
/// Measures the live view releases (visitors and page views, in total and per page).
const LIVE_MEASURES: usize = 4;

/// The processor's live window, when it runs in this process.
pub type SharedLiveSource = Arc<dyn LiveSource>;

/// How far past the threshold a sum of noisy cells must be to be shown: the Laplace tail
/// of its noisiest cell at δ = 10⁻⁶ (ln(1 / 2δ)), so one cell's noise alone does not carry a
/// row over it but about once in a million.
const LAPLACE_TAIL: f64 = 13.12;

/// A sum of released cells and its 95 % interval.
#[derive(Debug, Clone, Copy, Default)]
struct Sum {
    value: i64,
    variance: f64,
    /// The noise scale of its noisiest cell.
    scale: f64,
}

impl Sum {
    fn ci95(self) -> u64 {
        (1.96 * self.variance.sqrt()).ceil() as u64
    }

    fn value(self) -> i64 {
        // a count is never negative
        self.value.max(0)
    }
}

/// How one live answer is released.
struct LiveRelease<'a> {
    release: &'a Release,
    mechanism: Mechanism,
    /// The window's name: another window's (or this one's before a restart) cells are other
    /// questions, with other noise.
    instance: &'a str,
}

impl LiveRelease<'_> {
    fn cell(&self, cell: &LiveCell, measure: &str, path: Option<&str>, truth: u64) -> Sum {
        if self.mechanism == Mechanism::ThresholdOnly {
            return Sum {
                value: truth as i64,
                variance: 0.0,
                scale: 0.0,
            };
        }
        let sensitivity = match measure {
            "visitors" if path.is_none() => LIVE_VISITS_PER_VISITOR_DAY,
            _ => self.release.clamp(),
        };
        let distribution = self.release.live_distribution(sensitivity);
        let identity = format!(
            "live|{}|{}|{}|{measure}|{}",
            self.instance,
            cell.start,
            cell.seconds,
            path.map_or(String::new(), |p| format!("page={p}"))
        );
        Sum {
            value: truth as i64 + self.release.live_noise(identity.as_bytes(), distribution),
            variance: distribution.variance(),
            scale: distribution.scale(),
        }
    }

    /// Whether a row whose visitors are `visitors` is shown: the threshold, plus a margin no
    /// noise reaches but with a chance of one in a million.
    fn shown(&self, visitors: Sum) -> bool {
        let margin = (visitors.ci95() as f64).max(LAPLACE_TAIL * visitors.scale).ceil() as u64;
        visitors.value() as u64 >= self.release.min_visitors() + margin
    }
}

fn add(a: Sum, b: Sum) -> Sum {
    Sum {
        value: a.value + b.value,
        variance: a.variance + b.variance,
        scale: a.scale.max(b.scale),
    }
}

fn row(visitors: Sum, page_views: Sum) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    out.insert("visitors".into(), json!(visitors.value()));
    out.insert("page_views".into(), json!(page_views.value()));
    out.insert(
        "ci95".into(),
        json!({"visitors": visitors.ci95(), "page_views": page_views.ci95()}),
    );
    out
}

fn time(secs: i64) -> Value {
    DateTime::<Utc>::from_timestamp(secs, 0).map_or(Value::Null, |t| json!(t))
}

/// The released live view of the cells of window `instance` at `now`, with at most `limit`
/// pages. Exact numbers (threshold only) come from ended minutes alone: two answers a slot
/// apart would otherwise differ by one visitor's event, exactly.
pub fn released(
    cells: &[LiveCell],
    instance: &str,
    release: &Release,
    mechanism: Mechanism,
    now: DateTime<Utc>,
    limit: usize,
) -> Value {
    let live = LiveRelease {
        release,
        mechanism,
        instance,
    };
    let cells: Vec<&LiveCell> = cells
        .iter()
        .filter(|c| mechanism == Mechanism::Noise || c.seconds == 60)
        .collect();
    let mut total = (Sum::default(), Sum::default());
    let mut minutes: BTreeMap<i64, (Sum, Sum)> = BTreeMap::new();
    let mut pages: HashMap<&str, (Sum, Sum)> = HashMap::new();
    for cell in cells {
        let visitors = live.cell(cell, "visitors", None, cell.visitors);
        let page_views = live.cell(cell, "page_views", None, cell.page_views);
        total = (add(total.0, visitors), add(total.1, page_views));
        let minute = minutes.entry(cell.start - cell.start.rem_euclid(60)).or_default();
        *minute = (add(minute.0, visitors), add(minute.1, page_views));
        for page in &cell.pages {
            let v = live.cell(cell, "visitors", Some(&page.path), page.visitors);
            let p = live.cell(cell, "page_views", Some(&page.path), page.page_views);
            let at = pages.entry(&page.path).or_default();
            *at = (add(at.0, v), add(at.1, p));
        }
    }
    let per_minute: Vec<Value> = minutes
        .into_iter()
        .map(|(start, (v, p))| {
            let mut out = if live.shown(v) {
                row(v, p)
            } else {
                serde_json::Map::from_iter([("held_back".to_owned(), json!(true))])
            };
            out.insert("minute".into(), time(start));
            Value::Object(out)
        })
        .collect();
    let mut shown: Vec<(&str, Sum, Sum)> = pages
        .into_iter()
        .filter(|(_, (v, _))| live.shown(*v))
        .map(|(path, (v, p))| (path, v, p))
        .collect();
    shown.sort_by(|a, b| b.2.value().cmp(&a.2.value()).then(a.0.cmp(b.0)));
    shown.truncate(limit);
    let pages: Vec<Value> = shown
        .into_iter()
        .map(|(path, v, p)| {
            let mut out = row(v, p);
            out.insert("page_path".into(), json!(path));
            Value::Object(out)
        })
        .collect();
    let window_start = now.timestamp() - now.timestamp().rem_euclid(60) - (LIVE_WINDOW_MINUTES - 1) * 60;
    let noise = |sensitivity: u64| {
        if mechanism == Mechanism::Noise {
            release.live_distribution(sensitivity).scale()
        } else {
            0.0
        }
    };
    json!({
        "from": time(window_start),
        "to": now,
        "minutes": LIVE_WINDOW_MINUTES,
        "refresh_seconds": if mechanism == Mechanism::Noise { LIVE_SLOT_SECONDS } else { 60 },
        "total": if live.shown(total.0) { Value::Object(row(total.0, total.1)) } else { Value::Null },
        "per_minute": per_minute,
        "pages": pages,
        "release": {
            "mechanism": mechanism,
            "epsilon_per_measure": if mechanism == Mechanism::Noise { release.epsilon() } else { 0.0 },
            "noise_scale_per_cell": {
                "visitors": noise(LIVE_VISITS_PER_VISITOR_DAY),
                "page_views": noise(release.clamp()),
                "page_visitors": noise(release.clamp()),
            },
            "min_visitors": release.min_visitors(),
        },
    })
}

/// `GET /v1/live` (analyst): visitors, page views and top pages of the last 30 minutes.
#[utoipa::path(get, path = "/v1/live", tag = "reports", security(("api_key" = ["analyst"])),
    params(("limit" = Option<u32>, Query, description = "at most this many pages (1 to 100, default 10)")),
    responses((status = 200, description = "The total, each minute and the top pages, each number with its 95% interval; rows under the threshold are held back"),
        (status = 400, description = "Bad parameter"), (status = 401, description = "No or wrong key"),
        (status = 403, description = "Not an analyst key"), (status = 429, description = "The key's privacy budget for today is spent"),
        (status = 503, description = "No processor runs in this process (the live view is served by `marsad up`)")))]
pub async fn live(
    State(state): State<QueryState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let holder = state
        .keys
        .authorize(authorization(&headers), marsad_config::Role::Analyst)?;
    let limit = match params.get("limit") {
        None => DEFAULT_PAGES,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGES).contains(&n) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "limit `{l}`: a whole number from 1 to {MAX_PAGES}"
                )));
            }
        },
    };
    if let Some(unknown) = params.keys().find(|k| k.as_str() != "limit") {
        return Err(ApiError::BadRequest(format!(
            "unknown parameter `{unknown}`; the live view takes `limit`"
        )));
    }
    let Some(source) = state.live.clone() else {
        return Err(ApiError::Unavailable(
            "the live view reads the processor's memory: it is served by `marsad up`, where the processor runs \
             beside the query service"
                .into(),
        ));
    };
    let now = Utc::now();
    let mechanism = state.release.for_analysts();
    if mechanism == Mechanism::Noise {
        // every cell of a window is released at most once per measure; a key pays for seeing
        // a window's cells once a day (a restarted processor's window is another, paid again)
        let question = format!("live|day={}|window={}", now.date_naive(), source.instance());
        state
            .release
            .charge_all(&holder.name, &[(question, LIVE_MEASURES)], now)?;
    }
    let cells = source.cells(now.timestamp());
    Ok(Json(released(
        &cells,
        source.instance(),
        &state.release,
        mechanism,
        now,
        limit,
    ))
    .into_response())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use marsad_config::{AnalystRelease, Config};
    use marsad_privacy::keys::SecretKey;
    use marsad_schemas::LivePage;

    use super::*;

    fn release(mechanism: AnalystRelease) -> Release {
        let mut config = Config::default();
        config.release.analysts = mechanism;
        config.release.min_visitors = 5;
        Release::new(&config, Arc::new(SecretKey::from_bytes([9; 32])), None)
    }

    /// A minute start (1,800,000,000 is one: a multiple of 60).
    const MINUTE: i64 = 1_800_000_000;

    fn cells() -> Vec<LiveCell> {
        let page = |path: &str, page_views, visitors| LivePage {
            path: path.into(),
            page_views,
            visitors,
        };
        vec![
            LiveCell {
                start: MINUTE,
                seconds: 60,
                visitors: 30,
                page_views: 90,
                pages: vec![page("/cars", 60, 20), page("/rare", 3, 1)],
            },
            LiveCell {
                start: MINUTE + 60,
                seconds: 2,
                visitors: 4,
                page_views: 8,
                pages: vec![page("/cars", 8, 4)],
            },
        ]
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(MINUTE + 70, 0).unwrap_or_default()
    }

    #[test]
    fn exact_under_the_threshold_only_mechanism_from_ended_minutes_and_small_pages_held_back() {
        let r = release(AnalystRelease::ThresholdOnly);
        let out = released(&cells(), "w", &r, Mechanism::ThresholdOnly, now(), 10);
        // the current minute's slots are left out: exact slots would tell one event apart
        assert_eq!(out["total"]["visitors"], 30);
        assert_eq!(out["total"]["page_views"], 90);
        assert_eq!(out["pages"].as_array().map(Vec::len), Some(1), "{out}");
        assert_eq!(out["pages"][0]["page_path"], "/cars");
        assert_eq!(out["pages"][0]["page_views"], 60);
        assert_eq!(out["per_minute"].as_array().map(Vec::len), Some(1), "{out}");
        assert_eq!(out["refresh_seconds"], 60);
    }

    #[test]
    fn noise_is_the_same_for_the_same_cells_and_held_back_rows_need_the_interval() {
        let r = release(AnalystRelease::Noise);
        let a = released(&cells(), "w", &r, Mechanism::Noise, now(), 10);
        let b = released(&cells(), "w", &r, Mechanism::Noise, now(), 10);
        assert_eq!(a, b, "asking again gives the same numbers");
        // page visitors have the clamp's sensitivity (40 at ε/2): 24 visitors are far inside it
        assert_eq!(a["pages"].as_array().map(Vec::len), Some(0), "{a}");
        // a cell's noise does not depend on what else is in the window
        let one = released(&cells()[..1], "w", &r, Mechanism::Noise, now(), 10);
        let minute = |v: &Value| v["per_minute"][0].clone();
        assert_eq!(minute(&one), minute(&a));
        // another window's cells (another processor, or this one after a restart) are other
        // questions: other noise, so two windows' answers do not subtract to an exact count
        let mut config = Config::default();
        config.release.epsilon_per_measure = 4.0;
        config.release.min_visitors = 5;
        let r = Release::new(&config, Arc::new(SecretKey::from_bytes([9; 32])), None);
        let this = released(&cells(), "w", &r, Mechanism::Noise, now(), 10);
        let other = released(&cells(), "v", &r, Mechanism::Noise, now(), 10);
        assert!(this["total"].is_object(), "shown at this ε: {this}");
        assert_ne!(this["total"], other["total"]);
    }
}
