//! The scaling decision: metric → mapped task count → policy → desired count. Pure, so
//! every rule is a unit test; its state is serialisable so that it lives in the central
//! Redis and a new leader inherits it (scale-down stabilisation survives a failover).
//!
//! A metric failure is never read as zero (KEDA's most reported bug): the count is held,
//! and after `failure_threshold` consecutive failures the configured fallback applies.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a metric value becomes a task count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    /// Rows of (lower bound, tasks): the row with the greatest bound ≤ the value applies;
    /// a value below every bound maps to 0. (The seed's mapping files.)
    Table(Vec<(f64, u32)>),
    /// desired = ceil(metric / target).
    TargetPerTask(f64),
    /// Mapped by a metric-source plugin's `map` operation (`[metrics.<name>]`, for
    /// example an `s3-table` instance); the manager maps before deciding.
    Plugin(String),
}

impl Mapping {
    pub fn map(&self, v: f64) -> u32 {
        match self {
            Mapping::Table(rows) => rows
                .iter()
                .filter(|(lower, _)| *lower <= v)
                .max_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal))
                .map_or(0, |(_, n)| *n),
            Mapping::TargetPerTask(t) => (v / t).ceil().clamp(0.0, u32::MAX as f64) as u32,
            // Already mapped by the plugin: the value is the task count.
            Mapping::Plugin(_) => v.ceil().clamp(0.0, u32::MAX as f64) as u32,
        }
    }

    /// Checks a table: bounds finite and strictly increasing. The error names the row.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Mapping::Table(rows) => {
                if rows.is_empty() {
                    return Err("table: no rows".into());
                }
                for (i, w) in rows.windows(2).enumerate() {
                    if w[1].0.partial_cmp(&w[0].0) != Some(std::cmp::Ordering::Greater) {
                        return Err(format!(
                            "table row {}: lower bound {} is not above the previous row's {}",
                            i + 2,
                            w[1].0,
                            w[0].0
                        ));
                    }
                }
                if let Some((i, _)) = rows.iter().enumerate().find(|(_, r)| !r.0.is_finite()) {
                    return Err(format!("table row {}: lower bound is not a number", i + 1));
                }
                Ok(())
            }
            Mapping::TargetPerTask(t) if !(t.is_finite() && *t > 0.0) => {
                Err(format!("target_per_task: {t} is not a positive number"))
            }
            Mapping::TargetPerTask(_) => Ok(()),
            Mapping::Plugin(name) if name.trim().is_empty() => {
                Err("plugin: expected a [metrics.<name>]".into())
            }
            Mapping::Plugin(_) => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    Hold,
    Fixed(u32),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    /// Relative change ignored (HPA's default 0.1).
    pub tolerance: f64,
    /// A scale-down takes the highest recommendation of this window (HPA: 300 s).
    pub scale_down_window_secs: u64,
    /// Largest change per loop (0: no limit).
    pub max_step: u32,
    /// No action within this long after the last one.
    pub cooldown_secs: u64,
    /// Consecutive metric failures before the fallback applies.
    pub failure_threshold: u32,
    pub fallback: Fallback,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min: 0,
            max: 100,
            tolerance: 0.1,
            scale_down_window_secs: 300,
            max_step: 0,
            cooldown_secs: 0,
            failure_threshold: 3,
            fallback: Fallback::Hold,
        }
    }
}

/// What the policy remembers between loops (kept in the central Redis).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct PolicyState {
    /// (time ms, recommended count) within the scale-down window.
    pub recommendations: Vec<(u64, u32)>,
    pub last_action_ms: Option<u64>,
    pub consecutive_failures: u32,
    /// Actions taken so far (any leader): part of the RunTask clientToken, so a successor
    /// repeating a step its predecessor took without recording it derives the same token.
    #[serde(default)]
    pub actions: u64,
    /// The leader's epoch that counted `consecutive_failures`.
    #[serde(default)]
    pub failures_epoch: u64,
}

