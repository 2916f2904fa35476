//! What leaves Marsad: every number the analyst and advertiser interfaces
//! release (reports, the dashboard, analyst SQL over HTTP and Postgres, CSV
//! exports) goes through here.
//!
//! The guarantee holds across queries, not per answer: the processor clamps
//! what one visitor adds to a rollup table per day (`process.max_events_per_visitor_day`,
//! C), so one visitor-day moves any sum of a table by at most C; each released
//! measure gets discrete Laplace noise of scale sensitivity / ε drawn from the
//! noise key and the canonical identity of its cell ([`cell::Cell`]), so the
//! same cell gets the same number by any path and averaging repeats buys
//! nothing; rows whose noisy visitor count is under the threshold are not
//! released at all (no complements, no count of what was held back); and each
//! key spends ε from a daily budget ([`budget::Ledger`]).
//!
//! Numbers over recent hours, where data still arrives, are keyed by the hour
//! they are asked in as well, and frozen for that hour: asking again within the
//! hour returns the same number even if an event arrived meanwhile, so
//! subtracting two answers does not reveal the events in between.

pub mod analyst_sql;
pub mod budget;
pub mod cell;
pub mod extent;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use marsad_config::{AnalystRelease, Config};
use marsad_privacy::keys::SecretKey;
use marsad_privacy::noise::{DiscreteLaplace, cell_noise};
use serde::Serialize;

use crate::error::ApiError;
pub use budget::{Balance, Ledger};
pub use cell::{Cell, Constraint, Hours};

/// Hours back from now in which data may still change (late events, the processor's lag).
const UNSETTLED_HOURS: i64 = 48;

/// The budget's name for a question asked at `now`: a question that reaches into the hours
/// still changing gets fresh noise every hour (see [`Release::release`]), so every hour it is
/// a new question and costs its ε again; a settled one costs once a day.
pub(crate) fn budget_identity(question: String, unsettled: bool, now: DateTime<Utc>) -> String {
    if unsettled {
        format!("{question}|asked-hour={}", now.timestamp().div_euclid(3600))
    } else {
        question
    }
}

/// Whether a question ending on `last_day` reaches into the hours still changing at `now`.
pub(crate) fn day_unsettled(last_day: chrono::NaiveDate, now: DateTime<Utc>) -> bool {
    let end = last_day
        .succ_opt()
        .unwrap_or(last_day)
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    end > now - chrono::Duration::hours(UNSETTLED_HOURS)
}
/// Frozen recent answers kept.
const FROZEN_ANSWERS: usize = 200_000;
/// Most a counted event can add to `session_seconds`: the session gap.
const SECONDS_PER_COUNTED_EVENT: u64 = 30 * 60;

/// How one answer is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Noise, threshold on the noisy visitors, budget.
    Noise,
    /// Exact numbers, rows under the threshold dropped (internal analysts only, by config).
    ThresholdOnly,
}

/// One released number and how exact it is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Released {
    /// The number.
    pub value: i64,
    /// Half-width of the interval that holds the true value 95 % of the time (0: exact).
    pub ci95: u64,
}

/// The release mechanism of one query service.
pub struct Release {
    analysts: Mechanism,
    noise_key: Arc<SecretKey>,
    epsilon: f64,
    epsilon_milli: u64,
    min_visitors: u64,
    clamp: u64,
    ledger: Ledger,
    frozen: Mutex<lru::LruCache<Vec<u8>, i64>>,
    /// Put before every cell's identity: empty for the query service; an e-mail's send names
    /// its own questions, so its noise is its own.
    namespace: Vec<u8>,
}

