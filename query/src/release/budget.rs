//! Each key's daily privacy budget: every answer spends ε from it, asking again
//! for something already answered today is free (it gets the same numbers),
//! and past the budget the key gets 429 until midnight UTC. Kept in memory and
//! in `<data_dir>/release/budget-<day>.json`, so a restart does not refill it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// What a key has spent today.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Account {
    /// ε spent.
    spent: f64,
    /// Queries answered (hex of their identity's hash): asking again costs nothing.
    answered: BTreeSet<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Day {
    day: Option<NaiveDate>,
    accounts: BTreeMap<String, Account>,
}

/// A charge that did not fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhausted {
    /// ε left today.
    pub remaining: f64,
    /// ε the answer needed.
    pub needed: f64,
    /// When the budget refills.
    pub refills_at: DateTime<Utc>,
}

/// A key's budget today.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Balance {
    /// ε per day.
    pub daily: f64,
    /// ε spent today.
    pub spent: f64,
    /// ε left today.
    pub remaining: f64,
    /// When it refills (midnight UTC).
    pub refills_at: DateTime<Utc>,
}

/// Every key's spending today.
pub struct Ledger {
    daily: f64,
    per_key: BTreeMap<String, f64>,
    dir: Option<PathBuf>,
    today: Mutex<Day>,
}

fn midnight_after(now: DateTime<Utc>) -> DateTime<Utc> {
    (now.date_naive() + chrono::Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
}

impl Ledger {
    /// `daily` ε per key (or the key's own in `per_key`), kept under `dir` (none: in memory only).
    pub fn new(daily: f64, per_key: BTreeMap<String, f64>, dir: Option<PathBuf>) -> Self {
        Ledger {
            daily,
            per_key,
            dir,
            today: Mutex::new(Day::default()),
        }
    }

    fn daily_of(&self, key: &str) -> f64 {
        self.per_key.get(key).copied().unwrap_or(self.daily)
    }

    fn path(&self, day: NaiveDate) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("budget-{day}.json")))
    }

    /// Today's accounts, read from disk at the first use of a day.
    fn roll_to(&self, day: &mut Day, today: NaiveDate) {
        if day.day == Some(today) {
            return;
        }
        *day = self
            .path(today)
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|bytes| serde_json::from_slice::<Day>(&bytes).ok())
            .filter(|d| d.day == Some(today))
            .unwrap_or(Day {
                day: Some(today),
                accounts: BTreeMap::new(),
            });
    }

    fn save(&self, day: &Day) {
        let (Some(today), Some(dir)) = (day.day, self.dir.as_ref()) else {
            return;
        };
        let Some(path) = self.path(today) else { return };
        let written = std::fs::create_dir_all(dir)
            .and_then(|_| serde_json::to_vec(day).map_err(std::io::Error::other))
            .and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path))
            });
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %path.display(), "could not keep the privacy budget on disk");
        }
        // yesterday's file holds nothing that counts any more
        if let Some(old) = self.path(today - chrono::Duration::days(1)) {
            let _ = std::fs::remove_file(old);
        }
    }

    /// Spends `epsilon` of `key`'s budget for the query `identity`, unless that query was
    /// answered for the key today already; returns the ε spent (0 for a repeat).
    pub fn charge(&self, key: &str, identity: &str, epsilon: f64, now: DateTime<Utc>) -> Result<f64, Exhausted> {
        self.charge_all(key, &[(identity, epsilon)], now)
    }

    /// Spends the ε of every question of one answer (`(identity, ε)`, repeats free), all or
    /// none: an answer refused for its second question has spent nothing on its first.
    pub fn charge_all(&self, key: &str, questions: &[(&str, f64)], now: DateTime<Utc>) -> Result<f64, Exhausted> {
        let mut day = match self.today.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.roll_to(&mut day, now.date_naive());
        let daily = self.daily_of(key);
        let account = day.accounts.entry(key.to_owned()).or_default();
        let mut new: Vec<&str> = Vec::new();
        let mut epsilon = 0.0;
        for (identity, e) in questions {
            if !account.answered.contains(*identity) && !new.contains(identity) {
                new.push(identity);
                epsilon += e;
            }
        }
        if new.is_empty() {
            return Ok(0.0);
        }
        if account.spent + epsilon > daily + 1e-9 {
            return Err(Exhausted {
                remaining: (daily - account.spent).max(0.0),
                needed: epsilon,
                refills_at: midnight_after(now),
            });
        }
        account.spent += epsilon;
        account.answered.extend(new.iter().map(|i| (*i).to_owned()));
        self.save(&day);
        Ok(epsilon)
    }

    /// What `key` has left today.
    pub fn balance(&self, key: &str, now: DateTime<Utc>) -> Balance {
        let mut day = match self.today.lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.roll_to(&mut day, now.date_naive());
        let spent = day.accounts.get(key).map_or(0.0, |a| a.spent);
        let daily = self.daily_of(key);
        Balance {
            daily,
            spent,
            remaining: (daily - spent).max(0.0),
            refills_at: midnight_after(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_of_several_questions_is_paid_whole_or_not_at_all() {
        let ledger = Ledger::new(10.0, BTreeMap::new(), None);
        let now = Utc::now();
        // a report compared with the period before: two questions of 6
        let refused = ledger.charge_all("ana", &[("now", 6.0), ("before", 6.0)], now);
        assert!(refused.is_err_and(|e| e.needed == 12.0));
        assert_eq!(ledger.balance("ana", now).spent, 0.0, "nothing spent on the first");
        assert_eq!(ledger.charge_all("ana", &[("now", 6.0)], now), Ok(6.0));
        // asked again with the comparison: only the new question costs, and it does not fit
        assert!(ledger.charge_all("ana", &[("now", 6.0), ("before", 6.0)], now).is_err());
        assert_eq!(ledger.charge_all("ana", &[("now", 6.0), ("now", 6.0)], now), Ok(0.0));
        assert_eq!(ledger.charge_all("ana", &[("now", 6.0), ("small", 4.0)], now), Ok(4.0));
        assert_eq!(ledger.balance("ana", now).spent, 10.0);
    }

    #[test]
    fn answers_spend_repeats_do_not_and_the_day_refills() {
        let dir = tempfile::tempdir().expect("tmp");
        let ledger = Ledger::new(
            3.0,
            BTreeMap::from([("carol".to_owned(), 1.0)]),
            Some(dir.path().to_owned()),
        );
        let now = Utc::now();
        assert_eq!(ledger.charge("ana", "q1", 2.0, now), Ok(2.0));
        assert_eq!(ledger.charge("ana", "q1", 2.0, now), Ok(0.0), "the same question again");
        let refused = ledger.charge("ana", "q2", 2.0, now).expect_err("over budget");
        assert_eq!(refused.remaining, 1.0);
        assert_eq!(ledger.charge("bob", "q2", 2.0, now), Ok(2.0), "each key its own budget");
        assert!(
            ledger.charge("carol", "q2", 2.0, now).is_err(),
            "a key's own smaller budget"
        );
        // a restart reads what was spent
        let again = Ledger::new(3.0, BTreeMap::new(), Some(dir.path().to_owned()));
        assert_eq!(again.balance("ana", now).spent, 2.0);
        assert!(again.charge("ana", "q3", 2.0, now).is_err());
        // tomorrow it refills
        let tomorrow = now + chrono::Duration::days(1);
        assert_eq!(again.charge("ana", "q3", 2.0, tomorrow), Ok(2.0));
    }
}
