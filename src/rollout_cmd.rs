//! `nodetune rollout status|pause|resume|undo PROFILE`: the controls of a staged rollout from
//! a terminal. The decisions (is it done, what does undo write) are pure; `run` talks to the
//! API server.
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::api::NodeTuningProfile;
use crate::api::rollout::{RolloutPhase, RolloutStatus};
use crate::controller::rollout::wiring::RESUME_ANNOTATION;

/// The field manager of the CLI's patches.
const FIELD_MANAGER: &str = "nodetune-cli";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Wait for the rollout to finish; exit 1 when it is rolled back or paused by a guard.
    Status,
    /// Hold the next wave (nodes soaking go on soaking).
    Pause,
    /// Go on after a pause, also after a guard paused it (`onFailure: Pause`).
    Resume,
    /// Roll back to the last revision that finished (an edit of the profile's sysctls).
    Undo,
}

#[derive(Clone, Debug, clap::Args)]
pub struct RolloutArgs {
    #[arg(value_enum)]
    pub action: Action,
    /// The NodeTuningProfile.
    pub profile: String,
    /// `status`: give up after this long (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = crate::duration::parse)]
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutCmdError {
    #[error("connecting to the cluster: {0}")]
    Client(#[source] kube::Error),
    #[error("profile {profile}: {source}")]
    Api {
        profile: String,
        #[source]
        source: kube::Error,
    },
    #[error("profile {0} has no spec.rollout: its changes reach every node at once")]
    NoRollout(String),
    #[error("profile {0}: no earlier revision to go back to")]
    NothingToUndo(String),
    #[error("profile {profile}: the rollout did not finish within {timeout:?} ({last})")]
    Timeout {
        profile: String,
        timeout: Duration,
        last: String,
    },
}

/// Where a rollout stands for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Done(String),
    Failed(String),
    Waiting(String),
}

/// The verdict on `p`'s rollout: done when its current revision is stable, failed when rolled
/// back or paused by a guard, else waiting (also when the controller has not seen the latest
/// generation yet).
pub fn verdict(p: &NodeTuningProfile) -> Verdict {
    let status = p.status.as_ref();
    let rollout = status.and_then(|s| s.rollout.clone()).unwrap_or_default();
    let message = rollout.message.clone().unwrap_or_default();
    let current = status.and_then(|s| s.observed_generation) == p.metadata.generation;
    if !current {
        return Verdict::Waiting("waiting for the controller to see the latest edit".into());
    }
    match (rollout.phase, &rollout.failure) {
        (RolloutPhase::Complete, _) => Verdict::Done(message),
        (RolloutPhase::RolledBack, _) | (RolloutPhase::Paused, Some(_)) => {
            Verdict::Failed(failure_line(&rollout))
        }
        _ => Verdict::Waiting(message),
    }
}

fn failure_line(r: &RolloutStatus) -> String {
    match &r.failure {
        Some(f) => format!(
            "{}: {} (before {}, during {}, limit {})",
            r.message.clone().unwrap_or_default(),
            f.message,
            f.before.map_or("unknown".into(), |b| b.to_string()),
            f.during,
            f.limit
        ),
        None => r.message.clone().unwrap_or_default(),
    }
}

/// The merge patch that makes `p`'s sysctls and mode those of [`undo_target`]. Keys the
/// target lacks are removed (null).
pub fn undo_patch(p: &NodeTuningProfile) -> Result<Value, RolloutCmdError> {
    let target = undo_target(p)?;
    let mut sysctls = serde_json::Map::new();
    for key in p.spec.sysctls.keys() {
        sysctls.insert(key.clone(), Value::Null);
    }
    for (k, v) in &target.sysctls {
        sysctls.insert(k.clone(), Value::String(v.clone()));
    }
    Ok(json!({"spec": {"sysctls": sysctls, "mode": target.mode}}))
}

/// The revision `undo` goes back to: the stable one while a rollout is under way or rolled
/// back, else (complete) the newest earlier revision that finished rolling out.
pub fn undo_target(
    p: &NodeTuningProfile,
) -> Result<&crate::api::rollout::Revision, RolloutCmdError> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let r = p
        .status
        .as_ref()
        .and_then(|s| s.rollout.as_ref())
        .ok_or_else(|| RolloutCmdError::NothingToUndo(name.clone()))?;
    match r.phase {
        // The newest earlier revision that finished: one that was rolled back or superseded
        // never proved itself.
        RolloutPhase::Complete => r
            .revisions
            .iter()
            .rev()
            .find(|x| x.number < r.current_revision && x.rolled_out),
        _ => r.stable_revision.and_then(|n| r.revision(n)),
    }
    .ok_or(RolloutCmdError::NothingToUndo(name))
}

