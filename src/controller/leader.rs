//! Leader election on a `coordination.k8s.io/v1` Lease (kube 5 has none built in).
//!
//! One replica holds the Lease and renews it every [`RENEW_EVERY`]; the others poll it and take
//! it over once it has gone unrenewed for `leaseDurationSeconds`. Writes are `replace` calls
//! carrying the resourceVersion that was read, so two candidates can never both win.
//!
//! Expiry is judged on the later of the Lease's `renewTime` and the moment this replica saw that
//! `renewTime` for the first time, so a standby whose clock runs ahead cannot steal a lease the
//! leader is still renewing. A leader that cannot renew within [`RENEW_DEADLINE`] (shorter than
//! the lease duration) steps down on its own before anyone else may step up.
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;

const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often a standby looks at the Lease.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// What a candidate should do with the Lease it just read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease yet: create it, holding it.
    Create,
    /// Free or expired: take it over (a new term, `leaseTransitions` + 1).
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else holds it; it expires at the earliest after this long.
    Wait(Duration),
}

/// Decide from the Lease as read, the current time, and when this replica first saw the Lease's
/// current `renewTime` (`observed`; `None` if it has not seen it before).
pub fn decide(
    lease: Option<&Lease>,
    now: Timestamp,
    observed: Option<Timestamp>,
    identity: &str,
) -> LeaseAction {
    let Some(lease) = lease else {
        return LeaseAction::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return LeaseAction::Acquire;
    }
    if holder == identity {
        return LeaseAction::Renew;
    }
    let duration =
        SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1)));
    let renewed = spec.renew_time.or(spec.acquire_time).map(|t| t.0);
    let last = match (renewed, observed) {
        (Some(r), Some(o)) => r.max(o),
        (Some(r), None) => r.max(now),
        (None, Some(o)) => o,
        // Held but never renewed and never seen: give the holder one full term from now.
        (None, None) => now,
    };
    let expires = last.checked_add(duration).unwrap_or(last);
    if expires <= now {
        LeaseAction::Acquire
    } else {
        LeaseAction::Wait(Duration::try_from(expires.duration_since(now)).unwrap_or(RETRY_EVERY))
    }
}

/// The Lease after this replica takes or renews it.
fn claimed(
    current: Option<&Lease>,
    name: &str,
    namespace: &str,
    identity: &str,
    now: Timestamp,
) -> Lease {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        spec: None,
    });
    let mut spec = lease.spec.take().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(identity);
    if !ours {
        spec.acquire_time = Some(MicroTime(now));
        if current.is_some() {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        } else {
            spec.lease_transitions = Some(0);
        }
    }
    spec.holder_identity = Some(identity.into());
    spec.lease_duration_seconds = Some(i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15));
    spec.renew_time = Some(MicroTime(now));
    lease.spec = Some(spec);
    lease
}

/// The Lease handed back on shutdown: no holder, so a standby takes it at its next look.
pub fn released(current: &Lease, now: Timestamp) -> Lease {
    let mut lease = current.clone();
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(now));
    lease
}

