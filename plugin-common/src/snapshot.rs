//! The last good set of services of a provider that re-reads a store on an interval:
//! shared by `redis-services` and `dynamodb-services`.
//!
//! Why these rules, the same for every store:
//! * A read is due at most once per interval, whatever asks (the host asks for the
//!   generation on every pass).
//! * A read that fails keeps the last good set: a read error never takes routes away.
//!   The first failure is to be said, and the recovery; the failures between are not.
//! * The generation moves only when what was read differs from the last read, so the
//!   host lists again only then.
//! * An entry that does not parse is to be warned about once; again only when what is
//!   wrong with it changes, or when it was fixed and broke again.
//!
//! The snapshot decides; the plugin says (its log lines name its own store).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use warden_plugin_api::ServiceDefinition;

/// Entries skipped: (the entry's key, what is wrong).
pub type Skipped = Vec<(String, String)>;

/// What a successful read changed, for the plugin to say.
#[derive(Debug, Default, PartialEq)]
pub struct Read {
    /// The store was failing before this read.
    pub recovered: bool,
    /// Entries skipped by this read that were not warned about before.
    pub newly_skipped: Skipped,
}

/// The services last read from a store whose raw content is `R`.
#[derive(Debug)]
pub struct Snapshot<R> {
    read_at: Option<Instant>,
    raw: Option<R>,
    services: Option<Vec<ServiceDefinition>>,
    generation: u64,
    failing: bool,
    warned: BTreeSet<(String, String)>,
}

impl<R> Default for Snapshot<R> {
    fn default() -> Self {
        Snapshot {
            read_at: None,
            raw: None,
            services: None,
            generation: 0,
            failing: false,
            warned: BTreeSet::new(),
        }
    }
}

impl<R: PartialEq> Snapshot<R> {
    /// Whether a read is due at `now`; when it is, it counts as started.
    pub fn due(&mut self, every: Duration, now: Instant) -> bool {
        if self
            .read_at
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return false;
        }
        self.read_at = Some(now);
        true
    }

    /// A read failed. `Some(services held)` the first time, to be said; `None` after.
    pub fn failed(&mut self) -> Option<usize> {
        if std::mem::replace(&mut self.failing, true) {
            return None;
        }
        Some(self.services.as_ref().map_or(0, Vec::len))
    }

    /// A read succeeded with `raw`; `parse` turns it into services and skipped entries,
    /// and is called only when `raw` differs from the last read.
    pub fn read(
        &mut self,
        raw: R,
        parse: impl FnOnce(&R) -> (Vec<ServiceDefinition>, Skipped),
    ) -> Read {
        let mut out = Read {
            recovered: std::mem::replace(&mut self.failing, false),
            ..Read::default()
        };
        if self.raw.as_ref() == Some(&raw) {
            return out;
        }
        let (services, skipped) = parse(&raw);
        let now_bad: BTreeSet<_> = skipped.into_iter().collect();
        out.newly_skipped = now_bad.difference(&self.warned).cloned().collect();
        self.warned = now_bad;
        self.raw = Some(raw);
        self.services = Some(services);
        self.generation += 1;
        out
    }

    /// The services, once a read has succeeded.
    pub fn services(&self) -> Option<&[ServiceDefinition]> {
        self.services.as_deref()
    }

    /// The generation, once a read has succeeded.
    pub fn generation(&self) -> Option<u64> {
        self.services.as_ref().map(|_| self.generation)
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;

    fn service(name: &str) -> ServiceDefinition {
        ServiceDefinition {
            name: name.into(),
            ..ServiceDefinition::default()
        }
    }

    /// Raw content: a list of (key, ok) entries.
    fn parse(raw: &Vec<(&'static str, bool)>) -> (Vec<ServiceDefinition>, Skipped) {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for (k, ok) in raw {
            if *ok {
                good.push(service(k));
            } else {
                bad.push((k.to_string(), "broken".to_string()));
            }
        }
        (good, bad)
    }

    #[test]
    fn a_read_is_due_once_per_interval() {
        let mut s = Snapshot::<Vec<(&str, bool)>>::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(2);
        assert!(s.due(every, t0));
        assert!(!s.due(every, t0 + Duration::from_millis(1999)));
        assert!(s.due(every, t0 + every));
    }

    #[test]
    fn nothing_is_served_before_the_first_good_read() {
        let mut s = Snapshot::<Vec<(&str, bool)>>::default();
        assert_eq!(s.failed(), Some(0));
        assert_eq!((s.services(), s.generation()), (None, None));
        let r = s.read(vec![("web", true)], parse);
        assert!(r.recovered);
        assert_eq!(s.services().unwrap().len(), 1);
        assert_eq!(s.generation(), Some(1));
    }

    #[test]
    fn a_failure_keeps_the_last_good_set_and_is_said_once() {
        let mut s = Snapshot::default();
        s.read(vec![("web", true), ("api", true)], parse);
        assert_eq!(s.failed(), Some(2));
        assert_eq!(s.failed(), None);
        assert_eq!(s.services().unwrap().len(), 2);
        assert_eq!(s.generation(), Some(1));
        let r = s.read(vec![("web", true), ("api", true)], parse);
        assert_eq!(
            r,
            Read {
                recovered: true,
                newly_skipped: vec![]
            }
        );
        // The same content read again: same generation, the parser not even called.
        assert_eq!(s.generation(), Some(1));
        s.read(vec![("web", true), ("api", true)], |_| unreachable!());
        assert_eq!(s.failed(), Some(2), "a new failure is said again");
    }

    #[test]
    fn a_skipped_entry_is_warned_once_and_again_after_it_was_fixed() {
        let mut s = Snapshot::default();
        let bad = vec![("web".to_string(), "broken".to_string())];
        let r = s.read(vec![("web", false), ("api", true)], parse);
        assert_eq!(r.newly_skipped, bad);
        // Another change elsewhere: web still broken the same way, not warned again.
        let r = s.read(vec![("web", false), ("api", true), ("b", true)], parse);
        assert!(r.newly_skipped.is_empty());
        assert_eq!(s.generation(), Some(2));
        // Fixed, then broken again: warned again.
        assert!(s.read(vec![("web", true)], parse).newly_skipped.is_empty());
        assert_eq!(s.read(vec![("web", false)], parse).newly_skipped, bad);
        assert_eq!(s.services().unwrap().len(), 0);
    }
}
