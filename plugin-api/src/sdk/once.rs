//! Saying a thing once, with a bound: a set of the messages already said, so that a
//! warning about one container or entry is logged once and not on every pass, that
//! forgets its oldest entry when full. The input is often someone else's (labels, keys):
//! without the bound, an attacker who makes new names makes the set grow for ever.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};

/// Messages already said, at most `capacity` of them (the oldest is forgotten first, and
/// may then be said again). Kept as 64-bit hashes, so a long message costs 8 bytes.
#[derive(Debug, Clone)]
pub struct SaidOnce {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl SaidOnce {
    /// A set that remembers at most `capacity` messages (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// True the first time `message` is given (and again once it has been forgotten).
    pub fn first(&mut self, message: &str) -> bool {
        let mut h = DefaultHasher::new();
        message.hash(&mut h);
        let key = h.finish();
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// How many messages it remembers now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Default for SaidOnce {
    /// Remembers 1024 messages.
    fn default() -> Self {
        Self::new(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_once_and_stays_bounded() {
        let mut s = SaidOnce::new(3);
        assert!(s.first("a"));
        assert!(!s.first("a"));
        for m in ["b", "c", "d", "e"] {
            assert!(s.first(m));
        }
        assert_eq!(s.len(), 3, "bounded");
        // "a" was forgotten first: it may be said again.
        assert!(s.first("a"));
        for i in 0..10_000 {
            s.first(&format!("attacker-{i}"));
        }
        assert_eq!(s.len(), 3);
    }
}
