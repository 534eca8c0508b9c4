//! Writing the node's NodeTuningReport: only when it says something new or a heartbeat is due,
//! bounded in time, with capped backoff after failures.
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::{Api, ResourceExt};

use super::report::{self, Change};
use crate::api::{NodeTuningReport, NodeTuningReportSpec, NodeTuningReportStatus};
use crate::backoff::Backoff;

/// Field manager of every agent write.
pub const FIELD_MANAGER: &str = "nodetune-agent";
/// Longest a report write may take: a hung API server must not hold up the next pass, which
/// keeps the node tuned whatever the API does.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of a failed write: doubling from 2 s up to 30 s.
const RETRY_MIN: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What [`ReportWriter::offer`] did.
#[derive(Debug)]
pub enum Outcome {
    Written,
    /// Nothing new and no heartbeat due.
    Skipped,
    /// The write failed; try again within this delay.
    Failed {
        retry_in: Duration,
        error: kube::Error,
    },
}

pub struct ReportWriter {
    api: Api<NodeTuningReport>,
    node_name: String,
    heartbeat: Duration,
    last: Option<NodeTuningReportStatus>,
    last_at: Option<Instant>,
    backoff: Backoff,
    /// The report object (not its status) is known to exist with our owner reference.
    object_ok: bool,
}

impl ReportWriter {
    pub fn new(api: Api<NodeTuningReport>, node_name: &str, heartbeat: Duration) -> Self {
        Self {
            api,
            node_name: node_name.into(),
            heartbeat,
            last: None,
            last_at: None,
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
            object_ok: false,
        }
    }

    /// The status last written.
    pub fn last(&self) -> Option<&NodeTuningReportStatus> {
        self.last.as_ref()
    }

