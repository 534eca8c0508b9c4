//! When the next pass runs after a change. Pure.
//!
//! Users wait for a report's *standing*: a profile's generation acknowledged, a key failing or
//! overridden, originals held or restored, TIME_WAIT pressure, a contested key. Those changes
//! start a pass at once (leading edge), at most one such pass per debounce interval, so a
//! burst (every node acknowledging a new generation) costs one pass at its start and one per
//! interval after, not one per report. Telemetry (TCP counts, damage counter rates, the report
//! time: every agent heartbeat moves them) waits for the debounce after the change, as every
//! change did before, and the status it feeds waits further for the telemetry interval.
use std::time::Duration;

use super::cache::ReportDigest;

/// What a watch event changed, as far as the next pass's timing goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Something a profile's conditions or node counts read.
    Standing,
    /// Counts and times only.
    Telemetry,
}

/// What a report's new digest (None: gone, or no status) changes from the old one.
pub fn report_change(old: Option<&ReportDigest>, new: Option<&ReportDigest>) -> Change {
    match (old, new) {
        (None, None) => Change::Telemetry,
        (Some(a), Some(b)) if same_standing(a, b) => Change::Telemetry,
        _ => Change::Standing,
    }
}

/// The fields of a digest the roll-up's conditions, node counts and summaries read; the rest
/// (`tcp`, `pod_tcp`, `last_report`, `rates`, `time_wait`) is telemetry.
fn same_standing(a: &ReportDigest, b: &ReportDigest) -> bool {
    a.profiles == b.profiles
        && a.held_originals == b.held_originals
        && a.time_wait_pressure == b.time_wait_pressure
        && a.contested == b.contested
}

/// How long to hold the next pass, given the kind of change pending, how long ago the last pass
/// that took in a standing change started (None: none this term), and the debounce interval.
pub fn hold(
    pending: Change,
    since_standing_pass: Option<Duration>,
    debounce: Duration,
) -> Duration {
    match pending {
        Change::Standing => {
            since_standing_pass.map_or(Duration::ZERO, |s| debounce.saturating_sub(s))
        }
        Change::Telemetry => debounce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyState, NodeTuningReport, Scope, SysctlEntry};
    use crate::controller::cache::Interner;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    const SECOND: Duration = Duration::from_secs(1);

    fn digest(r: &NodeTuningReport) -> ReportDigest {
        ReportDigest::of(r, &mut Interner::default()).expect("status")
    }

    fn web() -> NodeTuningReport {
        let mut r = NodeTuningReport::test("n1").listing(&["web"]);
        r.status_mut().tcp.total = [("TIME_WAIT".to_string(), 3)].into();
        r
    }

    #[test]
    fn counts_and_times_are_telemetry() {
        let old = digest(&web());
        let mut r = web();
        let s = r.status_mut();
        s.tcp.total = [("TIME_WAIT".to_string(), 3000)].into();
        s.last_report_time = Some(Time(Timestamp::UNIX_EPOCH));
        s.sockstat.time_wait = 3000;
        s.sockstat.max_tw_buckets = 262_144;
        assert_eq!(
            report_change(Some(&old), Some(&digest(&r))),
            Change::Telemetry
        );
        assert_eq!(report_change(Some(&old), Some(&old)), Change::Telemetry);
        assert_eq!(report_change(None, None), Change::Telemetry);
    }

    #[test]
    fn what_users_wait_for_is_standing() {
        let old = digest(&web());
        let mut failing = web();
        failing.status_mut().sysctls = vec![SysctlEntry {
            key: "net.ipv4.tcp_tw_recycle".into(),
            desired: Some("1".into()),
            actual: None,
            original: None,
            profile: Some("web".into()),
            scope: Scope::NetworkNamespace,
            optional: false,
            state: KeyState::Failed,
            message: Some("EINVAL".into()),
        }];
        let mut acked = web();
        acked.status_mut().profiles[0].generation = 2;
        let restoring = web().holding(&["vm.swappiness"]);
        let dropped = NodeTuningReport::test("n1").listing(&[]);
        for (what, r) in [
            ("a failing key", failing),
            ("a new generation acknowledged", acked),
            ("originals held", restoring),
            ("a profile let go", dropped),
        ] {
            assert_eq!(
                report_change(Some(&old), Some(&digest(&r))),
                Change::Standing,
                "{what}"
            );
        }
        assert_eq!(
            report_change(None, Some(&old)),
            Change::Standing,
            "first report"
        );
        assert_eq!(
            report_change(Some(&old), None),
            Change::Standing,
            "report gone"
        );
    }

    #[test]
    fn standing_goes_at_once_at_most_once_per_debounce_and_telemetry_waits() {
        // Nothing standing taken in this term yet, or long ago: at once.
        assert_eq!(hold(Change::Standing, None, SECOND), Duration::ZERO);
        assert_eq!(
            hold(Change::Standing, Some(5 * SECOND), SECOND),
            Duration::ZERO
        );
        // Within a burst: the rest of the interval since the burst's first pass.
        assert_eq!(
            hold(Change::Standing, Some(Duration::from_millis(300)), SECOND),
            Duration::from_millis(700)
        );
        // Telemetry always waits the whole debounce, however long ago the last pass was.
        assert_eq!(hold(Change::Telemetry, None, SECOND), SECOND);
        assert_eq!(hold(Change::Telemetry, Some(5 * SECOND), SECOND), SECOND);
        // --debounce 0: everything at once.
        assert_eq!(
            hold(Change::Telemetry, None, Duration::ZERO),
            Duration::ZERO
        );
    }
}