impl PolicyState {
    /// The state as the leader of `epoch` counts from: the failures another leader
    /// counted (an earlier process, or another host's instance of the metric source)
    /// say nothing of this one's, so a new epoch counts its own from 0. The rest (the
    /// scale-down window, the last action, the action count of the RunTask token)
    /// carries over: those are the service's, not the leader's.
    pub(crate) fn for_epoch(mut self, epoch: u64) -> PolicyState {
        if self.failures_epoch != epoch {
            self.consecutive_failures = 0;
            self.failures_epoch = epoch;
        }
        self
    }
}

/// What a decision does to the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Action {
    Hold,
    ScaleUp,
    ScaleDown,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Hold => "hold",
            Action::ScaleUp => "scale-up",
            Action::ScaleDown => "scale-down",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy's answer. The metric read and its mapping input are kept by the caller
/// (the decision record has them apart); `mapped` is the task count the mapping gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Decision {
    pub mapped: Option<u32>,
    pub clamped: Option<u32>,
    pub current: u32,
    pub desired: u32,
    pub action: Action,
    pub reason: String,
}

fn action(current: u32, desired: u32) -> Action {
    match desired.cmp(&current) {
        std::cmp::Ordering::Greater => Action::ScaleUp,
        std::cmp::Ordering::Less => Action::ScaleDown,
        std::cmp::Ordering::Equal => Action::Hold,
    }
}

/// Decides the desired count. `metric` is the reading or why there is none.
pub(crate) fn decide(
    metric: Result<f64, String>,
    current: u32,
    now_ms: u64,
    mapping: &Mapping,
    p: &Policy,
    st: &mut PolicyState,
) -> Decision {
    let value = match metric {
        Ok(v) if v.is_finite() => {
            st.consecutive_failures = 0;
            v
        }
        other => {
            let why = other
                .err()
                .unwrap_or_else(|| "metric is not a finite number".into());
            return on_failure(why, current, p, st);
        }
    };
    let mapped = mapping.map(value);
    let clamped = mapped.clamp(p.min, p.max.max(p.min));
    let window = Duration::from_secs(p.scale_down_window_secs).as_millis() as u64;
    st.recommendations
        .retain(|(t, _)| now_ms.saturating_sub(*t) < window);
    st.recommendations.push((now_ms, clamped));
    let mut why = vec![format!("metric {value} maps to {mapped}")];
    if clamped != mapped {
        why.push(format!("clamped to [{}, {}]: {clamped}", p.min, p.max));
    }
    let mut desired = clamped;
    if clamped < current {
        desired = stabilised(clamped, current, p, st, &mut why);
    }
    desired = tolerated(desired, current, p, &mut why);
    desired = step_limited(desired, current, p, &mut why);
    desired = cooled_down(desired, current, now_ms, p, st, &mut why);
    Decision {
        mapped: Some(mapped),
        clamped: Some(clamped),
        current,
        desired,
        action: action(current, desired),
        reason: why.join("; "),
    }
}

/// No reading: hold until `failure_threshold` failures in a row, then the fallback.
fn on_failure(why: String, current: u32, p: &Policy, st: &mut PolicyState) -> Decision {
    st.consecutive_failures += 1;
    let hold = |reason: String| Decision {
        mapped: None,
        clamped: None,
        current,
        desired: current,
        action: Action::Hold,
        reason,
    };
    if st.consecutive_failures < p.failure_threshold {
        return hold(format!(
            "metric failed ({why}); holding ({} of {} failures)",
            st.consecutive_failures, p.failure_threshold
        ));
    }
    match p.fallback {
        Fallback::Hold => hold(format!(
            "metric failed {} times ({why}); fallback: hold",
            st.consecutive_failures
        )),
        Fallback::Fixed(n) => {
            let desired = n.clamp(p.min, p.max);
            Decision {
                mapped: None,
                clamped: Some(desired),
                current,
                desired,
                action: action(current, desired),
                reason: format!(
                    "metric failed {} times ({why}); fallback: fixed {n}",
                    st.consecutive_failures
                ),
            }
        }
    }
}