/// Runs `action`; returns the exit status (0 done, 1 failed rollout).
pub async fn run(args: &RolloutArgs) -> Result<i32, RolloutCmdError> {
    let client = crate::watch::client()
        .await
        .map_err(RolloutCmdError::Client)?;
    let api = Api::<NodeTuningProfile>::all(client);
    let name = args.profile.as_str();
    let api_err = |source| RolloutCmdError::Api {
        profile: name.to_string(),
        source,
    };
    let p = api.get(name).await.map_err(api_err)?;
    if p.spec.rollout.is_none() {
        return Err(RolloutCmdError::NoRollout(name.to_string()));
    }
    let params = PatchParams::default();
    let patch = match args.action {
        Action::Status => return wait(&api, args).await,
        Action::Pause => json!({"spec": {"rollout": {"paused": true}}}),
        Action::Resume => {
            let current = p
                .status
                .as_ref()
                .and_then(|s| s.rollout.as_ref())
                .map_or(0, |r| r.current_revision);
            json!({
                "metadata": {"annotations": {RESUME_ANNOTATION: current.to_string()}},
                "spec": {"rollout": {"paused": false}}
            })
        }
        Action::Undo => {
            let from = undo_target(&p)?.number;
            println!("profile {name}: the values of revision {from} roll out as a new revision");
            undo_patch(&p)?
        }
    };
    let mut params = params;
    params.field_manager = Some(FIELD_MANAGER.into());
    api.patch(name, &params, &Patch::Merge(&patch))
        .await
        .map_err(api_err)?;
    println!("profile {name}: {:?} requested", args.action);
    Ok(0)
}

