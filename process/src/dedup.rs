//! Drops retried duplicates: a client that did not see an answer sends the
//! same `event_id` again, and it must be counted once.

use std::collections::{HashSet, VecDeque};

/// The most recent event ids, bounded by count (oldest forgotten first).
#[derive(Debug)]
pub struct RecentEventIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl RecentEventIds {
    /// Remembers at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        RecentEventIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records `id`; `false` if it was already seen.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() >= self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }

    /// Forgets `id` (its batch was not committed).
    pub fn remove(&mut self, id: &str) {
        if self.set.remove(id)
            && let Some(pos) = self.order.iter().rposition(|x| x == id)
        {
            self.order.remove(pos);
        }
    }

    /// Forgets the `n` ids remembered last (the buffered batch they belong to was dropped
    /// uncommitted and will be read again).
    pub fn forget_newest(&mut self, n: usize) {
        for _ in 0..n {
            match self.order.pop_back() {
                Some(id) => {
                    self.set.remove(&id);
                }
                None => break,
            }
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is remembered.
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
        assert!(r.insert("a"));
        assert!(!r.insert("a"));
        assert!(r.insert("b"));
        assert!(r.insert("c"));
        assert!(r.insert("a"), "forgotten after capacity");
        r.remove("a");
        assert!(r.insert("a"));
    }

    #[test]
    fn forgets_a_dropped_batch_and_nothing_older() {
        let mut r = RecentEventIds::new(10);
        for id in ["old-1", "old-2", "new-1", "new-2"] {
            assert!(r.insert(id));
        }
        r.forget_newest(2);
        assert!(r.insert("new-1") && r.insert("new-2"), "read again, counted again");
        assert!(!r.insert("old-1") && !r.insert("old-2"), "committed ids stay");
        r.forget_newest(100);
        assert!(r.is_empty());
    }
}