/// A scale-down goes only as low as the highest recommendation of the window.
fn stabilised(
    clamped: u32,
    current: u32,
    p: &Policy,
    st: &PolicyState,
    why: &mut Vec<String>,
) -> u32 {
    let highest = st
        .recommendations
        .iter()
        .map(|r| r.1)
        .max()
        .unwrap_or(clamped);
    if highest > clamped {
        why.push(format!(
            "scale-down stabilised at {highest} (highest of the last {}s)",
            p.scale_down_window_secs
        ));
    }
    highest.min(current)
}

/// A change within the tolerance of the current count is none (when both are within
/// bounds).
fn tolerated(desired: u32, current: u32, p: &Policy, why: &mut Vec<String>) -> u32 {
    let in_bounds = |n: u32| n >= p.min && n <= p.max;
    let within = current > 0
        && (desired as f64 - current as f64).abs() / current as f64 <= p.tolerance
        && in_bounds(desired)
        && in_bounds(current);
    if desired != current && within {
        why.push(format!("within tolerance {} of {current}", p.tolerance));
        return current;
    }
    desired
}

/// At most `max_step` tasks more or fewer a loop (0: no limit).
fn step_limited(desired: u32, current: u32, p: &Policy, why: &mut Vec<String>) -> u32 {
    if p.max_step == 0 || desired.abs_diff(current) <= p.max_step {
        return desired;
    }
    why.push(format!("step limited to {}", p.max_step));
    if desired > current {
        current + p.max_step
    } else {
        current - p.max_step
    }
}

