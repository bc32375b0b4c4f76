//! The lease as the central Redis stores it (`id<TAB>epoch<TAB>az`) and the
//! competition's rule: the values the lease store, the elector and the worker share,
//! in a module of their own so that none of them depends on another for them.

/// Who holds the lease, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub id: String,
    pub epoch: u64,
    pub az: String,
}

impl Lease {
    pub(crate) fn parse(v: &str) -> Option<Lease> {
        let mut it = v.split('\t');
        Some(Lease {
            id: it.next()?.to_owned(),
            epoch: it.next()?.parse().ok()?,
            az: it.next()?.to_owned(),
        })
    }
    pub(crate) fn value(&self) -> String {
        format!("{}\t{}\t{}", self.id, self.epoch, self.az)
    }
}

/// The competition's rule: highest score wins, ties go to the lowest id.
pub(crate) fn pick_winner(alive: &[(String, f64)]) -> Option<String> {
    alive
        .iter()
        .max_by(|a, b| {
            a.1.partial_cmp(&b.1)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| b.0.cmp(&a.0))
        })
        .map(|(id, _)| id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_round_trips() {
        let l = Lease {
            id: "i-1".into(),
            epoch: 7,
            az: "eu-west-1a".into(),
        };
        assert_eq!(Lease::parse(&l.value()), Some(l));
        assert_eq!(Lease::parse("garbage"), None);
    }

    #[test]
    fn highest_live_score_wins_and_ties_go_to_the_lowest_id() {
        assert_eq!(pick_winner(&[]), None);
        assert_eq!(
            pick_winner(&[("b".into(), 5.0), ("a".into(), 9.0)]),
            Some("a".into())
        );
        assert_eq!(
            pick_winner(&[("b".into(), 9.0), ("a".into(), 9.0)]),
            Some("a".into())
        );
    }
}
