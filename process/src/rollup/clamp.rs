//! The clamp: at most C events of one visitor a day count in a rollup table, so
//! adding or removing one visitor-day moves any number released from that table
//! by at most C (what the noise of released numbers is scaled to). `events`
//! keeps every event; only the rollups analysts and advertisers read are clamped.
//!
//! Visitor keys change every day by design, so the unit protected is a
//! visitor-day. Counts are kept for the latest two days (events arrive up to a
//! day late), as 8-byte prints of the visitor key.

use std::collections::BTreeMap;

use super::rows::{FastMap, MICROS_PER_DAY};

/// Counts of events admitted per visitor and day, for one rollup table.
#[derive(Debug)]
pub(crate) struct VisitorDayClamp {
    limit: u32,
    days: BTreeMap<i32, FastMap<u64, u32>>,
}

pub(super) fn visitor_print(visitor: &str) -> u64 {
    // visitor keys are keyed hashes in hex: their first 16 characters are 64 random bits
    match visitor.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok()) {
        Some(print) => print,
        None => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            visitor.hash(&mut h);
            h.finish()
        }
    }
}

impl VisitorDayClamp {
    /// At most `limit` events per visitor and day.
    pub(crate) fn new(limit: u32) -> Self {
        VisitorDayClamp {
            limit: limit.max(1),
            days: BTreeMap::new(),
        }
    }

    /// Whether one more event of `visitor` (its [`visitor_print`]) at `ts_micros` counts (and
    /// counts it). Events without a visitor (no cookie) are each a visitor of their own.
    pub(crate) fn admit(&mut self, ts_micros: i64, visitor: Option<u64>) -> bool {
        let Some(visitor) = visitor else {
            return true;
        };
        let day = ts_micros.div_euclid(MICROS_PER_DAY) as i32;
        if let Some((&latest, _)) = self.days.last_key_value()
            && day > latest
        {
            // a new day: forget all but the day before it
            self.days.retain(|d, _| *d >= day - 1);
        }
        let limit = self.limit;
        let count = self.count_of(day, visitor);
        if *count >= limit {
            return false;
        }
        *count += 1;
        true
    }

    /// Starts `visitor`'s count on `day` (days since 1970) at `events` (capped at the limit):
    /// what the table counted before a restart.
    pub(crate) fn preload(&mut self, day: i32, visitor: &str, events: u64) {
        let limit = self.limit;
        let count = self.count_of(day, visitor_print(visitor));
        *count = (*count).max(events.min(u64::from(limit)) as u32);
    }

    fn count_of(&mut self, day: i32, visitor: u64) -> &mut u32 {
        self.days.entry(day).or_default().entry(visitor).or_default()
    }

    /// Visitor-days followed now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.days.values().map(FastMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visitor_counts_at_most_the_limit_a_day() {
        let mut c = VisitorDayClamp::new(3);
        let v = Some(visitor_print("a1b2c3d4e5f60718293a4b5c6d7e8f90"));
        let day = 20_000 * MICROS_PER_DAY;
        let admitted = (0..10).filter(|_| c.admit(day, v)).count();
        assert_eq!(admitted, 3);
        assert!(c.admit(day + MICROS_PER_DAY, v), "a new day, a new visitor-day");
        assert!(
            c.admit(day, Some(visitor_print("ffffffffffffffff0000000000000000"))),
            "another visitor"
        );
        assert!((0..10).all(|_| c.admit(day, None)), "no cookie: each event its own");
        // two days later the first day is forgotten
        c.admit(day + 2 * MICROS_PER_DAY, v);
        assert_eq!(c.len(), 2, "the day before the latest and the latest");
        c.preload(20_003, "0123456789abcdef0000000000000000", 99);
        assert!(!c.admit(
            20_003 * MICROS_PER_DAY,
            Some(visitor_print("0123456789abcdef0000000000000000"))
        ));
    }
}