/// No change within `cooldown_secs` of the last action.
fn cooled_down(
    desired: u32,
    current: u32,
    now_ms: u64,
    p: &Policy,
    st: &PolicyState,
    why: &mut Vec<String>,
) -> u32 {
    let Some(last) = st.last_action_ms.filter(|_| desired != current) else {
        return desired;
    };
    let since = now_ms.saturating_sub(last);
    if since < p.cooldown_secs * 1000 {
        why.push(format!("cooldown: last action {}s ago", since / 1000));
        return current;
    }
    desired
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Mapping {
        Mapping::Table(vec![(0.0, 1), (2.0, 3), (5.0, 6), (10.0, 12)])
    }

    #[test]
    fn table_and_target_mappings() {
        let t = table();
        assert_eq!(t.map(-1.0), 0);
        assert_eq!(t.map(0.0), 1);
        assert_eq!(t.map(4.9), 3);
        assert_eq!(t.map(5.0), 6);
        assert_eq!(t.map(1e9), 12);
        assert_eq!(Mapping::TargetPerTask(10.0).map(31.0), 4);
        assert_eq!(Mapping::TargetPerTask(10.0).map(0.0), 0);
    }

    #[test]
    fn bad_tables_name_the_row() {
        assert!(Mapping::Table(vec![(0.0, 1), (5.0, 2), (5.0, 3)])
            .validate()
            .unwrap_err()
            .contains("row 3"));
        assert!(Mapping::Table(vec![]).validate().is_err());
        assert!(Mapping::TargetPerTask(0.0).validate().is_err());
        table().validate().unwrap();
    }

    #[test]
    fn scale_up_is_immediate_and_clamped() {
        let p = Policy {
            max: 10,
            ..Policy::default()
        };
        let mut st = PolicyState::default();
        let d = decide(Ok(50.0), 2, 0, &table(), &p, &mut st);
        assert_eq!(
            (d.mapped, d.clamped, d.desired, d.action),
            (Some(12), Some(10), 10, Action::ScaleUp)
        );
    }

    #[test]
    fn a_metric_failure_holds_and_then_falls_back() {
        let p = Policy {
            failure_threshold: 2,
            fallback: Fallback::Fixed(4),
            ..Policy::default()
        };
        let mut st = PolicyState::default();
        let d = decide(Err("timeout".into()), 7, 0, &table(), &p, &mut st);
        assert_eq!(
            (d.desired, d.action.as_str()),
            (7, "hold"),
            "never read as zero"
        );
        let d = decide(Err("timeout".into()), 7, 1000, &table(), &p, &mut st);
        assert_eq!(d.desired, 4);
        let d = decide(
            Ok(f64::NAN),
            7,
            2000,
            &table(),
            &Policy::default(),
            &mut PolicyState::default(),
        );
        assert_eq!(d.desired, 7);
        // A good reading resets the count.
        decide(Ok(5.0), 6, 3000, &table(), &p, &mut st);
        assert_eq!(st.consecutive_failures, 0);
    }

    #[test]
    fn scale_down_takes_the_highest_recommendation_of_the_window() {
        let p = Policy {
            scale_down_window_secs: 300,
            ..Policy::default()
        };
        let mut st = PolicyState::default();
        assert_eq!(decide(Ok(10.0), 12, 0, &table(), &p, &mut st).desired, 12);
        // The metric drops: still 12 within the window...
        let d = decide(Ok(0.0), 12, 100_000, &table(), &p, &mut st);
        assert_eq!((d.desired, d.action), (12, Action::Hold), "{}", d.reason);
        // ...and the window's highest falls as old recommendations age out.
        assert_eq!(
            decide(Ok(0.0), 12, 301_000, &table(), &p, &mut st).desired,
            1
        );
    }

    #[test]
    fn tolerance_step_and_cooldown() {
        let p = Policy {
            scale_down_window_secs: 0,
            tolerance: 0.1,
            ..Policy::default()
        };
        let m = Mapping::TargetPerTask(1.0);
        assert_eq!(
            decide(Ok(21.0), 20, 0, &m, &p, &mut PolicyState::default()).desired,
            20,
            "5% is within tolerance"
        );
        assert_eq!(
            decide(Ok(23.0), 20, 0, &m, &p, &mut PolicyState::default()).desired,
            23
        );
        let p = Policy {
            max_step: 3,
            scale_down_window_secs: 0,
            ..Policy::default()
        };
        assert_eq!(
            decide(Ok(30.0), 20, 0, &m, &p, &mut PolicyState::default()).desired,
            23
        );
        assert_eq!(
            decide(Ok(10.0), 20, 0, &m, &p, &mut PolicyState::default()).desired,
            17
        );
        let p = Policy {
            cooldown_secs: 60,
            scale_down_window_secs: 0,
            ..Policy::default()
        };
        let mut st = PolicyState {
            last_action_ms: Some(0),
            ..Default::default()
        };
        assert_eq!(decide(Ok(40.0), 20, 30_000, &m, &p, &mut st).desired, 20);
        assert_eq!(decide(Ok(40.0), 20, 61_000, &m, &p, &mut st).desired, 40);
    }

    #[test]
    fn failures_counted_by_another_leader_are_not_carried_over() {
        let old = PolicyState {
            recommendations: vec![(1, 4)],
            last_action_ms: Some(7),
            consecutive_failures: 2,
            actions: 9,
            failures_epoch: 3,
        };
        let same = old.clone().for_epoch(3);
        assert_eq!(same, old, "the same leader keeps counting");
        let next = old.clone().for_epoch(4);
        assert_eq!(next.consecutive_failures, 0);
        assert_eq!(next.failures_epoch, 4);
        assert_eq!(
            (next.recommendations, next.last_action_ms, next.actions),
            (old.recommendations.clone(), old.last_action_ms, old.actions)
        );
        // A failure after the change counts 1 of the threshold, not 3.
        let mut st = old.for_epoch(4);
        let d = decide(
            Err("down".into()),
            2,
            10,
            &Mapping::TargetPerTask(1.0),
            &Policy::default(),
            &mut st,
        );
        assert!(d.reason.contains("(1 of 3 failures)"), "{}", d.reason);
    }
}
