//! Events worth telling users about, from comparing the status before and after a roll-up.
use crate::api::NodeTuningProfileStatus;
use crate::conditions::{self, Type};

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
}

impl EventReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "Applied",
            Self::Degraded => "Degraded",
            Self::Conflicted => "Conflicted",
            Self::Restored => "Restored",
            Self::FinalizerTimeout => "FinalizerTimeout",
        }
    }

    /// Whether the Event is a Warning rather than Normal.
    pub const fn is_warning(self) -> bool {
        matches!(
            self,
            Self::Degraded | Self::Conflicted | Self::FinalizerTimeout
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
    out
}
