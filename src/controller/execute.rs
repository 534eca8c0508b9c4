//! Performs a pass [`Plan`]: the API writes, in the plan's order. A failing write fails that
//! object only; the others still go, and the errors come back for the backoff and metrics.
//! What succeeded is recorded in the term's [`TermMemory`].
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
    AppliedDaemonSet, FinalizerPatch, Plan, Release, ReleaseCause, TermMemory, WrittenStatus,
};
use super::render::{AGENT_NODE_LABEL, DAEMONSET_NAME};
use super::rollup::EventReason;
use super::{ControllerError, FIELD_MANAGER};
use crate::api::NodeTuningProfile;

/// Node label patches in flight at once.
const LABEL_CONCURRENCY: usize = 16;
/// Profile status patches in flight at once: a pass writes one per changed profile, rarely
/// more than a few; the bound keeps a pass over hundreds of profiles from flooding the API
/// server's priority-and-fairness queue.
const STATUS_CONCURRENCY: usize = 8;
/// Longest Event note.
const MAX_EVENT_NOTE: usize = 1000;

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
    #[cfg(test)]
    pub async fn execute(&self, plan: Plan, memory: &mut TermMemory) -> Vec<ControllerError> {
        self.execute_seen(plan, memory, None).await
    }

    /// [`Self::execute`], for a plan that took in report changes first seen at `seen`: each
    /// status patch records the controller's own latency from there (metrics).
    pub async fn execute_seen(
        &self,
        plan: Plan,
        memory: &mut TermMemory,
        seen: Option<std::time::Instant>,
    ) -> Vec<ControllerError> {
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
        for _ in 0..plan.statuses_unchanged {
            self.metrics.status_skipped();
        }
        // Labels and statuses go out together: a status does not depend on any label, and
        // when thousands of nodes need the label (a new profile, a controller's first pass at
        // 20,000 nodes) the statuses no longer wait behind every node's patch.
        let (label_errors, (status_errors, written)) = tokio::join!(
            self.apply_labels(&plan.labels),
            self.write_statuses(plan.statuses, memory, seen)
        );
        errors.extend(label_errors);
        errors.extend(status_errors);
        // Only after the status holding a wave is written (see `write_assignments`).
        errors.extend(self.write_assignments(&plan.rollout, &written).await);

        for r in &plan.releases {
            if let Err(e) = self.release(r).await {
                errors.push(e);
            }
        }
        errors
    }

    /// The status patches, [`STATUS_CONCURRENCY`] at a time, each followed by its Events;
    /// remembered once written. A pass has one patch per profile and passes do not overlap, so
    /// a profile's patches still go out in order; a slow answer for one profile no longer holds
    /// back the others (on a loaded API server each round trip took 0.4–2.2 s, and the last
    /// of ten profiles waited for the nine before it).
    async fn write_statuses(
        &self,
        statuses: Vec<super::plan::StatusPatch>,
        memory: &mut TermMemory,
        seen: Option<std::time::Instant>,
    ) -> (Vec<ControllerError>, std::collections::BTreeSet<String>) {
        let answers: Vec<_> = futures::stream::iter(statuses)
            .map(|s| async move {
                let answer = self.write_status(&s, seen).await;
                (s, answer)
            })
            .buffer_unordered(STATUS_CONCURRENCY)
            .collect()
            .await;
        let mut errors = Vec::new();
        let mut written = std::collections::BTreeSet::new();
        for (s, answer) in answers {
            match answer {
                Ok(()) => {
                    written.insert(s.profile.clone());
                    memory.statuses.insert(
                        s.profile,
                        WrittenStatus {
                            uid: s.uid,
                            resource_version: s.resource_version,
                            status: s.status,
                            written_at: s.written_at,
                        },
                    );
                }
                Err(e) => errors.push(ControllerError::api("patch_status", s.profile, e)),
            }
        }
        (errors, written)
    }

    /// One status patch, then its Events once it is written.
    async fn write_status(
        &self,
        s: &super::plan::StatusPatch,
        seen: Option<std::time::Instant>,
    ) -> Result<(), kube::Error> {
        let patch = json!({ "status": s.status });
        let sent = self.metrics.status_patch_sending(seen);
        self.profiles
            .patch_status(
                &s.profile,
                &super::writes::manager(FIELD_MANAGER),
                &Patch::Merge(&patch),
            )
            .await?;
        self.metrics.status_patched(sent.elapsed());
        self.metrics.status_written();
        for t in &s.events {
            if t.reason.is_rollout() {
                self.metrics.rollout_step(t.reason.as_str());
            }
            self.publish(&s.object, t.reason, "Rollup", t.note.clone())
                .await;
        }
        Ok(())
    }

    /// The rollout revisions of the profiles whose status was written, on their Nodes (one
    /// merge patch per node). A profile whose status failed keeps the old assignments: its
    /// next pass decides again from the status the API server holds.
    async fn write_assignments(
        &self,
        writes: &super::plan::RolloutWrites,
        written: &std::collections::BTreeSet<String>,
    ) -> Vec<ControllerError> {
        use crate::api::rollout::REVISIONS_ANNOTATION;
        let mut per_node: std::collections::BTreeMap<
            &str,
            std::collections::BTreeMap<String, Option<i64>>,
        > = Default::default();
        for (profile, nodes) in writes
            .by_profile
            .iter()
            .filter(|(p, _)| written.contains(*p))
        {
            for (node, revision) in nodes {
                per_node
                    .entry(node)
                    .or_default()
                    .insert(profile.clone(), *revision);
            }
        }
        for (node, gone) in &writes.forget {
            per_node.entry(node).or_default().extend(gone.clone());
        }
        let mut errors = Vec::new();
        for (node, updates) in per_node {
            let value = super::rollout::wiring::annotation_value(writes.held.get(node), &updates);
            let patch = json!({"metadata": {"annotations": {REVISIONS_ANNOTATION: value}}});
            if let Err(e) = self
                .nodes
                .patch_metadata(
                    node,
                    &super::writes::manager(FIELD_MANAGER),
                    &Patch::Merge(&patch),
                )
                .await
            {
                errors.push(ControllerError::api("assign_revision", node, e));
            }
        }
        errors
    }

    async fn patch_finalizers(&self, patch: &FinalizerPatch) -> Result<(), kube::Error> {
        patch.send(&self.profiles, FIELD_MANAGER).await
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
                        .map(|_| ())
                } else {
                    super::writes::unlabel_node(&self.nodes, &node, FIELD_MANAGER).await
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
                    Err(e) if super::writes::is_not_found(&e) => Ok(()),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kube::runtime::events::Reporter;
    use serde_json::json;

    use super::*;
    use crate::api::NodeTuningProfileStatus;
    use crate::controller::labels::LabelPlan;
    use crate::controller::plan::StatusPatch;
    use crate::controller::rollup::Transition;
    use crate::mock_api::{self, APPLY, MERGE, MockApi};

    const PROFILES: &str = "/apis/nodetune.dev/v1alpha1/nodetuningprofiles";
    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

    fn executor() -> (Executor, MockApi) {
        let (client, api) = mock_api::client();
        let executor = Executor {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: FIELD_MANAGER.into(),
                    instance: None,
                },
            ),
            profiles: Api::all(client.clone()),
            nodes: Api::all(client.clone()),
            daemonsets: Api::namespaced(client, "nodetune-system"),
            metrics: Arc::new(Metrics::default()),
        };
        (executor, api)
    }

    fn object(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("nodetune.dev/v1alpha1".into()),
            kind: Some("NodeTuningProfile".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    fn status_patch(name: &str, events: Vec<Transition>) -> StatusPatch {
        StatusPatch {
            profile: name.into(),
            object: object(name),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("7".into()),
            status: NodeTuningProfileStatus {
                observed_generation: Some(3),
                matched_nodes: 1,
                ..Default::default()
            },
            events,
            written_at: k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        }
    }

    fn release(name: &str, cause: ReleaseCause) -> Release {
        Release {
            patch: FinalizerPatch {
                profile: name.into(),
                resource_version: Some("9".into()),
                finalizers: vec!["other/keep".into()],
            },
            object: object(name),
            cause,
            note: "every node restored".into(),
        }
    }

    /// A profile as the API server returns it from a patch.
    fn profile_json(name: &str) -> serde_json::Value {
        serde_json::to_value(NodeTuningProfile::test(name)).expect("json")
    }

    /// The next request must create an Event (echoed back, as the server does); returns it.
    async fn expect_event(api: &mut MockApi) -> mock_api::Seen {
        api.respond(|s| {
            assert_eq!((s.method.as_str(), s.path()), ("POST", EVENTS), "{}", s.uri);
            (201, s.body.clone())
        })
        .await
    }

    /// Runs `plan` from empty memory while `drive` plays the API server; the errors and what
    /// the executor remembered.
    async fn execute_with(
        executor: Executor,
        plan: Plan,
        drive: impl std::future::Future<Output = ()>,
    ) -> (Vec<ControllerError>, TermMemory) {
        let run = async move {
            let mut memory = TermMemory::default();
            let errors = executor.execute(plan, &mut memory).await;
            (errors, memory)
        };
        let (out, ()) = tokio::join!(run, drive);
        out
    }

    fn live(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn statuses_do_not_wait_behind_node_labels_and_record_their_latency() {
        let (executor, mut api) = executor();
        let metrics = executor.metrics.clone();
        let plan = Plan {
            labels: LabelPlan {
                label: ["n1".to_string()].into(),
                ..Default::default()
            },
            statuses: vec![status_patch("web", vec![])],
            live: live(&["web"]),
            ..Default::default()
        };
        let mut memory = TermMemory::default();
        let seen = std::time::Instant::now();
        let run = async move {
            let errors = executor.execute_seen(plan, &mut memory, Some(seen)).await;
            (errors, memory)
        };
        let drive = async {
            let (label, held) = api.hold().await;
            assert_eq!(
                (label.method.as_str(), label.path()),
                ("PATCH", "/api/v1/nodes/n1")
            );
            // The node's patch is still in flight: the status goes out anyway.
            api.expect(
                "PATCH",
                &format!("{PROFILES}/web/status"),
                200,
                profile_json("web"),
            )
            .await;
            held.answer(
                200,
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
            );
            api.expect_silence().await;
        };
        let ((errors, memory), ()) = tokio::join!(run, drive);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(memory.statuses.contains_key("web"));
        let text = metrics.render();
        assert!(
            text.contains("nodetune_controller_report_to_status_patch_seconds_count 1\n"),
            "{text}"
        );
        assert!(text.contains("nodetune_controller_status_patch_duration_seconds_count 1\n"));
    }

    #[tokio::test]
    async fn writes_go_out_in_plan_order_with_the_right_verbs() {
        let (executor, mut api) = executor();
        let plan = Plan {
            add_finalizers: vec![FinalizerPatch {
                profile: "fresh".into(),
                resource_version: Some("7".into()),
                finalizers: vec![crate::controller::finalizer::FINALIZER.into()],
            }],
            statuses: vec![status_patch(
                "web",
                vec![Transition {
                    reason: EventReason::Applied,
                    note: "applied on all 1 node".into(),
                }],
            )],
            releases: vec![release("old", ReleaseCause::AllRestored)],
            live: live(&["fresh", "web", "old"]),
            ..Default::default()
        };
        let drive = async {
            // The finalizer patch is a merge patch pinned to the resourceVersion it was read at.
            let s = api
                .expect(
                    "PATCH",
                    &format!("{PROFILES}/fresh"),
                    200,
                    profile_json("fresh"),
                )
                .await;
            assert_eq!(s.content_type, MERGE);
            assert_eq!(
                s.body,
                json!({"metadata": {"resourceVersion": "7", "finalizers": ["nodetune.dev/cleanup"]}})
            );
            // The status goes to the /status subresource, then its Event.
            let s = api
                .expect(
                    "PATCH",
                    &format!("{PROFILES}/web/status"),
                    200,
                    profile_json("web"),
                )
                .await;
            assert_eq!(s.content_type, MERGE);
            assert_eq!(s.body["status"]["observedGeneration"], 3);
            assert!(s.has_query("fieldManager=nodetune-controller"), "{}", s.uri);
            let e = expect_event(&mut api).await;
            assert_eq!(e.body["reason"], "Applied");
            assert_eq!(e.body["type"], "Normal");
            assert_eq!(e.body["regarding"]["name"], "web");
            // The release keeps other finalizers, is pinned too, and is told with a Restored Event.
            let s = api
                .expect(
                    "PATCH",
                    &format!("{PROFILES}/old"),
                    200,
                    profile_json("old"),
                )
                .await;
            assert_eq!(
                s.body,
                json!({"metadata": {"resourceVersion": "9", "finalizers": ["other/keep"]}})
            );
            let e = expect_event(&mut api).await;
            assert_eq!(e.body["reason"], "Restored");
            api.expect_silence().await;
        };
        let (errors, memory) = execute_with(executor, plan, drive).await;
        assert!(errors.is_empty(), "{errors:?}");
        let written = memory.statuses.get("web").expect("remembered");
        assert_eq!(written.resource_version.as_deref(), Some("7"));
    }

    #[tokio::test]
    async fn labels_are_added_by_apply_and_removed_by_merge_null_and_a_missing_node_is_fine() {
        let (executor, mut api) = executor();
        let plan = Plan {
            labels: LabelPlan {
                label: ["n1".to_string()].into(),
                unlabel: ["n2".to_string(), "gone".to_string()].into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let drive = async {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let s = api
                    .respond(|s| {
                        if s.path().ends_with("/gone") {
                            (404, json!({}))
                        } else {
                            (200, json!({}))
                        }
                    })
                    .await;
                seen.push(s);
            }
            api.expect_silence().await;
            let by_node = |n: &str| {
                seen.iter()
                    .find(|s| s.path() == format!("/api/v1/nodes/{n}"))
                    .unwrap_or_else(|| panic!("no request for {n}: {seen:?}"))
            };
            let add = by_node("n1");
            assert_eq!(
                (add.method.as_str(), add.content_type.as_str()),
                ("PATCH", APPLY)
            );
            assert!(
                add.has_query("force=true") && add.has_query("fieldManager=nodetune-controller")
            );
            assert_eq!(add.body["metadata"]["labels"]["nodetune.dev/agent"], "true");
            for n in ["n2", "gone"] {
                let rm = by_node(n);
                assert_eq!(rm.content_type, MERGE);
                assert_eq!(
                    rm.body,
                    json!({"metadata": {"labels": {"nodetune.dev/agent": null}}})
                );
            }
        };
        let (errors, _) = execute_with(executor, plan, drive).await;
        assert!(errors.is_empty(), "404 is not an error: {errors:?}");
    }

    /// Issue 21: a pass sent its status patches one after the other, so on a loaded API
    /// server the last profile's status waited for every round trip before it. Now the second
    /// patch goes out while the first is unanswered; each profile's Event still follows its
    /// own patch, and both are remembered.
    #[tokio::test]
    async fn a_pass_sends_its_status_patches_side_by_side() {
        let (executor, mut api) = executor();
        let created = || {
            vec![Transition {
                reason: EventReason::Degraded,
                note: "a key failed".into(),
            }]
        };
        let plan = Plan {
            statuses: vec![
                status_patch("db", created()),
                status_patch("web", created()),
            ],
            live: live(&["db", "web"]),
            ..Default::default()
        };
        let drive = async {
            let (first, first_held) = api.hold().await;
            let (second, second_held) = api.hold().await;
            let mut paths = [first.path(), second.path()];
            paths.sort();
            assert_eq!(
                paths,
                [
                    format!("{PROFILES}/db/status"),
                    format!("{PROFILES}/web/status")
                ],
                "both patches in flight before either is answered"
            );
            // Answered in reverse order: the later one's Event does not wait for the other.
            second_held.answer(200, profile_json("web"));
            let ev = expect_event(&mut api).await;
            assert_eq!(ev.body["reason"], "Degraded");
            first_held.answer(200, profile_json("db"));
            expect_event(&mut api).await;
            api.expect_silence().await;
        };
        let (errors, memory) = execute_with(executor, plan, drive).await;
        assert!(errors.is_empty(), "{errors:?}");
        assert!(memory.statuses.contains_key("db") && memory.statuses.contains_key("web"));
    }

    #[tokio::test]
    async fn one_failed_write_does_not_stop_the_others_and_is_not_remembered() {
        let (executor, mut api) = executor();
        let plan = Plan {
            statuses: vec![status_patch("bad", vec![]), status_patch("good", vec![])],
            releases: vec![release(
                "old",
                ReleaseCause::TimedOut {
                    holdouts: vec!["n9".into()],
                },
            )],
            live: live(&["bad", "good", "old"]),
            ..Default::default()
        };
        let drive = async {
            api.expect("PATCH", &format!("{PROFILES}/bad/status"), 500, json!({}))
                .await;
            api.expect(
                "PATCH",
                &format!("{PROFILES}/good/status"),
                200,
                profile_json("good"),
            )
            .await;
            // A timed-out release is announced first (a Warning), then released.
            let e = expect_event(&mut api).await;
            assert_eq!(
                (e.body["reason"].as_str(), e.body["type"].as_str()),
                (Some("FinalizerTimeout"), Some("Warning"))
            );
            api.expect("PATCH", &format!("{PROFILES}/old"), 409, json!({}))
                .await;
            api.expect_silence().await;
        };
        let (errors, memory) = execute_with(executor, plan, drive).await;
        let labels: Vec<&str> = errors.iter().map(|e| e.metric_label()).collect();
        assert_eq!(labels, ["patch_status", "remove_finalizer"]);
        assert!(errors[1].is_conflict());
        assert!(!memory.statuses.contains_key("bad"));
        assert!(memory.statuses.contains_key("good"));
    }

    #[tokio::test]
    async fn the_daemonset_is_server_side_applied_and_remembered_with_its_generation() {
        let (executor, mut api) = executor();
        let args = crate::controller::ControllerContext::new(
            crate::controller::ControllerArgs::defaults(),
        );
        let object = crate::controller::render::render_daemonset(&args, vec![]);
        let rendered = serde_json::to_value(&object).expect("json");
        let plan = Plan {
            daemonset: Some(crate::controller::plan::DaemonSetApply {
                object,
                rendered: rendered.clone(),
            }),
            ..Default::default()
        };
        let drive = async {
            let s = api
                .expect(
                    "PATCH",
                    "/apis/apps/v1/namespaces/nodetune-system/daemonsets/nodetune-agent",
                    200,
                    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                       "metadata": {"name": "nodetune-agent", "generation": 4}}),
                )
                .await;
            assert_eq!(s.content_type, APPLY);
            assert!(s.has_query("force=true"));
            assert_eq!(s.body, rendered);
        };
        let (errors, memory) = execute_with(executor, plan, drive).await;
        assert!(errors.is_empty(), "{errors:?}");
        let applied = memory.daemonset.expect("remembered");
        assert_eq!(applied.generation, Some(4));
        assert_eq!(applied.rendered, rendered);
    }
}
