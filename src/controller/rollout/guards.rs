//! Judging one soaking node against the rollout's guards. Pure.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::api::rollout::Guard;

/// What the planner knows of a node's health figures, from its report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health<'a> {
    /// Per-minute rates by counter name (absent: no rate yet). Borrowed from the report's
    /// digest, whose names are interned: a pass copies nothing per node.
    pub rates: Cow<'a, [(Arc<str>, i64)]>,
    /// TIME_WAIT sockets and `tcp_max_tw_buckets`.
    pub time_wait: Option<(i64, i64)>,
}

impl Health<'_> {
    /// The per-minute rate of `counter`, if the report has one (a handful of counters: a scan).
    pub fn rate(&self, counter: &str) -> Option<i64> {
        self.rates
            .iter()
            .find(|(n, _)| &**n == counter)
            .map(|(_, v)| *v)
    }
}

/// A guard that tripped: the figures the status and Event show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trip {
    pub guard: String,
    pub before: Option<i64>,
    pub during: i64,
    pub limit: i64,
    pub message: String,
}

/// The first guard `health` breaks, if any. `before` holds the node's rates when it was
/// assigned the revision; `control` the highest rate per counter among the nodes not yet
/// updated. A figure that is not known yet judges nothing (the soak goes on).
pub fn judge(
    guards: &[Guard],
    health: &Health<'_>,
    before: &BTreeMap<String, i64>,
    control: &BTreeMap<&str, i64>,
) -> Option<Trip> {
    guards
        .iter()
        .find_map(|g| judge_one(g, health, before, control))
}

fn judge_one(
    g: &Guard,
    health: &Health<'_>,
    before: &BTreeMap<String, i64>,
    control: &BTreeMap<&str, i64>,
) -> Option<Trip> {
    if let Some(min) = g.min_time_wait_headroom_percent {
        let (tw, max) = health.time_wait.filter(|(_, max)| *max > 0)?;
        let headroom = (max.saturating_sub(tw)).max(0).saturating_mul(100) / max;
        return (headroom < i64::from(min)).then(|| Trip {
            guard: g.describe(),
            before: None,
            during: headroom,
            limit: i64::from(min),
            message: format!(
                "TIME_WAIT headroom {headroom}% of net.ipv4.tcp_max_tw_buckets ({tw} of {max} in use) is under {min}%"
            ),
        });
    }
    let counter = g.counter.as_deref()?;
    let during = health.rate(counter)?;
    let was = before.get(counter).copied();
    let (limit, basis) = if let Some(n) = g.max_per_minute {
        (n, "the limit".to_string())
    } else if let Some(pct) = g.max_percent_of_before {
        let base = was.unwrap_or(0).max(1);
        (
            scale(base, pct),
            format!("{pct}% of its rate before ({base}/min)"),
        )
    } else if let Some(pct) = g.max_percent_of_control {
        let base = (*control.get(counter)?).max(1);
        (
            scale(base, pct),
            format!("{pct}% of the not-yet-updated nodes' highest rate ({base}/min)"),
        )
    } else {
        return None;
    };
    (during > limit).then(|| Trip {
        guard: g.describe(),
        before: was,
        during,
        limit,
        message: format!(
            "{counter} rose {during}/min during the soak (before: {}), over {limit}/min ({basis})",
            was.map_or("unknown".to_string(), |b| format!("{b}/min"))
        ),
    })
}

