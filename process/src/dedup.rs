//! Drops retried duplicates: a client that did not see an answer sends the
//! same `event_id` again, and it must be counted once.
//!
//! An event's identity is its visitor and its `event_id` together, so two
//! clients that happen to reuse an id do not drop each other's events. Ids
//! are remembered as 128-bit keyed fingerprints, not strings: a fixed 16 bytes
//! each however long the client made the id, under a key drawn at start, so
//! nobody outside can craft an id that collides with another visitor's.

use std::collections::HashSet;

use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher13};

/// A fixed-size keyed fingerprint of an event's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(u128);

/// Turns identities into [`Fingerprint`]s under a key of this process.
#[derive(Clone)]
pub struct Fingerprinter {
    k0: u64,
    k1: u64,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter(…)")
    }
}

impl Default for Fingerprinter {
    fn default() -> Self {
        Self::random()
    }
}

impl Fingerprinter {
    /// A fingerprinter under a fresh random key.
    pub fn random() -> Self {
        Fingerprinter {
            k0: rand::random(),
            k1: rand::random(),
        }
    }

    /// The fingerprint of one visitor's event `event_id` (`visitor` absent for events
    /// without a cookie: their ids are compared among themselves).
    pub fn event(&self, visitor: Option<&str>, event_id: &str) -> Fingerprint {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        match visitor {
            Some(v) => {
                h.write(&(v.len() as u64).to_le_bytes());
                h.write(v.as_bytes());
            }
            None => h.write(&u64::MAX.to_le_bytes()),
        }
        h.write(event_id.as_bytes());
        Fingerprint(h.finish128().as_u128())
    }
}

/// The most recent events seen, bounded by count (oldest forgotten first), as fingerprints.
///
/// A ring of fingerprints in arrival order and an open-addressing index into it (linear
/// probing, deletion by backward shift, so no tombstones pile up): both are sized once from
/// the capacity, 16 + about 5 bytes per event, and never grow or rehash however long the
/// processor runs.
pub struct RecentEventIds {
    keys: Fingerprinter,
    /// Fingerprints, circular once full: the oldest at `start`.
    ring: Vec<u128>,
    start: usize,
    len: usize,
    capacity: usize,
    /// Ring position + 1 of the fingerprint homed near each slot; 0 is empty.
    slots: Vec<u32>,
    mask: usize,
}

impl std::fmt::Debug for RecentEventIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecentEventIds")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl RecentEventIds {
    /// Remembers at most `capacity` events (at most `u32::MAX - 1`).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, u32::MAX as usize - 1);
        // at most three quarters full, so probes stay short
        let slots = (capacity + capacity / 3 + 1).next_power_of_two().max(16);
        RecentEventIds {
            keys: Fingerprinter::random(),
            ring: Vec::with_capacity(capacity),
            start: 0,
            len: 0,
            capacity,
            // zeroed memory is mapped lazily: untouched slots cost no resident memory
            slots: vec![0; slots],
            mask: slots - 1,
        }
    }

    /// Records the event `event_id` of `visitor`; `false` if it was already seen.
    pub fn insert(&mut self, visitor: Option<&str>, event_id: &str) -> bool {
        let print = self.keys.event(visitor, event_id).0;
        if self.find(print).is_some() {
            return false;
        }
        if self.len == self.capacity {
            let oldest = self.ring[self.start];
            self.unindex(oldest);
            self.start = (self.start + 1) % self.capacity;
            self.len -= 1;
        }
        let position = (self.start + self.len) % self.capacity;
        if position == self.ring.len() {
            self.ring.push(print);
        } else {
            self.ring[position] = print;
        }
        self.len += 1;
        let mut slot = self.home(print);
        while self.slots[slot] != 0 {
            slot = (slot + 1) & self.mask;
        }
        self.slots[slot] = position as u32 + 1;
        true
    }

    /// Forgets the `n` events remembered last (the buffered batch they belong to was dropped
    /// uncommitted and will be read again).
    pub fn forget_newest(&mut self, n: usize) {
        for _ in 0..n.min(self.len) {
            let newest = self.ring[(self.start + self.len - 1) % self.capacity];
            self.unindex(newest);
            self.len -= 1;
        }
    }

    /// Events remembered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn home(&self, print: u128) -> usize {
        // fingerprints are keyed hashes: their low bits are as good as any hash of them
        (print as usize) & self.mask
    }

    /// The slot indexing `print`, if it is remembered.
    fn find(&self, print: u128) -> Option<usize> {
        let mut slot = self.home(print);
        loop {
            match self.slots[slot] {
                0 => return None,
                p if self.ring[p as usize - 1] == print => return Some(slot),
                _ => slot = (slot + 1) & self.mask,
            }
        }
    }

    /// Removes `print` from the index, moving later entries of its probe run back into the gap.
    fn unindex(&mut self, print: u128) {
        let Some(mut gap) = self.find(print) else {
            return;
        };
        let mut next = gap;
        loop {
            next = (next + 1) & self.mask;
            let p = self.slots[next];
            if p == 0 {
                break;
            }
            let home = self.home(self.ring[p as usize - 1]);
            // the entry at `next` may fill the gap unless its home lies cyclically in (gap, next]
            let home_after_gap = if gap <= next {
                gap < home && home <= next
            } else {
                gap < home || home <= next
            };
            if !home_after_gap {
                self.slots[gap] = p;
                gap = next;
            }
        }
        self.slots[gap] = 0;
    }
}

