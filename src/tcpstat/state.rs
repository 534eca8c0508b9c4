//! TCP states by their netstat names, and per-state counters.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, AddAssign};
use std::str::FromStr;

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A TCP socket state, named as `netstat` names it (the names operators grep for).
///
/// The kernel's request-socket state `NEW_SYN_RECV` (12) is folded into [`TcpState::SynRecv`],
/// as `/proc/net/tcp` and `ss` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TcpState {
    #[serde(rename = "ESTABLISHED")]
    Established,
    #[serde(rename = "SYN_SENT")]
    SynSent,
    #[serde(rename = "SYN_RECV")]
    SynRecv,
    #[serde(rename = "FIN_WAIT1")]
    FinWait1,
    #[serde(rename = "FIN_WAIT2")]
    FinWait2,
    #[serde(rename = "TIME_WAIT")]
    TimeWait,
    #[serde(rename = "CLOSE")]
    Close,
    #[serde(rename = "CLOSE_WAIT")]
    CloseWait,
    #[serde(rename = "LAST_ACK")]
    LastAck,
    #[serde(rename = "LISTEN")]
    Listen,
    #[serde(rename = "CLOSING")]
    Closing,
}

impl TcpState {
    /// Every state, in the kernel's numbering order (`TCP_ESTABLISHED` = 1 first). This is the
    /// order of JSON keys and table rows, so output is stable across runs.
    pub const ALL: [TcpState; 11] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
    ];

    /// The netstat name, e.g. `TIME_WAIT`.
    pub const fn as_str(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
        }
    }

    /// Maps a kernel state number (`include/net/tcp_states.h`, 1..=12) to a state.
    ///
    /// Returns `None` for numbers this crate does not know (0, or states added by newer kernels,
    /// e.g. 13 `BOUND_INACTIVE`, which the dump request never asks for).
    pub const fn from_kernel(state: u8) -> Option<TcpState> {
        Some(match state {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 | 12 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            _ => return None,
        })
    }

    /// Position in [`TcpState::ALL`], used to index the counter array.
    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name given is not a netstat TCP state name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown TCP state name {0:?} (expected a netstat name such as TIME_WAIT)")]
pub struct UnknownStateName(pub String);

impl FromStr for TcpState {
    type Err = UnknownStateName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TcpState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownStateName(s.to_owned()))
    }
}

/// Number of sockets per TCP state.
///
/// Serialises as a JSON object with every state as a key, zeros included, so consumers (reports,
/// dashboards, roll-ups) never have to treat "missing" and "0" differently.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StateCounts {
    counts: [u64; TcpState::ALL.len()],
}

impl StateCounts {
    /// The count for one state.
    pub fn get(&self, state: TcpState) -> u64 {
        self.counts[state.index()]
    }

    /// Sets the count for one state.
    pub fn set(&mut self, state: TcpState, count: u64) {
        self.counts[state.index()] = count;
    }

    /// Adds one socket in `state`.
    pub fn increment(&mut self, state: TcpState) {
        self.add_count(state, 1);
    }

    /// Adds `count` sockets in `state` (saturating: a counter must never wrap or panic).
    pub fn add_count(&mut self, state: TcpState, count: u64) {
        let slot = &mut self.counts[state.index()];
        *slot = slot.saturating_add(count);
    }

    /// Sockets over all states.
    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |sum, n| sum.saturating_add(*n))
    }

    /// `(state, count)` for every state, in [`TcpState::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (TcpState, u64)> + '_ {
        TcpState::ALL
            .into_iter()
            .map(|state| (state, self.get(state)))
    }

    /// Every state name mapped to its count, for Kubernetes status fields (which hold `int64`).
    pub fn to_map(&self) -> BTreeMap<String, i64> {
        self.iter()
            .map(|(state, n)| {
                (
                    state.as_str().to_owned(),
                    i64::try_from(n).unwrap_or(i64::MAX),
                )
            })
            .collect()
    }
}

/// Shows state names with non-zero counts, so a failed comparison reads like `ss` output.
impl fmt::Debug for StateCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(s, n)| (s.as_str(), n)),
            )
            .finish()
    }
}

impl Add for StateCounts {
    type Output = StateCounts;

    fn add(mut self, rhs: StateCounts) -> StateCounts {
        self += rhs;
        self
    }
}

impl AddAssign for StateCounts {
    fn add_assign(&mut self, rhs: StateCounts) {
        for (state, n) in rhs.iter() {
            self.add_count(state, n);
        }
    }
}

