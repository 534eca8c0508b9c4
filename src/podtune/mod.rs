//! Tuning pods' network namespaces, the pure half: which pods a pod-targeting profile selects,
//! the keys each must hold, the conflicts with what pods set themselves, which recorded
//! originals to put back or drop, and the per-key summary for the report. No I/O: the agent
//! feeds it the pods on its node and executes each [`PodPlan`] inside that pod's namespace with
//! [`crate::plan::execute`], the step the host path uses, under the same cluster policy.
//!
//! A profile targets pods when `spec.podSelector` or `spec.namespaceSelector` is set
//! ([`crate::api::NodeTuningProfileSpec::targets_pods`]); the host merge
//! ([`crate::plan::merge`]) leaves such profiles out, so their keys never reach the host.
//!
//! **A pod's own `securityContext.sysctls` wins** over a profile. It is the workload owner's
//! explicit, per-pod choice; the kubelet already wrote it into the sandbox before any container
//! started, and the application may rely on it from its first connection. A profile is a
//! cluster-wide default chosen by the platform team; overriding the pod would change a running
//! workload behind its owner's back. The key is reported for that pod as a conflict (state
//! `Overridden`, naming the pod and both values), so the platform team sees it.
pub mod apply;
pub mod pod;
pub mod restore;
pub mod selection;
pub mod summary;

pub use pod::{PodInfo, PodInfoError, PodRef};
pub use restore::{HeldPodKey, PodNetns, RestoreDecision, restore_decisions};
pub use selection::{NodePodPlan, PodOwned, PodPlan, plan_pods};
pub use summary::{not_handled, summarise};
