//! Per-state TCP counts on the wire: lists of `{state, ...}` entries keyed by `state`.
//!
//! In Rust the counts stay maps keyed by netstat state name. On the wire they are lists, because
//! `kubectl describe` title-cases one-word map keys (`ESTABLISHED` shows as `Established` beside
//! `CLOSE_WAIT`), while list values print verbatim. Lists come in kernel state order
//! (`ESTABLISHED` first), as `ss` and `netstat` print them, and are list-maps keyed by `state`
//! so server-side apply merges them per state.
use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::json;

use crate::tcpstat::TcpState;

/// Upper bound on list entries: the kernel has 11 states; room for a few more.
const MAX_STATES: u32 = 16;

/// Sockets in one state, summed over a profile's matched nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StateTotal {
    /// netstat state name, e.g. `TIME_WAIT`.
    pub state: String,
    /// Sockets in this state.
    #[schemars(range(min = 0))]
    pub total: i64,
}

/// Sockets in one state on one node, per address family.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StateCounts {
    /// netstat state name, e.g. `TIME_WAIT`.
    pub state: String,
    /// IPv4 sockets in this state.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub ipv4: i64,
    /// IPv6 sockets in this state.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub ipv6: i64,
    /// Both families.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub total: i64,
}

/// Names in kernel order, then any name the kernel list does not know (sorted).
fn ordered<'a>(names: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let rank = |name: &str| {
        TcpState::ALL
            .iter()
            .position(|s| s.as_str() == name)
            .unwrap_or(TcpState::ALL.len())
    };
    let mut names: Vec<&String> = names.collect();
    names.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    names.dedup();
    names
}

/// Marks an array schema as a list-map keyed by `state`, bounded in length.
fn keyed_by_state(mut schema: Schema) -> Schema {
    let obj = schema.ensure_object();
    obj.insert("maxItems".into(), json!(MAX_STATES));
    obj.insert("x-kubernetes-list-type".into(), json!("map"));
    obj.insert("x-kubernetes-list-map-keys".into(), json!(["state"]));
    schema
}

/// `#[serde(with)]` for a profile's `status.tcpStates`: map in Rust, `[{state, total}]` on the
/// wire.
pub mod totals {
    use super::*;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, i64>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let list: Vec<StateTotal> = ordered(map.keys())
            .into_iter()
            .map(|state| StateTotal {
                state: state.clone(),
                total: map[state],
            })
            .collect();
        list.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, i64>, D::Error> {
        // Objects written before the list form held a map; reading it keeps an upgrade from
        // wedging the controller until the next status write replaces it.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            List(Vec<StateTotal>),
            Map(BTreeMap<String, i64>),
        }
        Ok(match Shape::deserialize(deserializer)? {
            Shape::List(list) => list.into_iter().map(|e| (e.state, e.total)).collect(),
            Shape::Map(map) => map,
        })
    }

    pub fn schema(generator: &mut SchemaGenerator) -> Schema {
        keyed_by_state(generator.subschema_for::<Vec<StateTotal>>())
    }
}

/// Per-family maps in Rust, one `{state, ipv4, ipv6, total}` list on the wire.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FamilyMaps {
    pub ipv4: BTreeMap<String, i64>,
    pub ipv6: BTreeMap<String, i64>,
    pub total: BTreeMap<String, i64>,
}

impl Serialize for FamilyMaps {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let get = |m: &BTreeMap<String, i64>, k: &String| m.get(k).copied().unwrap_or(0);
        let list: Vec<StateCounts> = ordered(
            self.total
                .keys()
                .chain(self.ipv4.keys())
                .chain(self.ipv6.keys()),
        )
        .into_iter()
        .map(|state| StateCounts {
            state: state.clone(),
            ipv4: get(&self.ipv4, state),
            ipv6: get(&self.ipv6, state),
            total: get(&self.total, state),
        })
        .collect();
        list.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for FamilyMaps {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut maps = FamilyMaps::default();
        for e in Vec::<StateCounts>::deserialize(deserializer)? {
            maps.ipv4.insert(e.state.clone(), e.ipv4);
            maps.ipv6.insert(e.state.clone(), e.ipv6);
            maps.total.insert(e.state, e.total);
        }
        Ok(maps)
    }
}

impl JsonSchema for FamilyMaps {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FamilyMaps".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        keyed_by_state(generator.subschema_for::<Vec<StateCounts>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Profile {
        #[serde(with = "totals")]
        states: BTreeMap<String, i64>,
    }

    #[test]
    fn totals_are_a_list_in_kernel_order_and_read_back() {
        let p = Profile {
            states: [("TIME_WAIT", 7), ("ESTABLISHED", 3), ("LISTEN", 1)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        let wire = serde_json::to_value(&p).unwrap();
        assert_eq!(
            wire,
            json!({"states": [
                {"state": "ESTABLISHED", "total": 3},
                {"state": "TIME_WAIT", "total": 7},
                {"state": "LISTEN", "total": 1},
            ]})
        );
        assert_eq!(serde_json::from_value::<Profile>(wire).unwrap(), p);
    }

    #[test]
    fn family_maps_join_per_state_and_read_back() {
        let m = FamilyMaps {
            ipv4: [("LISTEN".to_string(), 2)].into(),
            ipv6: [("ESTABLISHED".to_string(), 1)].into(),
            total: [("LISTEN".to_string(), 2), ("ESTABLISHED".to_string(), 1)].into(),
        };
        let wire = serde_json::to_value(&m).unwrap();
        assert_eq!(
            wire,
            json!([
                {"state": "ESTABLISHED", "ipv4": 0, "ipv6": 1, "total": 1},
                {"state": "LISTEN", "ipv4": 2, "ipv6": 0, "total": 2},
            ])
        );
        let back: FamilyMaps = serde_json::from_value(wire).unwrap();
        assert_eq!(back.total, m.total);
        assert_eq!(back.ipv4["LISTEN"], 2);
        assert_eq!(
            back.ipv6["LISTEN"], 0,
            "absent per-family counts read as zero"
        );
    }

    #[test]
    fn an_unknown_state_name_is_kept_after_the_kernel_states() {
        let p = Profile {
            states: [("ZZZ".to_string(), 1), ("CLOSE".to_string(), 2)].into(),
        };
        let wire = serde_json::to_value(&p).unwrap();
        assert_eq!(wire["states"][0]["state"], "CLOSE");
        assert_eq!(wire["states"][1]["state"], "ZZZ");
    }

    #[test]
    fn a_legacy_map_is_read_and_anything_else_refused() {
        let p: Profile = serde_json::from_value(json!({"states": {"LISTEN": 1}})).unwrap();
        assert_eq!(p.states["LISTEN"], 1);
        assert!(serde_json::from_value::<Profile>(json!({"states": "LISTEN"})).is_err());
        assert!(serde_json::from_value::<Profile>(json!({"states": [{"state": 1}]})).is_err());
    }
}
