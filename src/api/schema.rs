//! Hand-built schema fragments: admission rules the derive cannot express.
//!
//! The sysctl key grammar and the denylist are generated from the same constants the engine uses,
//! so what the apiserver refuses and what the agent refuses cannot drift apart.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{Schema, SchemaGenerator, json_schema};
use serde_json::json;

use super::profile::{MAX_SYSCTLS, MAX_VALUE_LEN};
use crate::sysctl::key::{KEY_MAX_LEN, KEY_PATTERN};
use crate::sysctl::policy::{DENIED_EXACT, DENIED_PREFIXES, ONE_WAY, value_rule_keys};
use crate::sysctl::value::DECIMAL_PATTERN;

/// A CEL string literal (single-quoted) for `s`.
fn cel_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn cel_list(items: &[&str]) -> String {
    let inner: Vec<String> = items.iter().map(|s| cel_str(s)).collect();
    format!("[{}]", inner.join(", "))
}

/// The canonical dotted form of the raw key `k` as CEL, for comparison with lists whose entries
/// contain no literal dots: the optional `-` marker dropped, separators folded onto dots.
const FOLDED: &str = "(k.startsWith('-') ? k.substring(1) : k).replace('/', '.')";

/// The CEL rules on `spec.sysctls`, each `(rule, messageExpression)`. The message names the
/// first offending key, since a map-level rule cannot point at the entry itself; the API server
/// already prefixes it with the field (`spec.sysctls: Invalid value: ...`), so it does not
/// name the field again.
pub fn sysctls_rules() -> Vec<(String, String)> {
    let pattern = cel_str(KEY_PATTERN);
    // A leading '-' marks an optional key (sysctl.d(5)); it does not count towards the length
    // and is dropped before the denylist comparison. Slash and dotted spellings of one key
    // differ only in separators; folding them onto dots is enough to compare against the
    // denylist, whose entries contain no literal dots.
    let max = KEY_MAX_LEN;
    let size_ok = format!("k.size() <= (k.startsWith('-') ? {} : {max})", max + 1);
    let denied = format!(
        "({FOLDED} in {exact} || {prefixes}.exists(p, {FOLDED}.startsWith(p)))",
        exact = cel_list(DENIED_EXACT),
        prefixes = cel_list(DENIED_PREFIXES),
    );
    let mut rules = vec![
        (
            format!("self.all(k, {size_ok} && k.matches({pattern}))"),
            format!(
                "'key \"' + self.filter(k, !({size_ok} && k.matches({pattern})))[0] + '\" is not a valid sysctl name (lowercase, dotted or slash form as sysctl(8) takes it, e.g. net.ipv4.tcp_fin_timeout, optionally prefixed by \"-\" when the key may be missing; no empty component, no \"..\", at most {KEY_MAX_LEN} characters)'"
            ),
        ),
        (
            format!("self.all(k, !{denied})"),
            format!(
                "'key \"' + self.filter(k, {denied})[0] + '\" is denied by the built-in denylist: it makes the kernel run a program as root, changes the node\\'s identity, or cannot be set back until reboot'"
            ),
        ),
        (
            // Tab is allowed: the kernel itself prints ranges as `1024\t65000`.
            "self.all(k, !self[k].matches('[\\\\x00-\\\\x08\\\\x0a-\\\\x1f\\\\x7f-\\\\x9f]') && self[k].matches('\\\\S'))".to_string(),
            "'value of \"' + self.filter(k, self[k].matches('[\\\\x00-\\\\x08\\\\x0a-\\\\x1f\\\\x7f-\\\\x9f]') || !self[k].matches('\\\\S'))[0] + '\" must be non-blank and contain no newline or control character'".to_string(),
        ),
    ];
    rules.extend(value_rules());
    rules
}

/// The rules judging numbers, from the engine's lists: keys under a value rule take plain
/// decimal values (`0100000` is octal to the kernel), and one-way values are refused.
fn value_rules() -> Vec<(String, String)> {
    let decimal = cel_str(DECIMAL_PATTERN);
    let not_decimal = format!(
        "({FOLDED} in {keys} && !self[k].matches({decimal}))",
        keys = cel_list(&value_rule_keys()),
    );
    let one_way: Vec<String> = ONE_WAY
        .iter()
        .map(|o| {
            format!(
                "({FOLDED} == {key} && self[k].matches({decimal}) && {cond})",
                key = cel_str(o.key),
                cond = o.one_way.cel("int(self[k].trim())"),
            )
        })
        .collect();
    let one_way = format!("({})", one_way.join(" || "));
    vec![
        (
            format!("!self.exists(k, {not_decimal})"),
            format!(
                "'value of \"' + self.filter(k, {not_decimal})[0] + '\" must be a plain decimal integer: a built-in rule judges this key, and the kernel reads a leading 0 as octal and 0x as hex'"
            ),
        ),
        (
            format!("!self.exists(k, {one_way})"),
            format!(
                "'value of \"' + self.filter(k, {one_way})[0] + '\" is one-way: the kernel cannot set it back until reboot, so nodetune refuses it'"
            ),
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
