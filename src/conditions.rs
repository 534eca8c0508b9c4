//! The one vocabulary of the conditions nodetune writes, on profiles (controller) and reports
//! (agent), and the helpers both sides share: building a condition with its transition time
//! carried over, and comparing statuses without timestamps.
//!
//! The types follow the kstatus conventions that `kubectl wait`, Flux and Argo CD read:
//! `Ready` (True when done), `Reconciling` (True while rolling out) and `Stalled` (True when it
//! cannot finish without a change), each with `observedGeneration`. `Degraded` and `Conflicted`
//! carry detail.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::text;

/// Longest condition message; longer lists end with "and N more".
pub const MAX_MESSAGE: usize = 1024;

/// A condition type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Type {
    /// The object reached its desired state.
    Ready,
    /// Work is under way (nodes have not reported the current generation).
    Reconciling,
    /// It cannot finish without a change (a key is refused on some node, a selector is invalid).
    Stalled,
    /// Which keys fail, and where.
    Degraded,
    /// Which keys another profile overrides.
    Conflicted,
    /// TIME_WAIT sockets at or near `tcp_max_tw_buckets`, or being destroyed early. A warning:
    /// it never makes an object un-Ready (the tuning is applied; the load is the node's).
    TimeWaitPressure,
    /// Report: the host's boot-time sysctl configuration sets a profile key to another value
    /// (informational, not an error).
    HostConfigDiffers,
}

impl Type {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Reconciling => "Reconciling",
            Self::Stalled => "Stalled",
            Self::Degraded => "Degraded",
            Self::Conflicted => "Conflicted",
            Self::TimeWaitPressure => "TimeWaitPressure",
            Self::HostConfigDiffers => "HostConfigDiffers",
        }
    }
}

/// A condition reason (CamelCase, as the API conventions want).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Profile: every matched node applied the current generation.
    Applied,
    /// Profile in DryRun: every matched node evaluated the current generation.
    Evaluated,
    NoMatchingNodes,
    InvalidSelector,
    NodesFailed,
    NodesPending,
    AllNodesReported,
    /// Some keys are Unsupported, Invalid, Denied or Failed.
    KeysFailed,
    NoFailures,
    KeysOverridden,
    NoConflicts,
    /// Report: every key the node should hold is applied (or evaluated).
    AllKeysApplied,
    /// Report: the ledger of original values cannot be used; nothing new is written.
    LedgerUnusable,
    /// Report: no profile selects the node any more; its agent stopped and the report is no
    /// longer updated (its TCP counts are cleared rather than left to look live).
    AgentWithdrawn,
    /// Profile or report: TIME_WAIT sockets at or near `tcp_max_tw_buckets`, or the kernel
    /// destroying them early (`TCPTimeWaitOverflow` rising).
    TimeWaitPressure,
    /// Profile or report: TIME_WAIT well below the cap.
    TimeWaitHeadroom,
    /// Report: a boot-time sysctl file sets a profile key to another value.
    BootValuesDiffer,
    /// Report: no boot-time sysctl file sets a profile key to another value.
    MatchesHostConfig,
    /// Profile: a staged rollout is sending a revision out in waves.
    RollingOut,
    /// Profile: a staged rollout is paused (by the user, or by a guard).
    RolloutPaused,
    /// Profile: a guard tripped and the rollout went back to the stable revision.
    RolledBack,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "Applied",
            Self::Evaluated => "Evaluated",
            Self::NoMatchingNodes => "NoMatchingNodes",
            Self::InvalidSelector => "InvalidSelector",
            Self::NodesFailed => "NodesFailed",
            Self::NodesPending => "NodesPending",
            Self::AllNodesReported => "AllNodesReported",
            Self::KeysFailed => "KeysFailed",
            Self::NoFailures => "NoFailures",
            Self::KeysOverridden => "KeysOverridden",
            Self::NoConflicts => "NoConflicts",
            Self::AllKeysApplied => "AllKeysApplied",
            Self::LedgerUnusable => "LedgerUnusable",
            Self::AgentWithdrawn => "AgentWithdrawn",
            Self::TimeWaitPressure => "TimeWaitPressure",
            Self::TimeWaitHeadroom => "TimeWaitHeadroom",
            Self::BootValuesDiffer => "BootValuesDiffer",
            Self::MatchesHostConfig => "MatchesHostConfig",
            Self::RollingOut => "RollingOut",
            Self::RolloutPaused => "RolloutPaused",
            Self::RolledBack => "RolledBack",
        }
    }
}