/// A set of events (visitor and event id) as fingerprints, for example the rows a catch-up is
/// about to count.
#[derive(Debug, Default)]
pub struct IdFingerprints {
    keys: Fingerprinter,
    set: HashSet<Fingerprint>,
}

impl IdFingerprints {
    /// Adds the event `event_id` of `visitor`.
    pub fn insert(&mut self, visitor: Option<&str>, event_id: &str) {
        self.set.insert(self.keys.event(visitor, event_id));
    }

    /// Whether the event `event_id` of `visitor` was added.
    pub fn contains(&self, visitor: Option<&str>, event_id: &str) -> bool {
        !self.set.is_empty() && self.set.contains(&self.keys.event(visitor, event_id))
    }

    /// Ids held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_capacity() {
        let mut r = RecentEventIds::new(2);
        assert!(r.insert(Some("v"), "a"));
        assert!(!r.insert(Some("v"), "a"));
        assert!(r.insert(Some("v"), "b"));
        assert!(r.insert(Some("v"), "c"));
        assert!(r.insert(Some("v"), "a"), "forgotten after capacity");
    }

    #[test]
    fn two_visitors_may_reuse_an_id() {
        let mut r = RecentEventIds::new(10);
        assert!(r.insert(Some("visitor-1"), "e-1"));
        assert!(r.insert(Some("visitor-2"), "e-1"), "another visitor's event");
        assert!(r.insert(None, "e-1"), "an event without a visitor");
        assert!(!r.insert(Some("visitor-2"), "e-1"), "a retry");
        assert!(!r.insert(None, "e-1"), "a retry without a visitor");
        // the visitor and the id are not merely concatenated
        assert!(r.insert(Some("ab"), "c") && r.insert(Some("a"), "bc"));
    }

    #[test]
    fn forgets_a_dropped_batch_and_nothing_older() {
        let mut r = RecentEventIds::new(10);
        for id in ["old-1", "old-2", "new-1", "new-2"] {
            assert!(r.insert(Some("v"), id));
        }
        r.forget_newest(2);
        assert!(
            r.insert(Some("v"), "new-1") && r.insert(Some("v"), "new-2"),
            "read again, counted again"
        );
        assert!(
            !r.insert(Some("v"), "old-1") && !r.insert(Some("v"), "old-2"),
            "committed ids stay"
        );
        r.forget_newest(100);
        assert!(r.is_empty());
    }

    proptest::proptest! {
        /// The ring and its index behave as a queue and a set would, through evictions,
        /// dropped batches and wrap-arounds.
        #[test]
        fn behaves_like_a_bounded_queue_and_a_set(
            capacity in 1usize..40,
            ops in proptest::collection::vec((0u8..10, 0u16..60), 1..400),
        ) {
            let mut ids = RecentEventIds::new(capacity);
            let mut model: std::collections::VecDeque<u16> = std::collections::VecDeque::new();
            for (op, id) in ops {
                if op == 0 {
                    let n = usize::from(id % 5);
                    ids.forget_newest(n);
                    for _ in 0..n.min(model.len()) {
                        model.pop_back();
                    }
                } else {
                    let fresh = !model.contains(&id);
                    proptest::prop_assert_eq!(ids.insert(Some("v"), &id.to_string()), fresh, "id {}", id);
                    if fresh {
                        if model.len() == capacity {
                            model.pop_front();
                        }
                        model.push_back(id);
                    }
                }
                proptest::prop_assert_eq!(ids.len(), model.len());
                for probe in 0u16..60 {
                    let print = ids.keys.event(Some("v"), &probe.to_string()).0;
                    proptest::prop_assert_eq!(ids.find(print).is_some(), model.contains(&probe), "probe {}", probe);
                }
            }
        }
    }

    #[test]
    fn fingerprints_depend_on_the_key() {
        let (a, b) = (Fingerprinter::random(), Fingerprinter::random());
        assert_eq!(a.event(Some("v"), "e"), a.event(Some("v"), "e"));
        assert_ne!(a.event(Some("v"), "e"), b.event(Some("v"), "e"));
        let mut ids = IdFingerprints::default();
        ids.insert(Some("v"), "e-1");
        assert!(ids.contains(Some("v"), "e-1") && !ids.contains(Some("v"), "e-2") && !ids.contains(None, "e-1"));
    }
}