/// Polls until the rollout is done (0) or failed (1), printing each new message.
async fn wait(api: &Api<NodeTuningProfile>, args: &RolloutArgs) -> Result<i32, RolloutCmdError> {
    let name = args.profile.as_str();
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut last = String::new();
    loop {
        let p = api.get(name).await.map_err(|source| RolloutCmdError::Api {
            profile: name.to_string(),
            source,
        })?;
        match verdict(&p) {
            Verdict::Done(m) => {
                println!("{m}");
                return Ok(0);
            }
            Verdict::Failed(m) => {
                eprintln!("rollout failed: {m}");
                return Ok(1);
            }
            Verdict::Waiting(m) => {
                if m != last {
                    println!("{m}");
                    last = m;
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RolloutCmdError::Timeout {
                profile: name.to_string(),
                timeout: args.timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::rollout::{GuardFailure, Revision, RolloutSpec};
    use crate::api::{Mode, NodeTuningProfileSpec, NodeTuningProfileStatus};

    fn profile(phase: RolloutPhase, failure: bool) -> NodeTuningProfile {
        let v = |s: &str| BTreeMap::from([("net.core.somaxconn".to_string(), s.to_string())]);
        let mut p = NodeTuningProfile::new(
            "edge",
            NodeTuningProfileSpec {
                sysctls: BTreeMap::from([
                    ("net.core.somaxconn".to_string(), "8".to_string()),
                    ("net.ipv4.tcp_fin_timeout".to_string(), "10".to_string()),
                ]),
                rollout: Some(RolloutSpec::default()),
                ..Default::default()
            },
        );
        p.metadata.generation = Some(3);
        p.status = Some(NodeTuningProfileStatus {
            observed_generation: Some(3),
            rollout: Some(RolloutStatus {
                revisions: vec![
                    Revision {
                        number: 1,
                        sysctls: v("4096"),
                        rolled_out: true,
                        ..Default::default()
                    },
                    Revision {
                        number: 2,
                        sysctls: v("8"),
                        mode: Mode::Enforce,
                        ..Default::default()
                    },
                ],
                current_revision: 2,
                stable_revision: Some(1),
                phase,
                failure: failure.then(|| GuardFailure {
                    node: "node-2".into(),
                    guard: "ListenOverflows maxPerMinute 60".into(),
                    during: 900,
                    limit: 60,
                    ..Default::default()
                }),
                message: Some("m".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        p
    }

    #[test]
    fn status_exits_on_completion_and_on_failure_only() {
        assert!(matches!(
            verdict(&profile(RolloutPhase::Complete, false)),
            Verdict::Done(_)
        ));
        assert!(matches!(
            verdict(&profile(RolloutPhase::RolledBack, true)),
            Verdict::Failed(m) if m.contains("during 900")
        ));
        assert!(matches!(
            verdict(&profile(RolloutPhase::Paused, true)),
            Verdict::Failed(_)
        ));
        assert!(matches!(
            verdict(&profile(RolloutPhase::Paused, false)),
            Verdict::Waiting(_)
        ));
        assert!(matches!(
            verdict(&profile(RolloutPhase::Progressing, false)),
            Verdict::Waiting(_)
        ));
        let mut stale = profile(RolloutPhase::Complete, false);
        stale.metadata.generation = Some(4);
        assert!(
            matches!(verdict(&stale), Verdict::Waiting(_)),
            "an edit not seen yet"
        );
    }

    #[test]
    fn undo_goes_back_to_the_stable_revision_and_drops_new_keys() {
        let patch = undo_patch(&profile(RolloutPhase::RolledBack, true)).expect("patch");
        assert_eq!(
            patch,
            json!({"spec": {"sysctls": {
                "net.core.somaxconn": "4096",
                "net.ipv4.tcp_fin_timeout": null
            }, "mode": "Enforce"}})
        );
        // Complete: the revision before the current one.
        let done = undo_patch(&profile(RolloutPhase::Complete, false)).expect("patch");
        assert_eq!(done["spec"]["sysctls"]["net.core.somaxconn"], "4096");
        let mut first = profile(RolloutPhase::Complete, false);
        if let Some(r) = first.status.as_mut().and_then(|s| s.rollout.as_mut()) {
            r.current_revision = 1;
        }
        assert!(matches!(
            undo_patch(&first),
            Err(RolloutCmdError::NothingToUndo(_))
        ));
    }

    #[test]
    fn undo_after_success_skips_a_revision_that_was_rolled_back() {
        // 1 finished, 2 ("8") was rolled back, 3 ("1024") finished: undo goes to 1, not 2.
        let mut p = profile(RolloutPhase::Complete, false);
        if let Some(r) = p.status.as_mut().and_then(|s| s.rollout.as_mut()) {
            r.revisions.push(Revision {
                number: 3,
                sysctls: BTreeMap::from([("net.core.somaxconn".to_string(), "1024".to_string())]),
                rolled_out: true,
                ..Default::default()
            });
            r.current_revision = 3;
            r.stable_revision = Some(3);
        }
        assert_eq!(undo_target(&p).map(|r| r.number).ok(), Some(1));
        let patch = undo_patch(&p).expect("patch");
        assert_eq!(patch["spec"]["sysctls"]["net.core.somaxconn"], "4096");
    }
}