/// Builds the conditions of one status: stamps `observedGeneration`, bounds messages and keeps
/// the `lastTransitionTime` of a condition whose status did not change since `previous`.
pub struct Builder<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Timestamp,
}

impl<'a> Builder<'a> {
    pub fn new(previous: &'a [Condition], generation: Option<i64>, now: Timestamp) -> Self {
        Self {
            previous,
            generation,
            now,
        }
    }

    pub fn make(&self, type_: Type, status: bool, reason: Reason, message: String) -> Condition {
        let status = status_str(status);
        let last_transition_time = find(self.previous, type_)
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(self.now));
        Condition {
            type_: type_.as_str().into(),
            status: status.into(),
            reason: reason.as_str().into(),
            message: text::truncate(message, MAX_MESSAGE),
            observed_generation: self.generation,
            last_transition_time,
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// The condition of `type_`, if present.
pub fn find(conditions: &[Condition], type_: Type) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == type_.as_str())
}

/// Whether the condition of `type_` is present with status True.
pub fn is_true(conditions: &[Condition], type_: Type) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The condition of `type_` in `new` if it is True there and was not True in `old`.
pub fn became_true<'n>(
    old: &[Condition],
    new: &'n [Condition],
    type_: Type,
) -> Option<&'n Condition> {
    find(new, type_).filter(|c| c.status == "True" && !is_true(old, type_))
}

/// Keep the transition time of conditions whose status did not change, as Kubernetes expects.
pub fn carry_transition_times(old: &[Condition], new: &mut [Condition]) {
    for c in new.iter_mut() {
        if let Some(p) = old
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
        {
            c.last_transition_time = p.last_transition_time.clone();
        }
    }
}

/// Blank every transition time, for comparisons that must ignore timestamps.
pub fn blank_timestamps(conditions: &mut [Condition]) {
    for c in conditions {
        c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).expect("timestamp")
    }

    #[test]
    fn transition_time_carries_over_only_while_the_status_holds() {
        let first = Builder::new(&[], Some(1), at(100));
        let old = vec![first.make(Type::Ready, false, Reason::NodesPending, "wait".into())];
        let same = Builder::new(&old, Some(2), at(200)).make(
            Type::Ready,
            false,
            Reason::NodesPending,
            "still".into(),
        );
        assert_eq!(same.last_transition_time, Time(at(100)));
        assert_eq!(same.observed_generation, Some(2));
        let flipped = Builder::new(&old, Some(2), at(300)).make(
            Type::Ready,
            true,
            Reason::Applied,
            "".into(),
        );
        assert_eq!(flipped.last_transition_time, Time(at(300)));
        assert_eq!(flipped.reason, "Applied");
    }

    #[test]
    fn messages_are_bounded() {
        let c = Builder::new(&[], None, at(1)).make(
            Type::Degraded,
            true,
            Reason::KeysFailed,
            "x".repeat(5000),
        );
        assert!(c.message.len() <= MAX_MESSAGE);
        assert!(c.message.ends_with('…'));
    }

    #[test]
    fn became_true_sees_only_rising_edges() {
        let b = Builder::new(&[], None, at(1));
        let off = vec![b.make(Type::Stalled, false, Reason::NoFailures, "".into())];
        let on = vec![b.make(Type::Stalled, true, Reason::KeysFailed, "k".into())];
        assert!(became_true(&off, &on, Type::Stalled).is_some());
        assert!(became_true(&[], &on, Type::Stalled).is_some());
        assert!(became_true(&on, &on, Type::Stalled).is_none());
        assert!(became_true(&on, &off, Type::Stalled).is_none());
        assert!(is_true(&on, Type::Stalled) && !is_true(&off, Type::Stalled));
    }

    #[test]
    fn carry_and_blank() {
        let old = vec![Builder::new(&[], None, at(5)).make(
            Type::Ready,
            true,
            Reason::Applied,
            "".into(),
        )];
        let mut new = vec![Builder::new(&[], None, at(9)).make(
            Type::Ready,
            true,
            Reason::Applied,
            "".into(),
        )];
        carry_transition_times(&old, &mut new);
        assert_eq!(new[0].last_transition_time, Time(at(5)));
        blank_timestamps(&mut new);
        assert_eq!(new[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
    }
}