/// Runs the election; publishes "am I the leader" on a watch channel.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
        }
    }

    /// Loop until `shutdown` resolves, then hand the Lease back if held.
    pub async fn run(
        self,
        leader: watch::Sender<bool>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut last_renew: Option<Instant> = None;
        // (renewTime as read, local time it was first seen)
        let mut seen: Option<(Option<Timestamp>, Timestamp)> = None;
        loop {
            let is_leader = self.step(&mut last_renew, &mut seen).await;
            leader.send_if_modified(|v| std::mem::replace(v, is_leader) != is_leader);
            let pause = if is_leader { RENEW_EVERY } else { RETRY_EVERY };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = &mut shutdown => break,
            }
        }
        if *leader.borrow() {
            leader.send_replace(false);
            self.release().await;
        }
    }

    /// One look at the Lease; returns whether this replica holds it afterwards.
    async fn step(
        &self,
        last_renew: &mut Option<Instant>,
        seen: &mut Option<(Option<Timestamp>, Timestamp)>,
    ) -> bool {
        let still_fresh = |t: &Option<Instant>| t.is_some_and(|t| t.elapsed() < RENEW_DEADLINE);
        let current = match self.api.get_opt(&self.name).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "reading the leader lease failed");
                return still_fresh(last_renew);
            }
        };
        let now = Timestamp::now();
        let renew = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0);
        let observed = match seen {
            Some((r, at)) if *r == renew => *at,
            _ => {
                *seen = Some((renew, now));
                now
            }
        };
        let decision = decide(current.as_ref(), now, Some(observed), &self.identity);
        let write = match decision {
            LeaseAction::Wait(_) => {
                *last_renew = None;
                return false;
            }
            LeaseAction::Create => {
                let lease = claimed(None, &self.name, &self.namespace, &self.identity, now);
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            LeaseAction::Acquire | LeaseAction::Renew => {
                let lease = claimed(
                    current.as_ref(),
                    &self.name,
                    &self.namespace,
                    &self.identity,
                    now,
                );
                // `lease` keeps the resourceVersion read above: a concurrent writer makes this a 409.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
        };
        match write {
            Ok(()) => {
                if decision != LeaseAction::Renew {
                    tracing::info!(identity = %self.identity, "acquired the leader lease");
                }
                *last_renew = Some(Instant::now());
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, ?decision, "writing the leader lease failed");
                still_fresh(last_renew)
            }
        }
    }

    async fn release(&self) {
        let Ok(Some(current)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let ours = current
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !ours {
            return;
        }
        match self
            .api
            .replace(
                &self.name,
                &PostParams::default(),
                &released(&current, Timestamp::now()),
            )
            .await
        {
            Ok(_) => tracing::info!("released the leader lease"),
            Err(e) => tracing::warn!(error = %e, "releasing the leader lease failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).expect("ts")
    }

    fn lease(holder: Option<&str>, renew: Option<i64>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(15),
                renew_time: renew.map(|s| MicroTime(t(s))),
                lease_transitions: Some(3),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, t(0), None, "me"), LeaseAction::Create);
        assert_eq!(
            decide(Some(&lease(Some("me"), Some(0))), t(100), None, "me"),
            LeaseAction::Renew
        );
        assert_eq!(
            decide(Some(&lease(None, Some(0))), t(1), None, "me"),
            LeaseAction::Acquire
        );
        assert_eq!(
            decide(Some(&lease(Some(""), Some(0))), t(1), None, "me"),
            LeaseAction::Acquire
        );
        // Held and fresh.
        assert_eq!(
            decide(Some(&lease(Some("other"), Some(0))), t(5), Some(t(0)), "me"),
            LeaseAction::Wait(Duration::from_secs(10))
        );
        // Expired on both clocks.
        assert_eq!(
            decide(
                Some(&lease(Some("other"), Some(0))),
                t(16),
                Some(t(0)),
                "me"
            ),
            LeaseAction::Acquire
        );
        // renewTime looks old (our clock is ahead) but we only just saw it: wait a full term.
        assert_eq!(
            decide(
                Some(&lease(Some("other"), Some(0))),
                t(100),
                Some(t(100)),
                "me"
            ),
            LeaseAction::Wait(LEASE_DURATION)
        );
        // Never seen before: judged from now at the earliest.
        assert!(matches!(
            decide(Some(&lease(Some("other"), Some(0))), t(100), None, "me"),
            LeaseAction::Wait(_)
        ));
    }

    #[test]
    fn claiming_counts_transitions() {
        let fresh = claimed(None, "l", "ns", "me", t(0));
        let s = fresh.spec.expect("spec");
        assert_eq!(
            (s.holder_identity.as_deref(), s.lease_transitions),
            (Some("me"), Some(0))
        );
        assert_eq!(s.acquire_time, Some(MicroTime(t(0))));

        let taken = claimed(Some(&lease(Some("other"), Some(0))), "l", "ns", "me", t(20));
        assert_eq!(
            taken.metadata.resource_version.as_deref(),
            Some("7"),
            "replace must carry the version read"
        );
        let s = taken.spec.expect("spec");
        assert_eq!(
            (s.lease_transitions, s.acquire_time.clone()),
            (Some(4), Some(MicroTime(t(20))))
        );

        let mut mine = lease(Some("me"), Some(0));
        if let Some(spec) = mine.spec.as_mut() {
            spec.acquire_time = Some(MicroTime(t(-50)));
        }
        let renewed = claimed(Some(&mine), "l", "ns", "me", t(5))
            .spec
            .expect("spec");
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, Some(MicroTime(t(-50))));
        assert_eq!(renewed.renew_time, Some(MicroTime(t(5))));
    }

    #[test]
    fn released_lease_is_free() {
        let r = released(&lease(Some("me"), Some(0)), t(1));
        assert_eq!(decide(Some(&r), t(1), None, "other"), LeaseAction::Acquire);
    }

    mod api_edge {
        use serde_json::json;

        use super::super::*;
        use crate::mock_api;

        const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/nodetune";

        fn lease(holder: &str, rv: &str, renew: Timestamp) -> serde_json::Value {
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "nodetune", "namespace": "ns", "resourceVersion": rv},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                         "renewTime": renew.to_string(), "acquireTime": renew.to_string()},
            })
        }

        #[tokio::test]
        async fn creates_renews_with_the_read_version_and_hands_the_lease_back() {
            let (client, mut api) = mock_api::client();
            let e = Elector::new(client, "ns", "nodetune", "me");
            let now = Timestamp::now();
            let run = async {
                let (mut last, mut seen) = (None, None);
                let created = e.step(&mut last, &mut seen).await;
                let renewed = e.step(&mut last, &mut seen).await;
                e.release().await;
                (created, renewed)
            };
            let drive = async {
                // No Lease yet: create it, held by us.
                api.expect("GET", LEASE, 404, json!({})).await;
                let c = api
                    .expect(
                        "POST",
                        "/apis/coordination.k8s.io/v1/namespaces/ns/leases",
                        201,
                        lease("me", "1", now),
                    )
                    .await;
                assert_eq!(c.body["spec"]["holderIdentity"], "me");
                // Ours: renewed by a replace that carries the resourceVersion read.
                api.expect("GET", LEASE, 200, lease("me", "1", now)).await;
                let r = api.expect("PUT", LEASE, 200, lease("me", "2", now)).await;
                assert_eq!(r.body["metadata"]["resourceVersion"], "1");
                assert_eq!(r.body["spec"]["holderIdentity"], "me");
                // Shutdown: handed back so a standby takes over at once.
                api.expect("GET", LEASE, 200, lease("me", "2", now)).await;
                let h = api.expect("PUT", LEASE, 200, lease("", "3", now)).await;
                assert_eq!(h.body["metadata"]["resourceVersion"], "2");
                assert_ne!(h.body["spec"]["holderIdentity"], "me");
                api.expect_silence().await;
            };
            let ((created, renewed), ()) = tokio::join!(run, drive);
            assert!(created && renewed);
        }

        #[tokio::test]
        async fn a_fresh_lease_of_another_replica_is_left_alone_and_a_conflict_loses() {
            let (client, mut api) = mock_api::client();
            let e = Elector::new(client, "ns", "nodetune", "me");
            // Whole seconds, so the renewTime read back is the same instant.
            let now = Timestamp::from_second(Timestamp::now().as_second()).expect("ts");
            let old = now - k8s_openapi::jiff::SignedDuration::from_secs(60);
            let run = async {
                let (mut last, mut seen) = (None, None);
                let held_by_other = e.step(&mut last, &mut seen).await;
                let mut seen_long_ago = Some((Some(old), old));
                let raced = e.step(&mut last, &mut seen_long_ago).await;
                (held_by_other, raced)
            };
            let drive = async {
                api.expect("GET", LEASE, 200, lease("other", "5", now))
                    .await;
                // Not renewed for 60 s, as this replica saw it too: take it over, and lose the
                // race to a concurrent writer.
                api.expect("GET", LEASE, 200, lease("other", "5", old))
                    .await;
                let t = api.expect("PUT", LEASE, 409, json!({})).await;
                assert_eq!(t.body["metadata"]["resourceVersion"], "5");
                api.expect_silence().await;
            };
            let ((held_by_other, raced), ()) = tokio::join!(run, drive);
            assert!(
                !held_by_other,
                "a fresh lease of another replica is not ours"
            );
            assert!(!raced, "a lost race is not leadership");
        }
    }
}
