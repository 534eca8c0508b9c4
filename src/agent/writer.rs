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
