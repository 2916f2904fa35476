//! Sessions: a visitor's events with less than 30 minutes between them.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};

/// Inactivity that ends a session.
pub const SESSION_GAP_MINUTES: i64 = 30;

/// Tracks the open session of each `visitor_key`.
#[derive(Debug, Default)]
pub struct SessionTracker {
    /// Under a per-process random seed: visitor keys are keyed hashes nobody outside can choose.
    open: HashMap<String, (String, DateTime<Utc>), foldhash::fast::RandomState>,
}

impl SessionTracker {
    /// The session of an event by `visitor_key` at `ts`, opening a new one after a gap.
    pub fn session_id(&mut self, visitor_key: &str, ts: DateTime<Utc>) -> String {
        let gap = Duration::minutes(SESSION_GAP_MINUTES);
        if let Some((id, last)) = self.open.get_mut(visitor_key)
            && ts - *last < gap
            && *last - ts < gap
        {
            if ts > *last {
                *last = ts;
            }
            return id.clone();
        }
        let mut h = Sha256::new();
        h.update(visitor_key.as_bytes());
        h.update(ts.timestamp_micros().to_be_bytes());
        let id = marsad_privacy::pseudonym::lower_hex(&h.finalize()[..12]);
        self.open.insert(visitor_key.to_owned(), (id.clone(), ts));
        id
    }

    /// Continues a session stored before a restart, unless a later one is known.
    pub fn resume(&mut self, visitor_key: &str, session_id: &str, last: DateTime<Utc>) {
        match self.open.get(visitor_key) {
            Some((_, known)) if *known >= last => {}
            _ => {
                self.open.insert(visitor_key.to_owned(), (session_id.to_owned(), last));
            }
        }
    }

    /// Forgets sessions idle since before `now - gap`, bounding memory.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        let cutoff = now - Duration::minutes(SESSION_GAP_MINUTES);
        self.open.retain(|_, (_, last)| *last >= cutoff);
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_starts_a_new_session() {
        let mut s = SessionTracker::default();
        let t0 = Utc::now();
        let a = s.session_id("v1", t0);
        assert_eq!(s.session_id("v1", t0 + Duration::minutes(29)), a);
        assert_eq!(
            s.session_id("v1", t0 + Duration::minutes(50)),
            a,
            "29 min after the last event"
        );
        assert_ne!(s.session_id("v1", t0 + Duration::minutes(90)), a);
        assert_ne!(s.session_id("v2", t0), a);
    }

    #[test]
    fn a_resumed_session_continues_after_a_restart() {
        let mut s = SessionTracker::default();
        let t0 = Utc::now();
        s.resume("v1", "stored", t0);
        s.resume("v1", "older", t0 - Duration::minutes(5));
        assert_eq!(s.session_id("v1", t0 + Duration::minutes(10)), "stored");
    }
}
