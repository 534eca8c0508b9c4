//! Performs a pass [`Plan`]: the API writes, in the plan's order. A failing write fails that
//! object only; the others still go, and the errors come back for the backoff and metrics.
//! What succeeded is recorded in the term's [`Memory`].
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use serde_json::json;

use super::metrics::Metrics;
use super::plan::{
    AppliedDaemonSet, FinalizerPatch, Memory, Plan, Release, ReleaseCause, WrittenStatus,
};
use super::render::{AGENT_NODE_LABEL, DAEMONSET_NAME};
use super::rollup::EventReason;
use super::{ControllerError, FIELD_MANAGER};
use crate::api::NodeTuningProfile;

/// Node label patches in flight at once.
const LABEL_CONCURRENCY: usize = 16;
/// Longest Event note.
const MAX_EVENT_NOTE: usize = 1000;

/// Params of non-apply patches, still attributed to the controller's field manager.
fn manager() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// The API handles a pass writes through.
pub struct Executor {
    pub profiles: Api<NodeTuningProfile>,
    pub nodes: Api<Node>,
    pub daemonsets: Api<DaemonSet>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Executor {
    /// Perform `plan`; returns the errors met, one per failed object.
    pub async fn execute(&self, plan: Plan, memory: &mut Memory) -> Vec<ControllerError> {
        let mut errors = Vec::new();
        memory.statuses.retain(|name, _| plan.live.contains(name));

        for patch in &plan.add_finalizers {
            if let Err(e) = self.patch_finalizers(patch).await {
                errors.push(ControllerError::api("add_finalizer", &patch.profile, e));
            }
        }

        if let Some(ds) = plan.daemonset {
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match self
                .daemonsets
                .patch(DAEMONSET_NAME, &params, &Patch::Apply(&ds.object))
                .await
            {
                Ok(applied) => {
                    tracing::info!(generation = ?applied.metadata.generation, "applied the agent DaemonSet");
                    self.metrics.daemonset_applied();
                    memory.daemonset = Some(AppliedDaemonSet {
                        rendered: ds.rendered,
                        generation: applied.metadata.generation,
                    });
                }
                Err(e) => errors.push(ControllerError::api("apply_daemonset", DAEMONSET_NAME, e)),
            }
        }

        for (profile, e) in &plan.labels.selector_errors {
            tracing::debug!(%profile, error = %e, "selector cannot be evaluated");
        }
        errors.extend(self.apply_labels(&plan.labels).await);

        for _ in 0..plan.statuses_unchanged {
            self.metrics.status_skipped();
        }
        for s in plan.statuses {
            let patch = json!({ "status": s.status });
            match self
                .profiles
                .patch_status(&s.profile, &manager(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.metrics.status_written();
                    for t in &s.events {
                        self.publish(&s.object, t.reason, "Rollup", t.note.clone())
                            .await;
                    }
                    memory.statuses.insert(
                        s.profile,
                        WrittenStatus {
                            uid: s.uid,
                            resource_version: s.resource_version,
                            status: s.status,
                        },
                    );
                }
                Err(e) => errors.push(ControllerError::api("patch_status", s.profile, e)),
            }
        }

        for r in &plan.releases {
            if let Err(e) = self.release(r).await {
                errors.push(e);
            }
        }
        errors
    }

    async fn patch_finalizers(&self, patch: &FinalizerPatch) -> Result<(), kube::Error> {
        self.profiles
            .patch(
                &patch.profile,
                &PatchParams::default(),
                &Patch::Merge(patch.body()),
            )
            .await
            .map(|_| ())
    }

    async fn apply_labels(&self, plan: &super::labels::LabelPlan) -> Vec<ControllerError> {
        let add = plan.label.iter().map(|n| (n.clone(), true));
        let remove = plan.unlabel.iter().map(|n| (n.clone(), false));
        futures::stream::iter(add.chain(remove))
            .map(|(node, on)| async move {
                let result = if on {
                    // Server-side apply of this one label: the controller owns exactly that field.
                    let patch = json!({
                        "apiVersion": "v1",
                        "kind": "Node",
                        "metadata": {"name": node, "labels": {AGENT_NODE_LABEL: "true"}},
                    });
                    self.nodes
                        .patch(
                            &node,
                            &PatchParams::apply(FIELD_MANAGER).force(),
                            &Patch::Apply(&patch),
                        )
                        .await
                } else {
                    // A merge patch with null removes the label whoever set it (an SSA apply
                    // without it would only drop it while this manager is its sole owner).
                    let patch = json!({"metadata": {"labels": {AGENT_NODE_LABEL: null}}});
                    self.nodes
                        .patch(&node, &manager(), &Patch::Merge(&patch))
                        .await
                };
                match result {
                    Ok(_) => {
                        if on {
                            self.metrics.labelled();
                        } else {
                            self.metrics.unlabelled();
                        }
                        tracing::info!(%node, agent = on, "node label");
                        Ok(())
                    }
                    // The node is gone: nothing to label.
                    Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
                    Err(e) => Err(ControllerError::api(
                        if on { "label_node" } else { "unlabel_node" },
                        node,
                        e,
                    )),
                }
            })
            .buffer_unordered(LABEL_CONCURRENCY)
            .filter_map(|r| futures::future::ready(r.err()))
            .collect()
            .await
    }

    async fn release(&self, r: &Release) -> Result<(), ControllerError> {
        let timed_out = matches!(r.cause, ReleaseCause::TimedOut { .. });
        if timed_out {
            // Said before the release: once released, the object may be gone.
            self.publish(
                &r.object,
                EventReason::FinalizerTimeout,
                "Release",
                r.note.clone(),
            )
            .await;
        }
        self.patch_finalizers(&r.patch)
            .await
            .map_err(|e| ControllerError::api("remove_finalizer", &r.patch.profile, e))?;
        self.metrics.finalizer_released(timed_out);
        tracing::info!(profile = %r.patch.profile, timed_out, "released the cleanup finalizer");
        if !timed_out {
            self.publish(&r.object, EventReason::Restored, "Release", r.note.clone())
                .await;
        }
        Ok(())
    }

    /// Publish an Event; a failure is logged and counted, never fatal.
    async fn publish(
        &self,
        object: &ObjectReference,
        reason: EventReason,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.as_str().into(),
            note: Some(crate::text::truncate(note, MAX_EVENT_NOTE)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, object).await {
            self.metrics.error("event");
            tracing::warn!(error = %e, reason = reason.as_str(), "publishing an event failed");
        }
    }
}
