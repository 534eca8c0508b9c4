//! Hand-built schema fragments: admission rules the derive cannot express.
//!
//! The sysctl key grammar and the denylist are generated from the same constants the engine uses,
//! so what the apiserver refuses and what the agent refuses cannot drift apart.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{Schema, SchemaGenerator, json_schema};
use serde_json::json;

use super::profile::{MAX_SYSCTLS, MAX_VALUE_LEN};
use crate::sysctl::key::{KEY_MAX_LEN, KEY_PATTERN};
use crate::sysctl::policy::{DENIED_EXACT, DENIED_PREFIXES};

/// A CEL string literal (single-quoted) for `s`.
fn cel_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn cel_list(items: &[&str]) -> String {
    let inner: Vec<String> = items.iter().map(|s| cel_str(s)).collect();
    format!("[{}]", inner.join(", "))
}

/// The CEL rules on `spec.sysctls`, each `(rule, messageExpression)`. The message names the
/// field and the first offending key, since a map-level rule cannot point at the entry itself.
pub fn sysctls_rules() -> Vec<(String, String)> {
    let pattern = cel_str(KEY_PATTERN);
    // A leading '-' marks an optional key (sysctl.d(5)); it does not count towards the length
    // and is dropped before the denylist comparison. Slash and dotted spellings of one key
    // differ only in separators; folding them onto dots is enough to compare against the
    // denylist, whose entries contain no literal dots.
    let max = KEY_MAX_LEN;
    let size_ok = format!("k.size() <= (k.startsWith('-') ? {} : {max})", max + 1);
    let folded = "(k.startsWith('-') ? k.substring(1) : k).replace('/', '.')";
    let denied = format!(
        "({folded} in {exact} || {prefixes}.exists(p, {folded}.startsWith(p)))",
        exact = cel_list(DENIED_EXACT),
        prefixes = cel_list(DENIED_PREFIXES),
    );
    vec![
        (
            format!("self.all(k, {size_ok} && k.matches({pattern}))"),
            format!(
                "'spec.sysctls: key \"' + self.filter(k, !({size_ok} && k.matches({pattern})))[0] + '\" is not a valid sysctl name (lowercase, dotted or slash form as sysctl(8) takes it, e.g. net.ipv4.tcp_fin_timeout, optionally prefixed by \"-\" when the key may be missing; no empty component, no \"..\", at most {KEY_MAX_LEN} characters)'"
            ),
        ),
        (
            format!("self.all(k, !{denied})"),
            format!(
                "'spec.sysctls: key \"' + self.filter(k, {denied})[0] + '\" is denied: it can run code on the node or change its identity'"
            ),
        ),
        (
            // Tab is allowed: the kernel itself prints ranges as `1024\t65000`.
            "self.all(k, !self[k].matches('[\\\\x00-\\\\x08\\\\x0a-\\\\x1f\\\\x7f-\\\\x9f]') && self[k].matches('\\\\S'))".to_string(),
            "'spec.sysctls: value of \"' + self.filter(k, self[k].matches('[\\\\x00-\\\\x08\\\\x0a-\\\\x1f\\\\x7f-\\\\x9f]') || !self[k].matches('\\\\S'))[0] + '\" must be non-blank and contain no newline or control character'".to_string(),
        ),
    ]
}

/// Schema of `spec.sysctls`: a bounded string map with the rules above.
pub fn sysctls(_: &mut SchemaGenerator) -> Schema {
    let rules: Vec<serde_json::Value> = sysctls_rules()
        .into_iter()
        .map(|(rule, message)| json!({"rule": rule, "messageExpression": message, "reason": "FieldValueInvalid"}))
        .collect();
    json_schema!({
        "type": "object",
        "description": "Sysctl key (dotted or slash form) to value.",
        "minProperties": 1,
        "maxProperties": MAX_SYSCTLS,
        "additionalProperties": {"type": "string", "maxLength": MAX_VALUE_LEN},
        "x-kubernetes-validations": rules,
    })
}

/// `metav1.Condition` list as a list-map keyed by `type`, so server-side apply merges by type.
pub fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    let obj = schema.ensure_object();
    obj.insert("x-kubernetes-list-type".into(), json!("map"));
    obj.insert("x-kubernetes-list-map-keys".into(), json!(["type"]));
    schema
}
