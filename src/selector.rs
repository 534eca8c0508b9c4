//! Label selector matching (`metav1.LabelSelector` semantics), pure.
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("unknown label selector operator {0:?} (want In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator(String),
    #[error("label selector operator {op} on key {key:?} needs at least one value")]
    MissingValues { op: String, key: String },
}

/// A set of labels a selector can be matched against.
pub trait LabelLookup {
    /// The value of label `key`, if set.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelLookup for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// Labels as a sorted slice of shared strings: what the controller keeps of each of thousands
/// of Nodes, whose label keys and most values (os, arch, zone, instance type) repeat on every
/// node. A `BTreeMap<String, String>` of ten labels costs about 1.4 KB; this, with the strings
/// interned by the caller, about 0.4 KB.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSet(Box<[(Arc<str>, Arc<str>)]>);

impl LabelSet {
    /// From (key, value) pairs in any order; a repeated key keeps its last value.
    pub fn new(pairs: impl IntoIterator<Item = (Arc<str>, Arc<str>)>) -> Self {
        let mut v: Vec<(Arc<str>, Arc<str>)> = pairs.into_iter().collect();
        v.reverse();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        Self(v.into_boxed_slice())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl LabelLookup for LabelSet {
    fn label(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }
}

impl<const N: usize> From<[(String, String); N]> for LabelSet {
    fn from(pairs: [(String, String); N]) -> Self {
        Self::new(
            pairs
                .into_iter()
                .map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str()))),
        )
    }
}

impl From<&BTreeMap<String, String>> for LabelSet {
    fn from(m: &BTreeMap<String, String>) -> Self {
        Self::new(
            m.iter()
                .map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str()))),
        )
    }
}

/// Whether `labels` satisfy `selector`. An absent selector selects everything, as does an empty
/// one (`{}`), matching how Kubernetes workloads read it.
pub fn matches(
    selector: Option<&LabelSelector>,
    labels: &(impl LabelLookup + ?Sized),
) -> Result<bool, SelectorError> {
    let Some(selector) = selector else {
        return Ok(true);
    };
    if let Some(ml) = &selector.match_labels
        && ml.iter().any(|(k, v)| labels.label(k) != Some(v.as_str()))
    {
        return Ok(false);
    }
    for expr in selector.match_expressions.iter().flatten() {
        let value = labels.label(&expr.key);
        let values = expr.values.as_deref().unwrap_or_default();
        let needs_values = || {
            if values.is_empty() {
                Err(SelectorError::MissingValues {
                    op: expr.operator.clone(),
                    key: expr.key.clone(),
                })
            } else {
                Ok(())
            }
        };
        let ok = match expr.operator.as_str() {
            "In" => {
                needs_values()?;
                value.is_some_and(|v| values.iter().any(|x| x == v))
            }
            "NotIn" => {
                needs_values()?;
                value.is_none_or(|v| !values.iter().any(|x| x == v))
            }
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(SelectorError::UnknownOperator(other.to_string())),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Parse `key=value` pairs (as `--selector` takes them) into `matchLabels`.
pub fn from_pairs(pairs: &[String]) -> Result<Option<LabelSelector>, String> {
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut labels = BTreeMap::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("selector {pair:?} is not of the form key=value"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(Some(LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: if values.is_empty() {
                    None
                } else {
                    Some(values.iter().map(|s| s.to_string()).collect())
                },
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn a_label_set_matches_as_the_map_it_was_made_from() {
        let map = labels(&[("role", "web"), ("zone", "a"), ("tier", "")]);
        let set = LabelSet::from(&map);
        let selectors = [
            expr("role", "In", &["web", "mail"]),
            expr("role", "NotIn", &["web"]),
            expr("zone", "Exists", &[]),
            expr("tier", "In", &[""]),
            expr("absent", "DoesNotExist", &[]),
            expr("absent", "In", &["x"]),
            LabelSelector {
                match_labels: Some([("zone".to_string(), "a".to_string())].into()),
                ..Default::default()
            },
        ];
        for sel in &selectors {
            assert_eq!(
                matches(Some(sel), &set),
                matches(Some(sel), &map),
                "{sel:?}"
            );
        }
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [("role", "web"), ("tier", ""), ("zone", "a")]
        );
        // A repeated key keeps its last value, as a map built from the same pairs would.
        let dup = LabelSet::new([("k".into(), "1".into()), ("k".into(), "2".into())]);
        assert_eq!(dup.label("k"), Some("2"));
    }

    #[test]
    fn absent_and_empty_select_all() {
        let l = labels(&[("a", "1")]);
        assert_eq!(matches(None, &l), Ok(true));
        assert_eq!(matches(Some(&LabelSelector::default()), &l), Ok(true));
    }

    #[test]
    fn match_labels_need_all() {
        let sel = from_pairs(&["role=web".into(), "zone=a".into()]).unwrap();
        assert_eq!(
            matches(sel.as_ref(), &labels(&[("role", "web"), ("zone", "a")])),
            Ok(true)
        );
        assert_eq!(
            matches(sel.as_ref(), &labels(&[("role", "web")])),
            Ok(false)
        );
        assert_eq!(
            matches(sel.as_ref(), &labels(&[("role", "web"), ("zone", "b")])),
            Ok(false)
        );
    }

    #[test]
    fn expressions() {
        let l = labels(&[("role", "web")]);
        assert_eq!(
            matches(Some(&expr("role", "In", &["web", "mail"])), &l),
            Ok(true)
        );
        assert_eq!(matches(Some(&expr("role", "In", &["mail"])), &l), Ok(false));
        assert_eq!(
            matches(Some(&expr("role", "NotIn", &["mail"])), &l),
            Ok(true)
        );
        assert_eq!(matches(Some(&expr("zone", "NotIn", &["a"])), &l), Ok(true));
        assert_eq!(matches(Some(&expr("role", "Exists", &[])), &l), Ok(true));
        assert_eq!(matches(Some(&expr("zone", "Exists", &[])), &l), Ok(false));
        assert_eq!(
            matches(Some(&expr("zone", "DoesNotExist", &[])), &l),
            Ok(true)
        );
    }

    #[test]
    fn bad_expressions_are_errors() {
        let l = labels(&[]);
        assert!(matches!(
            matches(Some(&expr("a", "Gt", &["1"])), &l),
            Err(SelectorError::UnknownOperator(_))
        ));
        assert!(matches!(
            matches(Some(&expr("a", "In", &[])), &l),
            Err(SelectorError::MissingValues { .. })
        ));
    }

    #[test]
    fn pairs_must_have_equals() {
        assert!(from_pairs(&["novalue".into()]).is_err());
        assert!(from_pairs(&["=v".into()]).is_err());
        assert_eq!(from_pairs(&[]), Ok(None));
    }
}