impl FromIterator<TcpState> for StateCounts {
    fn from_iter<I: IntoIterator<Item = TcpState>>(iter: I) -> Self {
        let mut counts = StateCounts::default();
        for state in iter {
            counts.increment(state);
        }
        counts
    }
}

impl Serialize for StateCounts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(TcpState::ALL.len()))?;
        for (state, n) in self.iter() {
            map.serialize_entry(state.as_str(), &n)?;
        }
        map.end()
    }
}

/// Accepts partial objects (missing states are 0) but rejects unknown state names, so a typo
/// in a stored report is an error rather than a silently dropped count.
impl<'de> Deserialize<'de> for StateCounts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, u64>::deserialize(deserializer)?;
        let mut counts = StateCounts::default();
        for (name, n) in raw {
            let state = name.parse::<TcpState>().map_err(D::Error::custom)?;
            counts.set(state, n);
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_numbers_map_to_netstat_names() {
        let names: Vec<&str> = (1..=12)
            .map(|n| {
                TcpState::from_kernel(n)
                    .map(TcpState::as_str)
                    .unwrap_or("?")
            })
            .collect();
        assert_eq!(
            names,
            [
                "ESTABLISHED",
                "SYN_SENT",
                "SYN_RECV",
                "FIN_WAIT1",
                "FIN_WAIT2",
                "TIME_WAIT",
                "CLOSE",
                "CLOSE_WAIT",
                "LAST_ACK",
                "LISTEN",
                "CLOSING",
                "SYN_RECV", // NEW_SYN_RECV
            ]
        );
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(13), None);
        assert_eq!(TcpState::from_kernel(255), None);
    }

    #[test]
    fn all_is_in_index_order_and_names_round_trip() {
        for (i, state) in TcpState::ALL.into_iter().enumerate() {
            assert_eq!(state.index(), i);
            assert_eq!(state.as_str().parse::<TcpState>(), Ok(state));
            assert_eq!(
                serde_json::to_value(state).ok(),
                Some(serde_json::Value::String(state.as_str().into()))
            );
        }
        assert!("ESTAB".parse::<TcpState>().is_err());
    }

    #[test]
    fn empty_counts_serialise_every_state_as_zero() {
        let json = serde_json::to_value(StateCounts::default()).expect("serialise");
        let object = json.as_object().expect("an object");
        assert_eq!(object.len(), 11);
        for state in TcpState::ALL {
            assert_eq!(
                object.get(state.as_str()),
                Some(&serde_json::json!(0)),
                "{state}"
            );
        }
    }

    #[test]
    fn serialisation_keeps_fixed_order_and_round_trips() {
        let counts: StateCounts = [TcpState::TimeWait, TcpState::TimeWait, TcpState::Listen]
            .into_iter()
            .collect();
        let text = serde_json::to_string(&counts).expect("serialise");
        assert!(
            text.starts_with(r#"{"ESTABLISHED":0,"SYN_SENT":0,"#),
            "{text}"
        );
        assert!(text.contains(r#""TIME_WAIT":2"#), "{text}");
        assert!(text.contains(r#""LISTEN":1"#), "{text}");
        let back: StateCounts = serde_json::from_str(&text).expect("deserialise");
        assert_eq!(back, counts);
    }

    #[test]
    fn deserialise_accepts_partial_and_rejects_unknown_names() {
        let partial: StateCounts = serde_json::from_str(r#"{"LISTEN":3}"#).expect("partial");
        assert_eq!(partial.get(TcpState::Listen), 3);
        assert_eq!(partial.total(), 3);
        assert!(serde_json::from_str::<StateCounts>(r#"{"ESTAB":1}"#).is_err());
    }

    #[test]
    fn addition_total_and_map() {
        let mut a = StateCounts::default();
        a.add_count(TcpState::Established, 5);
        let mut b = StateCounts::default();
        b.add_count(TcpState::Established, 2);
        b.add_count(TcpState::CloseWait, 1);
        let sum = a + b;
        assert_eq!(sum.get(TcpState::Established), 7);
        assert_eq!(sum.get(TcpState::CloseWait), 1);
        assert_eq!(sum.total(), 8);
        let map = sum.to_map();
        assert_eq!(map.len(), 11);
        assert_eq!(map.get("ESTABLISHED"), Some(&7));
        assert_eq!(map.get("SYN_RECV"), Some(&0));

        let mut big = StateCounts::default();
        big.set(TcpState::Listen, u64::MAX);
        big.increment(TcpState::Listen);
        assert_eq!(big.get(TcpState::Listen), u64::MAX);
        assert_eq!(big.to_map().get("LISTEN"), Some(&i64::MAX));
    }
}