/// `base` times `pct` percent, rounded down, saturating.
fn scale(base: i64, pct: i64) -> i64 {
    base.saturating_mul(pct) / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(counter: &str) -> Guard {
        Guard {
            counter: Some(counter.into()),
            ..Default::default()
        }
    }

    fn rates(pairs: &[(&str, i64)]) -> BTreeMap<String, i64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn live(pairs: &[(&str, i64)]) -> Cow<'static, [(Arc<str>, i64)]> {
        pairs.iter().map(|(k, v)| (Arc::from(*k), *v)).collect()
    }

    fn control<'a>(pairs: &[(&'a str, i64)]) -> BTreeMap<&'a str, i64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn an_absolute_limit_trips_above_not_at() {
        let g = Guard {
            max_per_minute: Some(10),
            ..guard("ListenOverflows")
        };
        let at = Health {
            rates: live(&[("ListenOverflows", 10)]),
            ..Default::default()
        };
        assert_eq!(
            judge(
                std::slice::from_ref(&g),
                &at,
                &BTreeMap::new(),
                &BTreeMap::new()
            ),
            None
        );
        let over = Health {
            rates: live(&[("ListenOverflows", 11)]),
            ..Default::default()
        };
        let trip = judge(
            &[g],
            &over,
            &rates(&[("ListenOverflows", 0)]),
            &BTreeMap::new(),
        )
        .expect("trips");
        assert_eq!((trip.before, trip.during, trip.limit), (Some(0), 11, 10));
        assert_eq!(trip.guard, "ListenOverflows maxPerMinute 10");
        assert!(trip.message.contains("11/min"), "{}", trip.message);
    }

    #[test]
    fn a_factor_of_before_counts_a_quiet_node_as_one_per_minute() {
        let g = Guard {
            max_percent_of_before: Some(300),
            ..guard("RetransSegs")
        };
        let during = |n| Health {
            rates: live(&[("RetransSegs", n)]),
            ..Default::default()
        };
        let quiet = rates(&[("RetransSegs", 0)]);
        assert_eq!(
            judge(
                std::slice::from_ref(&g),
                &during(3),
                &quiet,
                &BTreeMap::new()
            ),
            None
        );
        assert!(
            judge(
                std::slice::from_ref(&g),
                &during(4),
                &quiet,
                &BTreeMap::new()
            )
            .is_some()
        );
        let busy = rates(&[("RetransSegs", 1000)]);
        assert_eq!(
            judge(
                std::slice::from_ref(&g),
                &during(2999),
                &busy,
                &BTreeMap::new()
            ),
            None
        );
        assert!(judge(&[g], &during(3001), &busy, &BTreeMap::new()).is_some());
    }

    #[test]
    fn a_control_group_rise_trips_nothing_and_no_control_judges_nothing() {
        let g = Guard {
            max_percent_of_control: Some(200),
            ..guard("ListenDrops")
        };
        let h = Health {
            rates: live(&[("ListenDrops", 500)]),
            ..Default::default()
        };
        let fleet_wide = control(&[("ListenDrops", 400)]);
        assert_eq!(
            judge(std::slice::from_ref(&g), &h, &BTreeMap::new(), &fleet_wide),
            None
        );
        let calm = control(&[("ListenDrops", 100)]);
        assert!(judge(std::slice::from_ref(&g), &h, &BTreeMap::new(), &calm).is_some());
        assert_eq!(judge(&[g], &h, &BTreeMap::new(), &BTreeMap::new()), None);
    }

    #[test]
    fn time_wait_headroom_and_unknown_figures() {
        let g = Guard {
            min_time_wait_headroom_percent: Some(10),
            ..Default::default()
        };
        let h = |tw| Health {
            time_wait: Some((tw, 1000)),
            ..Default::default()
        };
        assert_eq!(
            judge(
                std::slice::from_ref(&g),
                &h(900),
                &BTreeMap::new(),
                &BTreeMap::new()
            ),
            None
        );
        let trip = judge(
            std::slice::from_ref(&g),
            &h(901),
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .expect("trips");
        assert_eq!((trip.during, trip.limit), (9, 10));
        // Past the cap (a stale cap), still a trip, never a negative figure.
        assert_eq!(
            judge(
                std::slice::from_ref(&g),
                &h(5000),
                &BTreeMap::new(),
                &BTreeMap::new()
            )
            .map(|t| t.during),
            Some(0)
        );
        assert_eq!(
            judge(&[g], &Health::default(), &BTreeMap::new(), &BTreeMap::new()),
            None
        );
        // A counter without a rate yet judges nothing.
        let limit = Guard {
            max_per_minute: Some(0),
            ..guard("ListenOverflows")
        };
        assert_eq!(
            judge(
                &[limit],
                &Health::default(),
                &BTreeMap::new(),
                &BTreeMap::new()
            ),
            None
        );
    }
}
