//! Events worth telling users about, from comparing the status before and after a roll-up.
use crate::api::NodeTuningProfileStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::conditions::{self, Reason, Type};

/// Why an Event is published, as its `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventReason {
    /// Ready turned True with at least one node.
    Applied,
    /// Stalled turned True: some keys cannot be applied without a change.
    Degraded,
    /// Conflicted turned True: a higher-priority profile overrides some keys.
    Conflicted,
    /// The finalizer was released once every node restored.
    Restored,
    /// The finalizer was released at the timeout although nodes still listed the profile.
    FinalizerTimeout,
    /// The profile's selector matches no node (often a typo in a label).
    NoMatchingNodes,
    /// TimeWaitPressure turned True: a matched node's TIME_WAIT sockets reached the cap.
    TimeWaitPressure,
    /// A staged rollout: a new revision, a wave, its completion (Normal), a rollback or a
    /// pause on a tripped guard (Warning). See `controller::rollout`.
    RevisionCreated,
    RolloutWave,
    RolloutComplete,
    RolloutRolledBack,
    RolloutPaused,
}

impl EventReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "Applied",
            Self::Degraded => "Degraded",
            Self::Conflicted => "Conflicted",
            Self::Restored => "Restored",
            Self::FinalizerTimeout => "FinalizerTimeout",
            Self::NoMatchingNodes => "NoMatchingNodes",
            Self::TimeWaitPressure => "TimeWaitPressure",
            Self::RevisionCreated => "RevisionCreated",
            Self::RolloutWave => "RolloutWave",
            Self::RolloutComplete => "RolloutComplete",
            Self::RolloutRolledBack => "RolloutRolledBack",
            Self::RolloutPaused => "RolloutPaused",
        }
    }

    /// Whether the Event is a step of a staged rollout (counted in the controller's metrics).
    pub const fn is_rollout(self) -> bool {
        matches!(
            self,
            Self::RevisionCreated
                | Self::RolloutWave
                | Self::RolloutComplete
                | Self::RolloutRolledBack
                | Self::RolloutPaused
        )
    }

    /// Whether the Event is a Warning rather than Normal.
    pub const fn is_warning(self) -> bool {
        matches!(
            self,
            Self::Degraded
                | Self::Conflicted
                | Self::FinalizerTimeout
                | Self::NoMatchingNodes
                | Self::TimeWaitPressure
                | Self::RolloutRolledBack
                | Self::RolloutPaused
        )
    }
}

/// One Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub reason: EventReason,
    pub note: String,
}

/// Events for conditions that turned True between `old` and `new`: `Applied` (Ready, with at
/// least one node), `Degraded` (Stalled), `Conflicted`.
pub fn transitions(
    old: Option<&NodeTuningProfileStatus>,
    new: &NodeTuningProfileStatus,
) -> Vec<Transition> {
    let old = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let rising = |t: Type| conditions::became_true(old, &new.conditions, t);
    let mut out = Vec::new();
    if new.matched_nodes > 0
        && let Some(c) = rising(Type::Ready)
    {
        out.push(Transition {
            reason: EventReason::Applied,
            note: c.message.clone(),
        });
    }
    if let Some(c) = entered(old, &new.conditions, Reason::NoMatchingNodes) {
        out.push(Transition {
            reason: EventReason::NoMatchingNodes,
            note: c.message.clone(),
        });
    }
    if let Some(c) = rising(Type::Degraded) {
        out.push(Transition {
            reason: EventReason::Degraded,
            note: c.message.clone(),
        });
    }
    if let Some(c) = rising(Type::Conflicted) {
        out.push(Transition {
            reason: EventReason::Conflicted,
            note: c.message.clone(),
        });
    }
    if let Some(c) = rising(Type::TimeWaitPressure) {
        out.push(Transition {
            reason: EventReason::TimeWaitPressure,
            note: c.message.clone(),
        });
    }
    out
}

/// The Ready condition of `new` if its reason is `reason` and was not in `old`: a state entered
/// without Ready changing its status (as NoMatchingNodes, which is Ready=True).
fn entered<'n>(old: &[Condition], new: &'n [Condition], reason: Reason) -> Option<&'n Condition> {
    let was = conditions::find(old, Type::Ready).is_some_and(|c| c.reason == reason.as_str());
    conditions::find(new, Type::Ready).filter(|c| c.reason == reason.as_str() && !was)
}
