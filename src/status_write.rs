//! When a status is worth writing: the one policy the agent (its NodeTuningReport) and the
//! controller (each NodeTuningProfile) share. Timestamps alone never justify a write; telemetry
//! (TCP and sockstat figures, the pods' counts among them) moves with every pass on every node,
//! so writers may hold it back; anything else (conditions, keys, counts, summaries) is written
//! at once.
use crate::api::{NodeTuningProfileStatus, NodeTuningReportStatus, SockstatSummary, TcpCounts};
use crate::conditions;

/// What writing a new status over the last one written would change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// Nothing but timestamps.
    Unchanged,
    /// Only telemetry: the writer may wait for its heartbeat or telemetry interval.
    Telemetry,
    /// Something a user or `kubectl wait` acts on: write now.
    State,
}

/// A status the classifier can compare: which parts are timestamps, which are telemetry.
pub trait ComparableStatus: Clone + PartialEq {
    /// Blanks every timestamp (report time, condition transition times).
    fn blank_timestamps(&mut self);
    /// Blanks the telemetry figures.
    fn blank_telemetry(&mut self);
}

/// Classifies writing `new` over `old` (`None`: nothing written yet, so it is `State`).
pub fn classify<S: ComparableStatus>(old: Option<&S>, new: &S) -> StatusChange {
    let Some(old) = old else {
        return StatusChange::State;
    };
    let (mut old, mut new) = (old.clone(), new.clone());
    old.blank_timestamps();
    new.blank_timestamps();
    if old == new {
        return StatusChange::Unchanged;
    }
    old.blank_telemetry();
    new.blank_telemetry();
    if old == new {
        StatusChange::Telemetry
    } else {
        StatusChange::State
    }
}

impl ComparableStatus for NodeTuningReportStatus {
    fn blank_timestamps(&mut self) {
        self.last_report_time = None;
        conditions::blank_timestamps(&mut self.conditions);
    }

    fn blank_telemetry(&mut self) {
        self.tcp = TcpCounts::default();
        self.sockstat = SockstatSummary::default();
        // Pods' counts are telemetry too: pods churn, and so do their sockets.
        self.pods = None;
        // The kernel's counters rise with the traffic, like the socket counts.
        self.tcp_counters = None;
    }
}

impl ComparableStatus for NodeTuningProfileStatus {
    fn blank_timestamps(&mut self) {
        self.last_report_time = None;
        conditions::blank_timestamps(&mut self.conditions);
    }

    /// The cluster-wide TCP totals (the hosts' and the pods'); node counts and summaries are
    /// state.
    fn blank_telemetry(&mut self) {
        self.tcp_states.clear();
        self.pod_tcp_states.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Option<Time> {
        Timestamp::from_second(1_800_000_000 + secs).ok().map(Time)
    }

    /// The agent and the controller decide alike: the same three answers for the same kinds of
    /// difference, on both status types.
    #[test]
    fn reports_and_profiles_are_classified_by_one_policy() {
        let report = NodeTuningReportStatus {
            last_report_time: at(0),
            ..Default::default()
        };
        let mut later = report.clone();
        later.last_report_time = at(30);
        assert_eq!(classify(None, &report), StatusChange::State);
        assert_eq!(classify(Some(&report), &later), StatusChange::Unchanged);
        later.sockstat.time_wait = 7;
        assert_eq!(classify(Some(&report), &later), StatusChange::Telemetry);
        later.pods = Some(crate::api::PodsTcp {
            time_wait: 1_478,
            ..Default::default()
        });
        assert_eq!(classify(Some(&report), &later), StatusChange::Telemetry);
        later.tcp_counters = Some(crate::api::TcpCounterReport {
            interval_seconds: Some(30),
            counters: vec![crate::api::TcpCounterValue {
                name: "ListenOverflows".into(),
                total: 9,
                per_minute: Some(18),
            }],
        });
        assert_eq!(classify(Some(&report), &later), StatusChange::Telemetry);
        later.summary.failed = 1;
        assert_eq!(classify(Some(&report), &later), StatusChange::State);

        let profile = NodeTuningProfileStatus {
            last_report_time: at(0),
            ..Default::default()
        };
        let mut later = profile.clone();
        later.last_report_time = at(30);
        assert_eq!(classify(None, &profile), StatusChange::State);
        assert_eq!(classify(Some(&profile), &later), StatusChange::Unchanged);
        later.tcp_states.insert("TIME_WAIT".into(), 7);
        assert_eq!(classify(Some(&profile), &later), StatusChange::Telemetry);
        later.pod_tcp_states.insert("TIME_WAIT".into(), 1_478);
        assert_eq!(classify(Some(&profile), &later), StatusChange::Telemetry);
        later.failed_nodes = 1;
        assert_eq!(classify(Some(&profile), &later), StatusChange::State);
    }
}