    /// Write `status` now if it changes sysctl or profile outcomes, or if only telemetry
    /// changed and the heartbeat is due.
    pub async fn offer(
        &mut self,
        status: NodeTuningReportStatus,
        node: &PartialObjectMeta<Node>,
    ) -> Outcome {
        let due = self.last_at.is_none_or(|t| t.elapsed() >= self.heartbeat);
        if report::change(self.last.as_ref(), &status) != Change::State && !due {
            return Outcome::Skipped;
        }
        let result = tokio::time::timeout(WRITE_TIMEOUT, self.write(&status, node))
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(
                    format!("no answer within {WRITE_TIMEOUT:?}").into(),
                ))
            });
        match result {
            Ok(()) => {
                self.last = Some(status);
                self.last_at = Some(Instant::now());
                self.backoff.reset();
                Outcome::Written
            }
            Err(error) => {
                // A report deleted by hand or by GC must be recreated before its status.
                self.object_ok = false;
                let retry_in = self.backoff.next_delay();
                Outcome::Failed { retry_in, error }
            }
        }
    }

    async fn write(
        &mut self,
        status: &NodeTuningReportStatus,
        node: &PartialObjectMeta<Node>,
    ) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if !self.object_ok {
            // Owned by the Node, so the report goes away with it.
            let mut report = NodeTuningReport::new(
                &self.node_name,
                NodeTuningReportSpec {
                    node_name: self.node_name.clone(),
                },
            );
            report.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: self.node_name.clone(),
                uid: node.uid().unwrap_or_default(),
                ..Default::default()
            }]);
            self.api
                .patch(&self.node_name, &params, &Patch::Apply(&report))
                .await?;
            self.object_ok = true;
        }
        let body = serde_json::json!({
            "apiVersion": "nodetune.dev/v1alpha1",
            "kind": "NodeTuningReport",
            "metadata": {"name": self.node_name},
            "status": status,
        });
        self.api
            .patch_status(&self.node_name, &params, &Patch::Apply(&body))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;
    use kube::core::PartialObjectMetaExt;
    use serde_json::json;

    use super::*;
    use crate::mock_api::{self, APPLY, MockApi};

    const REPORT: &str = "/apis/nodetune.dev/v1alpha1/nodetuningreports/n1";

    fn node() -> PartialObjectMeta<Node> {
        ObjectMeta {
            name: Some("n1".into()),
            uid: Some("node-uid-1".into()),
            ..Default::default()
        }
        .into_response_partial()
    }

    fn status(secs: i64, drift: i64) -> NodeTuningReportStatus {
        NodeTuningReportStatus {
            kernel_release: "6.18".into(),
            drift_corrections: drift,
            last_report_time: Some(Time(Timestamp::from_second(secs).expect("ts"))),
            ..Default::default()
        }
    }

    fn report_json() -> serde_json::Value {
        serde_json::to_value(NodeTuningReport::test("n1")).expect("json")
    }

    async fn expect_object(api: &mut MockApi) {
        let s = api.expect("PATCH", REPORT, 200, report_json()).await;
        assert_eq!(s.content_type, APPLY);
        assert!(s.has_query("fieldManager=nodetune-agent") && s.has_query("force=true"));
        assert_eq!(s.body["spec"]["nodeName"], "n1");
        assert_eq!(
            s.body["metadata"]["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "node-uid-1"}])
        );
    }

    async fn expect_status(api: &mut MockApi, code: u16, drift: i64) {
        let s = api
            .expect("PATCH", &format!("{REPORT}/status"), code, report_json())
            .await;
        assert_eq!(s.content_type, APPLY);
        assert_eq!(s.body["status"]["driftCorrections"], drift);
        assert!(
            s.body.get("spec").is_none(),
            "status writes carry only status"
        );
    }

    #[tokio::test]
    async fn applies_the_report_then_its_status_skips_timestamp_only_changes_and_recreates_after_a_failure()
     {
        let (client, mut api) = mock_api::client();
        let mut writer = ReportWriter::new(Api::all(client), "n1", Duration::from_secs(3600));
        let node = node();
        let run = async {
            let first = writer.offer(status(1, 0), &node).await;
            // Only the time moved, and the heartbeat is an hour away: nothing is sent.
            let second = writer.offer(status(2, 0), &node).await;
            // A real change whose status write fails...
            let third = writer.offer(status(3, 1), &node).await;
            // ...is retried with the object applied again (it may have been deleted).
            let fourth = writer.offer(status(4, 1), &node).await;
            [first, second, third, fourth]
        };
        let drive = async {
            expect_object(&mut api).await;
            expect_status(&mut api, 200, 0).await;
            expect_status(&mut api, 500, 1).await;
            expect_object(&mut api).await;
            expect_status(&mut api, 200, 1).await;
            api.expect_silence().await;
        };
        let (outcomes, ()) = tokio::join!(run, drive);
        assert!(matches!(outcomes[0], Outcome::Written), "{outcomes:?}");
        assert!(matches!(outcomes[1], Outcome::Skipped), "{outcomes:?}");
        assert!(
            matches!(outcomes[2], Outcome::Failed { retry_in, .. } if retry_in == RETRY_MIN),
            "{outcomes:?}"
        );
        assert!(matches!(outcomes[3], Outcome::Written), "{outcomes:?}");
        assert_eq!(
            writer.last().map(|s| s.drift_corrections),
            Some(1),
            "the last written status is remembered"
        );
    }

    #[tokio::test]
    async fn telemetry_waits_for_the_heartbeat() {
        let (client, mut api) = mock_api::client();
        let mut writer = ReportWriter::new(Api::all(client), "n1", Duration::ZERO);
        let node = node();
        let mut tcp_only = status(2, 0);
        tcp_only.tcp.total.insert("TIME_WAIT".into(), 5);
        let run = async {
            let a = writer.offer(status(1, 0), &node).await;
            // Heartbeat zero: always due, so telemetry goes out.
            let b = writer.offer(tcp_only, &node).await;
            [a, b]
        };
        let drive = async {
            expect_object(&mut api).await;
            expect_status(&mut api, 200, 0).await;
            let s = api
                .expect("PATCH", &format!("{REPORT}/status"), 200, report_json())
                .await;
            assert_eq!(
                s.body["status"]["tcp"]["states"][0],
                serde_json::json!({"state": "TIME_WAIT", "ipv4": 0, "ipv6": 0, "total": 5})
            );
            api.expect_silence().await;
        };
        let (outcomes, ()) = tokio::join!(run, drive);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Written)));
    }
}
