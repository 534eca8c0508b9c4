//! Cross-key warnings over a set of desired values (pure: no I/O).
//!
//! These are advice, not errors: the values may be applied anyway. Keys may be given in either
//! spelling; keys that do not parse are skipped (applying reports them).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::key::SysctlKey;

/// Kubernetes' default NodePort range (`--service-node-port-range`).
pub const NODE_PORT_RANGE: RangeInclusive<u32> = 30000..=32767;

const PORT_RANGE: &str = "net.ipv4.ip_local_port_range";
const RESERVED_PORTS: &str = "net.ipv4.ip_local_reserved_ports";
const UNPRIVILEGED_PORT_START: &str = "net.ipv4.ip_unprivileged_port_start";
const MAX_TW_BUCKETS: &str = "net.ipv4.tcp_max_tw_buckets";
const TW_RECYCLE: &str = "net.ipv4.tcp_tw_recycle";

/// Advice about one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Warning {
    /// The key the advice is about (canonical dotted form).
    pub key: String,
    /// What may go wrong and what to do.
    pub message: String,
}

/// Checks a desired set of sysctls. `time_wait` is the current number of TCP sockets in
/// TIME_WAIT in the same network namespace, if known.
///
/// Warns about: `ip_local_port_range` that is malformed, has min ≥ max, starts below the
/// unprivileged port start, or overlaps [`NODE_PORT_RANGE`] (unless `ip_local_reserved_ports`
/// in the same set reserves the overlap); `tcp_max_tw_buckets` that is malformed or below
/// `time_wait`; any `tcp_tw_recycle`.
pub fn check<I, K, V>(desired: I, time_wait: Option<u64>) -> Vec<Warning>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let desired: BTreeMap<String, String> = desired
        .into_iter()
        .filter_map(|(k, v)| {
            let key = SysctlKey::parse(k.as_ref()).ok()?;
            Some((key.dotted(), v.as_ref().to_owned()))
        })
        .collect();
    let mut out = Vec::new();
    port_range_rule(&desired, &mut out);
    tw_buckets_rule(&desired, time_wait, &mut out);
    tw_recycle_rule(&desired, &mut out);
    out
}

fn warn(out: &mut Vec<Warning>, key: &str, message: String) {
    out.push(Warning {
        key: key.to_owned(),
        message,
    });
}

/// `ip_local_port_range`: well-formed, min < max, above the unprivileged port start, clear of
/// the NodePort range unless reserved.
fn port_range_rule(desired: &BTreeMap<String, String>, out: &mut Vec<Warning>) {
    let Some(v) = desired.get(PORT_RANGE) else {
        return;
    };
    let Some((min, max)) = parse_port_range(v) else {
        warn(
            out,
            PORT_RANGE,
            format!(
                "{v:?} is not two port numbers \"min max\" (1-65535); the kernel will reject it"
            ),
        );
        return;
    };
    if min > max {
        warn(
            out,
            PORT_RANGE,
            format!("minimum {min} is above maximum {max}; the kernel will reject it"),
        );
    } else if min == max {
        warn(
            out,
            PORT_RANGE,
            format!(
                "minimum equals maximum ({min}): a single ephemeral port allows one \
                 outgoing connection per destination"
            ),
        );
    }
    let unpriv = desired
        .get(UNPRIVILEGED_PORT_START)
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1024);
    if min < unpriv {
        warn(
            out,
            PORT_RANGE,
            format!(
                "minimum {min} is below net.ipv4.ip_unprivileged_port_start \
                 ({unpriv}); the kernel will reject it"
            ),
        );
    }
    node_port_overlap_rule(desired, (min, max), out);
}

/// An ephemeral range overlapping the NodePort range, unless `ip_local_reserved_ports` in the
/// same set reserves the overlap.
fn node_port_overlap_rule(
    desired: &BTreeMap<String, String>,
    (min, max): (u32, u32),
    out: &mut Vec<Warning>,
) {
    let overlap = min.max(*NODE_PORT_RANGE.start())..=max.min(*NODE_PORT_RANGE.end());
    if overlap.is_empty() {
        return;
    }
    let reserved = desired
        .get(RESERVED_PORTS)
        .and_then(|s| parse_port_list(s))
        .unwrap_or_default();
    let covered = overlap
        .clone()
        .all(|p| reserved.iter().any(|r| r.contains(&p)));
    if !covered {
        warn(
            out,
            PORT_RANGE,
            format!(
                "{min}-{max} overlaps the Kubernetes NodePort range {}-{}: an \
                 outgoing connection can hold a port a NodePort Service needs; \
                 reserve {}-{} with {RESERVED_PORTS} or keep the range outside it",
                NODE_PORT_RANGE.start(),
                NODE_PORT_RANGE.end(),
                overlap.start(),
                overlap.end(),
            ),
        );
    }
}

/// `tcp_max_tw_buckets`: a number, and not below the sockets now in TIME_WAIT.
fn tw_buckets_rule(
    desired: &BTreeMap<String, String>,
    time_wait: Option<u64>,
    out: &mut Vec<Warning>,
) {
    let Some(v) = desired.get(MAX_TW_BUCKETS) else {
        return;
    };
    let Ok(cap) = v.trim().parse::<u64>() else {
        warn(
            out,
            MAX_TW_BUCKETS,
            format!("{v:?} is not a number; the kernel will reject it"),
        );
        return;
    };
    if let Some(tw) = time_wait.filter(|&tw| cap < tw) {
        warn(
            out,
            MAX_TW_BUCKETS,
            format!(
                "{cap} is below the {tw} sockets now in TIME_WAIT: beyond the cap the \
                 kernel destroys closing connections at once (\"time wait bucket \
                 table overflow\"), losing TIME_WAIT's protection against stray \
                 segments"
            ),
        );
    }
}