impl Release {
    /// The mechanism `config` sets, with its noise key and the budgets kept under `state_dir`.
    pub fn new(config: &Config, noise_key: Arc<SecretKey>, state_dir: Option<PathBuf>) -> Self {
        let epsilon = config.release.epsilon_per_measure;
        Release {
            analysts: match config.release.analysts {
                AnalystRelease::Noise => Mechanism::Noise,
                AnalystRelease::ThresholdOnly => Mechanism::ThresholdOnly,
            },
            noise_key,
            epsilon,
            epsilon_milli: ((epsilon * 1000.0).round() as u64).max(1),
            min_visitors: config.release.min_visitors,
            clamp: u64::from(config.process.max_events_per_visitor_day),
            ledger: Ledger::new(
                config.release.daily_epsilon,
                config
                    .query
                    .keys
                    .iter()
                    .filter_map(|k| k.daily_epsilon.map(|e| (k.name.clone(), e)))
                    .collect(),
                state_dir,
            ),
            frozen: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(FROZEN_ANSWERS).unwrap_or(NonZeroUsize::MIN),
            )),
            namespace: Vec::new(),
        }
    }

    /// This mechanism asking its questions under `namespace`: other noise than the same cells
    /// get anywhere else (an e-mail sent once, whose numbers no later answer may be
    /// subtracted from while the data still changes).
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = format!("{namespace}|").into_bytes();
        self
    }

    /// How analysts' answers are protected (advertisers always get [`Mechanism::Noise`]).
    pub fn for_analysts(&self) -> Mechanism {
        self.analysts
    }

    /// Rows with fewer (noisy) visitors are not released.
    pub fn min_visitors(&self) -> u64 {
        self.min_visitors
    }

    /// ε each released measure spends.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// How much one visitor-day can move a sum of `measure` (a rollup column, or `visitors`).
    pub fn sensitivity(&self, measure: &str) -> u64 {
        if measure.contains("session_seconds") {
            self.clamp * SECONDS_PER_COUNTED_EVENT
        } else {
            // counts are clamped to C per visitor-day; a visitor-day is in at most C cells
            self.clamp
        }
    }

    /// The noise distribution of `measure`.
    pub fn distribution(&self, measure: &str) -> DiscreteLaplace {
        DiscreteLaplace::new(self.sensitivity(measure) * 1000, self.epsilon_milli)
    }

    /// How much one visitor-day adds to the counted events of any table (C).
    pub fn clamp(&self) -> u64 {
        self.clamp
    }

    /// The noise of a live cell whose measure one visitor-day moves by `sensitivity` in all
    /// cells together: each event is in two releases (its slot, then its minute), at ε/2 each.
    pub fn live_distribution(&self, sensitivity: u64) -> DiscreteLaplace {
        DiscreteLaplace::new(sensitivity * 2000, self.epsilon_milli)
    }

    /// The noise of the live cell `identity`: the same every time it is asked.
    pub fn live_noise(&self, identity: &[u8], distribution: DiscreteLaplace) -> i64 {
        cell_noise(&self.noise_key, identity, distribution)
    }

    /// `truth` of `measure` over `cell`, as released by `mechanism` at `now`.
    pub fn release(
        &self,
        mechanism: Mechanism,
        cell: &Cell,
        measure: &str,
        truth: f64,
        now: DateTime<Utc>,
    ) -> Released {
        let exact = truth.round().max(0.0) as i64;
        if mechanism == Mechanism::ThresholdOnly {
            return Released { value: exact, ci95: 0 };
        }
        let mut identity = self.namespace.clone();
        identity.extend_from_slice(&cell.identity(measure));
        let unsettled = cell.hours().reaches_after(now, UNSETTLED_HOURS);
        if unsettled {
            identity.extend_from_slice(format!("|asked-hour={}", now.timestamp().div_euclid(3600)).as_bytes());
            if let Some(v) = self.frozen.lock().ok().and_then(|mut f| f.get(&identity).copied()) {
                return Released {
                    value: v,
                    ci95: self.distribution(measure).ci95(),
                };
            }
        }
        let distribution = self.distribution(measure);
        // consistency: a count is never negative
        let value = (exact + cell_noise(&self.noise_key, &identity, distribution)).max(0);
        if unsettled && let Ok(mut f) = self.frozen.lock() {
            f.put(identity, value);
        }
        Released {
            value,
            ci95: distribution.ci95(),
        }
    }

    /// Spends the ε of every question of one answer (`(identity, measures)`), all or none.
    pub fn charge_all(&self, key: &str, questions: &[(String, usize)], now: DateTime<Utc>) -> Result<f64, ApiError> {
        let questions: Vec<(&str, f64)> = questions
            .iter()
            .map(|(identity, measures)| (identity.as_str(), self.epsilon * *measures as f64))
            .collect();
        self.ledger
            .charge_all(key, &questions, now)
            .map_err(|e| ApiError::BudgetExhausted {
                remaining: e.remaining,
                needed: e.needed,
                retry_after: (e.refills_at - now).num_seconds().max(1) as u64,
            })
    }

    /// Spends the ε of `measures` released measures (the visitor count that decides which rows
    /// are shown is one) from `key`'s budget for the query `identity`; free if answered today.
    pub fn charge(&self, key: &str, identity: &str, measures: usize, now: DateTime<Utc>) -> Result<f64, ApiError> {
        self.ledger
            .charge(key, identity, self.epsilon * measures as f64, now)
            .map_err(|e| ApiError::BudgetExhausted {
                remaining: e.remaining,
                needed: e.needed,
                retry_after: (e.refills_at - now).num_seconds().max(1) as u64,
            })
    }

    /// `key`'s budget today.
    pub fn balance(&self, key: &str, now: DateTime<Utc>) -> Balance {
        self.ledger.balance(key, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release::new(&Config::default(), Arc::new(SecretKey::from_bytes([5; 32])), None)
    }

    #[test]
    fn a_settled_cell_gets_the_same_number_however_often_it_is_asked() {
        let r = release();
        let nov = Hours::days(
            chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap_or_default(),
            chrono::NaiveDate::from_ymd_opt(2026, 1, 31).unwrap_or_default(),
        );
        let cell = Cell::of("traffic_hourly").within(nov).with_value("country", Some("IQ"));
        let now = Utc::now();
        let first = r.release(Mechanism::Noise, &cell, "sum(events)", 37.0, now);
        for _ in 0..100 {
            assert_eq!(r.release(Mechanism::Noise, &cell, "sum(events)", 37.0, now), first);
        }
        assert!(first.ci95 > 0);
        let exact = r.release(Mechanism::ThresholdOnly, &cell, "sum(events)", 37.0, now);
        assert_eq!(exact, Released { value: 37, ci95: 0 });
    }

    #[test]
    fn a_recent_cell_is_frozen_within_the_hour_it_is_asked() {
        let r = release();
        let now = Utc::now();
        let today = Hours::days(now.date_naive(), now.date_naive());
        let cell = Cell::of("traffic_hourly")
            .within(today)
            .with_value("country", Some("IQ"));
        let before = r.release(Mechanism::Noise, &cell, "sum(events)", 37.0, now);
        // one more event arrives: the same hour's answer does not move by exactly one
        let after = r.release(Mechanism::Noise, &cell, "sum(events)", 38.0, now);
        assert_eq!(before, after);
    }

    #[test]
    fn a_namespace_asks_other_questions_and_none_is_the_query_service() {
        let settled = Hours::days(
            chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap_or_default(),
            chrono::NaiveDate::from_ymd_opt(2026, 1, 31).unwrap_or_default(),
        );
        let cell = Cell::of("traffic_hourly")
            .within(settled)
            .with_value("country", Some("IQ"));
        let now = Utc::now();
        let service = release().release(Mechanism::Noise, &cell, "sum(events)", 1000.0, now);
        let draws: Vec<i64> = (0..8)
            .map(|n| {
                release()
                    .in_namespace(&format!("email:weekly|sent-at={n}"))
                    .release(Mechanism::Noise, &cell, "sum(events)", 1000.0, now)
                    .value
            })
            .collect();
        // each send its own noise: not all the same, and not all the service's
        assert!(draws.iter().any(|&d| d != draws[0]), "{draws:?}");
        assert!(draws.iter().any(|&d| d != service.value), "{draws:?}");
        let again = release().release(Mechanism::Noise, &cell, "sum(events)", 1000.0, now);
        assert_eq!(again, service, "no namespace: the query service's numbers");
    }

    #[test]
    fn session_time_is_noised_at_its_own_sensitivity() {
        let r = release();
        assert_eq!(r.sensitivity("sum(events)"), 40);
        assert_eq!(r.sensitivity("sum(session_seconds)"), 40 * 1800);
        assert!(r.distribution("sum(session_seconds)").ci95() > r.distribution("visitors").ci95());
    }
}