/// `tcp_tw_recycle`: gone from the kernel.
fn tw_recycle_rule(desired: &BTreeMap<String, String>, out: &mut Vec<Warning>) {
    if desired.contains_key(TW_RECYCLE) {
        warn(
            out,
            TW_RECYCLE,
            "removed in Linux 4.12 because it broke clients behind NAT; it will be reported \
             Unsupported. net.ipv4.tcp_tw_reuse is the supported way to reuse TIME_WAIT sockets \
             for outgoing connections"
                .to_owned(),
        );
    }
}

fn parse_port(s: &str) -> Option<u32> {
    s.parse::<u32>().ok().filter(|p| (1..=65535).contains(p))
}

/// `"min max"` (any ASCII whitespace between).
fn parse_port_range(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split_ascii_whitespace();
    let (a, b) = (it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    Some((parse_port(a)?, parse_port(b)?))
}

/// `ip_local_reserved_ports` syntax: comma-separated ports and `a-b` ranges.
fn parse_port_list(v: &str) -> Option<Vec<RangeInclusive<u32>>> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| match item.split_once('-') {
            Some((a, b)) => Some(parse_port(a.trim())?..=parse_port(b.trim())?),
            None => parse_port(item).map(|p| p..=p),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warnings(pairs: &[(&str, &str)], tw: Option<u64>) -> Vec<Warning> {
        check(pairs.iter().copied(), tw)
    }

    fn has(ws: &[Warning], key: &str, needle: &str) -> bool {
        ws.iter()
            .any(|w| w.key == key && w.message.contains(needle))
    }

    #[test]
    fn classic_values() {
        let ws = warnings(&[(PORT_RANGE, "32768 60999")], None);
        assert!(ws.is_empty(), "{ws:?}");
        let ws = warnings(&[(PORT_RANGE, "1024 65000")], None);
        assert_eq!(ws.len(), 1, "{ws:?}");
        assert!(has(&ws, PORT_RANGE, "NodePort range 30000-32767"));
        assert!(has(&ws, PORT_RANGE, "reserve 30000-32767"));
        let ws = warnings(&[("net/ipv4/ip_local_port_range", "5000\t65000")], None);
        assert!(
            has(&ws, PORT_RANGE, "NodePort"),
            "slash form and tabs: {ws:?}"
        );
    }

    #[test]
    fn port_range_problems() {
        assert!(has(
            &warnings(&[(PORT_RANGE, "65000 1024")], None),
            PORT_RANGE,
            "above maximum"
        ));
        assert!(has(
            &warnings(&[(PORT_RANGE, "40000 40000")], None),
            PORT_RANGE,
            "single"
        ));
        for bad in [
            "",
            "1024",
            "1024 65000 7",
            "a b",
            "0 100",
            "1024 70000",
            "-1 5",
        ] {
            assert!(
                has(
                    &warnings(&[(PORT_RANGE, bad)], None),
                    PORT_RANGE,
                    "not two port numbers"
                ),
                "{bad:?}"
            );
        }
        assert!(has(
            &warnings(&[(PORT_RANGE, "500 65000")], None),
            PORT_RANGE,
            "unprivileged"
        ));
        let ok = warnings(
            &[(PORT_RANGE, "500 20000"), (UNPRIVILEGED_PORT_START, "500")],
            None,
        );
        assert!(ok.is_empty(), "{ok:?}");
    }

    #[test]
    fn reserved_ports_silence_the_node_port_warning() {
        let ws = warnings(
            &[
                (PORT_RANGE, "1024 65000"),
                (RESERVED_PORTS, "22, 30000-32767"),
            ],
            None,
        );
        assert!(ws.is_empty(), "{ws:?}");
        let ws = warnings(
            &[(PORT_RANGE, "1024 65000"), (RESERVED_PORTS, "30000-32000")],
            None,
        );
        assert!(
            has(&ws, PORT_RANGE, "NodePort"),
            "partial reservation: {ws:?}"
        );
        // only the part of the NodePort range inside the local range needs reserving
        let ws = warnings(
            &[(PORT_RANGE, "32000 65000"), (RESERVED_PORTS, "32000-32767")],
            None,
        );
        assert!(ws.is_empty(), "{ws:?}");
    }

    #[test]
    fn tw_buckets() {
        assert!(warnings(&[(MAX_TW_BUCKETS, "5000")], None).is_empty());
        assert!(warnings(&[(MAX_TW_BUCKETS, "5000")], Some(4000)).is_empty());
        let ws = warnings(&[(MAX_TW_BUCKETS, "5000")], Some(93_000));
        assert!(has(&ws, MAX_TW_BUCKETS, "93000"), "{ws:?}");
        assert!(has(
            &warnings(&[(MAX_TW_BUCKETS, "lots")], None),
            MAX_TW_BUCKETS,
            "not a number"
        ));
    }

    #[test]
    fn tw_recycle() {
        let ws = warnings(&[(TW_RECYCLE, "1"), ("net.ipv4.tcp_tw_reuse", "1")], None);
        assert_eq!(ws.len(), 1);
        assert!(has(&ws, TW_RECYCLE, "4.12"));
        assert!(has(&ws, TW_RECYCLE, "NAT"));
    }

    #[test]
    fn unparseable_keys_are_skipped() {
        assert!(warnings(&[("Net.bad", "1"), ("vm.swappiness", "10")], Some(1)).is_empty());
    }
}
