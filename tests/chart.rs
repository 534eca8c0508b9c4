//! The Helm chart (charts/nodetune) and what is generated from it: versions, the CRD copies, the
//! scope tables the admission policy embeds, deploy/ (the chart rendered with defaults), values
//! that must fail, and the Grafana dashboard's queries. Tests that need helm skip loudly without
//! it (and fail under NODETUNE_REQUIRE_CLUSTER, as on CI).
#[path = "support/helm.rs"]
mod helm;

use std::collections::BTreeSet;
use std::path::Path;

use nodetune::api::crd;
use nodetune::sysctl::policy::{MAX_POLICY_PATTERNS, WEAKENING};
use nodetune::sysctl::{scope, value};
use serde_json::{Value, json};

fn root() -> &'static Path {
    helm::repo_root()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn chart_yaml() -> serde_yaml::Value {
    serde_yaml::from_str(&read("charts/nodetune/Chart.yaml")).expect("Chart.yaml parses")
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart = chart_yaml();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "charts/nodetune/Chart.yaml appVersion must equal the crate version (Cargo.toml)"
    );
    // Issue 17 item 9: a kubeVersion makes offline `helm template` fail; the requirement is an
    // annotation that templates/policy.yaml checks where the cluster is known.
    assert!(
        chart["kubeVersion"].is_null(),
        "no kubeVersion: helm checks it offline against a made-up v1.20.0"
    );
    let kube = chart["annotations"]["nodetune.dev/kube-version"]
        .as_str()
        .expect("the nodetune.dev/kube-version annotation is set");
    assert!(
        kube.starts_with(">=1.30"),
        "{kube}: the chart uses ValidatingAdmissionPolicy v1 and node-bound tokens (1.30)"
    );
}

/// Issue 17 item 9: `helm template charts/nodetune` renders offline (no cluster, no
/// --kube-version), while a known version below the requirement fails with a clear message.
#[test]
fn chart_renders_offline_and_checks_a_known_kube_version() {
    let Some(helm) = helm::helm("chart_renders_offline_and_checks_a_known_kube_version") else {
        return;
    };
    let render = |args: &[&str]| {
        let out = std::process::Command::new(&helm)
            .current_dir(root())
            .args(["template", "nodetune", "charts/nodetune"])
            .args(args)
            .output()
            .expect("helm runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = render(&[]);
    assert!(ok, "offline helm template: {out}");
    assert!(out.contains("kind: ValidatingAdmissionPolicy"), "{out}");
    let (ok, out) = render(&["--kube-version", "1.29.9"]);
    assert!(!ok, "1.29 accepted: {out}");
    assert!(
        out.contains("nodetune needs Kubernetes >=1.30.0-0") && out.contains("v1.29.9"),
        "{out}"
    );
    let (ok, out) = render(&["--kube-version", &helm::kube_version()]);
    assert!(ok, "{out}");
}

#[test]
fn chart_crds_match_the_types() {
    for c in crd::all() {
        let name = crd::file_name(&c);
        let want = crd::to_yaml(&c).expect("CRD serialises");
        for dir in ["crds", "charts/nodetune/files/crds"] {
            let have = std::fs::read_to_string(root().join(dir).join(&name)).unwrap_or_default();
            assert!(
                have == want,
                "{dir}/{name} differs from `nodetune crd`: run scripts/generate"
            );
        }
    }
    let names = |dir: &str| -> BTreeSet<String> {
        std::fs::read_dir(root().join(dir))
            .expect("dir exists")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    };
    assert_eq!(names("crds"), names("charts/nodetune/files/crds"));
}

/// The scope tables as the chart's admission policy embeds them.
fn scopes_json() -> String {
    let v = json!({
        "ipcExact": scope::IPC_EXACT,
        "ipcPrefixes": scope::IPC_PREFIXES,
        "nodeNetExact": scope::NODE_GLOBAL_NET_EXACT,
        "nodeNetPrefixes": scope::NODE_GLOBAL_NET_PREFIXES,
    });
    serde_json::to_string_pretty(&v).expect("json") + "\n"
}

#[test]
fn scopes_file_matches_the_agent() {
    let path = root().join("charts/nodetune/files/scopes.json");
    let want = scopes_json();
    if std::env::var_os("NODETUNE_REGENERATE").is_some() {
        std::fs::write(&path, &want).expect("write scopes.json");
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "charts/nodetune/files/scopes.json differs from src/sysctl/scope.rs: run scripts/generate"
    );
}

/// The weakening list as the chart's admission policy embeds it (`files/rules.json`): keys,
/// the comparison that makes a value weaken (`n < 2`: op `<`, than 2), and the plain-decimal
/// pattern.
fn rules_json() -> String {
    let weakening: Vec<Value> = WEAKENING
        .iter()
        .map(|w| {
            let (op, than) = w.weakens.comparison();
            json!({"key": w.key, "op": op, "than": than})
        })
        .collect();
    let v = json!({"decimalPattern": value::DECIMAL_PATTERN, "weakening": weakening});
    serde_json::to_string_pretty(&v).expect("json") + "\n"
}

/// `text` with the block that starts at the line containing `start` and ends before the first
/// line at its indentation or less replaced by `block` (the block's own first line included).
fn replace_block(text: &str, start: &str, block: &str) -> String {
    let Some(at) = text.find(start) else {
        return text.to_owned();
    };
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let indent = at - line_start;
    let mut end = text[at..].find('\n').map_or(text.len(), |i| at + i + 1);
    while end < text.len() {
        let line = &text[end..];
        let next = line.find('\n').map_or(line.len(), |i| i + 1);
        let spaces = line.len() - line.trim_start_matches(' ').len();
        if spaces <= indent
            && !line.trim_start().starts_with('}')
            && !line.trim_start().starts_with(']')
        {
            break;
        }
        end += next;
        if spaces == indent {
            break;
        }
    }
    format!("{}{block}{}", &text[..line_start], &text[end..])
}

/// `text` with its first run of lines starting with `prefix` replaced by `block`.
fn replace_run(text: &str, prefix: &str, block: &str) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let Some(first) = lines.iter().position(|l| l.starts_with(prefix)) else {
        return text.to_owned();
    };
    let run = lines[first..]
        .iter()
        .take_while(|l| l.starts_with(prefix))
        .count();
    let mut out: String = lines[..first].concat();
    out.push_str(block);
    out.push_str(&lines[first + run..].concat());
    out
}

/// `allowWeakening` in values.schema.json: exactly the keys of the weakening list.
fn schema_block() -> String {
    let keys: Vec<String> = WEAKENING
        .iter()
        .map(|w| format!("              {}", Value::from(w.key)))
        .collect();
    format!(
        "        \"allowWeakening\": {{\n          \"description\": \"Keys of the built-in weakening list (WEAKENING in src/sysctl/policy.rs; generated by scripts/generate) whose weakening values profiles may set. The agents refuse any other key, and with it the whole policy.\",\n          \"type\": \"array\",\n          \"uniqueItems\": true,\n          \"items\": {{\n            \"enum\": [\n{}\n            ]\n          }}\n        }}\n",
        keys.join(",\n")
    )
}

/// The list in the comment above `allowWeakening` in values.yaml.
fn values_comment_block() -> String {
    WEAKENING
        .iter()
        .map(|w| format!("  #   {}: {}\n", w.key, w.weak_values))
        .collect()
}

/// Issue 17 item 4: the chart's copies of the weakening list (admission policy, values schema,
/// values.yaml's comment) are generated from the agent's and must not drift.
#[test]
fn weakening_list_files_match_the_agent() {
    let rules_path = root().join("charts/nodetune/files/rules.json");
    let schema_path = root().join("charts/nodetune/values.schema.json");
    let values_path = root().join("charts/nodetune/values.yaml");
    let schema_text = read("charts/nodetune/values.schema.json");
    let schema_want = replace_block(&schema_text, "\"allowWeakening\": {", &schema_block());
    let values_text = read("charts/nodetune/values.yaml");
    let values_want = replace_run(&values_text, "  #   ", &values_comment_block());
    if std::env::var_os("NODETUNE_REGENERATE").is_some() {
        std::fs::write(&rules_path, rules_json()).expect("write rules.json");
        std::fs::write(&schema_path, &schema_want).expect("write values.schema.json");
        std::fs::write(&values_path, &values_want).expect("write values.yaml");
    }
    let have = std::fs::read_to_string(&rules_path).unwrap_or_default();
    assert!(
        have == rules_json(),
        "charts/nodetune/files/rules.json differs from src/sysctl: run scripts/generate"
    );
    let schema: Value = serde_json::from_str(&read("charts/nodetune/values.schema.json"))
        .expect("values.schema.json is JSON");
    let listed: Vec<&str> = schema["properties"]["policy"]["properties"]["allowWeakening"]["items"]
        ["enum"]
        .as_array()
        .expect("allowWeakening is an enum")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let keys: Vec<&str> = WEAKENING.iter().map(|w| w.key).collect();
    assert_eq!(listed, keys, "values.schema.json: run scripts/generate");
    for list in ["allowedKeys", "deniedKeys"] {
        assert_eq!(
            schema["properties"]["policy"]["properties"][list]["maxItems"],
            json!(MAX_POLICY_PATTERNS),
            "{list}: the agents refuse more patterns"
        );
    }
    assert!(
        read("charts/nodetune/values.schema.json") == schema_want,
        "values.schema.json differs from src/sysctl: run scripts/generate"
    );
    assert!(
        read("charts/nodetune/values.yaml") == values_want,
        "the weakening list in values.yaml's comment differs from src/sysctl: run scripts/generate"
    );
    assert!(values_want.contains(&values_comment_block()));
}

#[test]
fn deploy_is_the_chart_rendered_with_defaults() {
    let Some(helm) = helm::helm("deploy_is_the_chart_rendered_with_defaults") else {
        return;
    };
    let out = std::process::Command::new(root().join("scripts/render-deploy"))
        .env("HELM", &helm)
        .output()
        .expect("scripts/render-deploy runs");
    assert!(
        out.status.success(),
        "render-deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = String::from_utf8_lossy(&out.stdout);
    assert!(
        read("deploy/nodetune.yaml") == want,
        "deploy/nodetune.yaml differs from the chart rendered with defaults: run scripts/generate"
    );
    // kubectl apply order: nothing that runs before what it needs.
    let docs = helm::documents(&want);
    let pos = |kind: &str| {
        docs.iter()
            .position(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("deploy/nodetune.yaml has no {kind}"))
    };
    for before in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRoleBinding",
        "ConfigMap",
    ] {
        assert!(
            pos(before) < pos("Deployment"),
            "{before} must come before the Deployment"
        );
    }
    assert!(pos("Namespace") < pos("ServiceAccount"));
    assert!(
        !docs.iter().any(|d| d["kind"] == "Job"),
        "the uninstall hook must not be in deploy/ (kubectl apply would run it)"
    );
    let kustomization = read("deploy/kustomization.yaml");
    assert!(kustomization.contains("- nodetune.yaml"));
}

#[test]
fn chart_lints_and_refuses_bad_values() {
    let Some(helm) = helm::helm("chart_lints_and_refuses_bad_values") else {
        return;
    };
    let kube = helm::kube_version();
    let lint = std::process::Command::new(&helm)
        .current_dir(root())
        .args([
            "lint",
            "--strict",
            "charts/nodetune",
            "--kube-version",
            &kube,
        ])
        .output()
        .expect("helm lint runs");
    assert!(
        lint.status.success(),
        "helm lint --strict: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    for (set, complaint) in [
        ("policy.allowedScopes={Nodes}", "allowedScopes"),
        ("agent.interval=5x", "interval"),
        ("agent.maxUnavailable=ten", "maxUnavailable"),
        ("agent.podTargeting.enabled=sometimes", "enabled"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("log.format=xml", "format"),
        ("controller.replicas=0", "replicas"),
        ("unknownValue=1", "unknownValue"),
        // Issue 17 item 4: not on the weakening list; every agent would refuse the policy.
        (
            "policy.allowWeakening={net.ipv4.tcp_syncookies}",
            "allowWeakening",
        ),
        (
            "policy.allowWeakening={kernel/kptr_restrict}",
            "allowWeakening",
        ),
        // A pattern the agents cannot compile.
        ("policy.deniedKeys={net\\.ipv4\\.(}", "missing closing )"),
    ] {
        let err = helm::template(&helm, &["--set", set]).expect_err(set);
        assert!(err.contains(complaint), "--set {set}: {err}");
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

#[test]
fn chart_values_reach_the_objects() {
    let Some(helm) = helm::helm("chart_values_reach_the_objects") else {
        return;
    };
    let values = root().join("target/chart-test-values.yaml");
    std::fs::create_dir_all(values.parent().expect("parent")).expect("target dir");
    std::fs::write(
        &values,
        r#"
image: {tag: "9.9.9", digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
imagePullSecrets: [{name: regcred}]
log: {format: json, level: debug}
agent: {interval: 7s, maxUnavailable: 2, priorityClassName: "", podTargeting: {enabled: false}}
policy:
  allowedScopes: [NetworkNamespace]
  allowedKeys: ['net\.ipv4\..*']
  deniedKeys: ['net\.ipv4\.tcp_tw_.*']
  allowWeakening: [kernel.perf_event_paranoid]
crds: {keep: false}
metrics: {serviceMonitor: {enabled: true}, podMonitor: {enabled: true}, dashboard: {enabled: true}}
"#,
    )
    .expect("write values");
    let text = helm::template(&helm, &["-f", &values.to_string_lossy()]).expect("renders");
    let docs = helm::documents(&text);

    let deploy = find(&docs, "Deployment", "nodetune-controller").expect("controller");
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    let image = "ghcr.io/nodetune/nodetune:9.9.9@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    assert_eq!(c["image"], image);
    let env = |name: &str| {
        c["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(env("NODETUNE_AGENT_IMAGE"), image);
    assert_eq!(env("NODETUNE_AGENT_INTERVAL"), "7s");
    assert_eq!(env("NODETUNE_AGENT_POD_TARGETING"), "false");
    assert_eq!(env("NODETUNE_AGENT_MAX_UNAVAILABLE"), "2");
    assert_eq!(env("NODETUNE_AGENT_PRIORITY_CLASS"), "");
    assert_eq!(
        env("NODETUNE_AGENT_IMAGE_PULL_SECRETS"),
        r#"[{"name":"regcred"}]"#
    );
    assert_eq!(env("NODETUNE_LOG_JSON"), "true");
    assert_eq!(env("NODETUNE_AGENT_LOG_JSON"), "true");
    assert_eq!(env("NODETUNE_AGENT_POLICY_CONFIGMAP"), "nodetune-policy");
    assert_eq!(env("NODETUNE_OWNER_DEPLOYMENT"), "nodetune-controller");

    // The policy ConfigMap holds the same camelCase fields the agent reads.
    let cm = find(&docs, "ConfigMap", "nodetune-policy").expect("policy ConfigMap");
    let policy: Value =
        serde_yaml::from_str(cm["data"]["policy.yaml"].as_str().expect("policy.yaml"))
            .expect("yaml");
    assert_eq!(
        policy,
        json!({"allowedScopes": ["NetworkNamespace"], "allowedKeys": ["net\\.ipv4\\..*"],
               "deniedKeys": ["net\\.ipv4\\.tcp_tw_.*"], "allowWeakening": ["kernel.perf_event_paranoid"]})
    );
    let vap = find(&docs, "ValidatingAdmissionPolicy", "nodetune-sysctl-policy").expect("policy");
    let rules = serde_json::to_string(&vap["spec"]).expect("json");
    assert!(rules.contains("^(?:"), "patterns are anchored: {rules}");
    assert!(rules.contains("deniedKeys pattern"), "{rules}");
    // The weakening rule names the listed keys less the allowed one.
    assert!(rules.contains("kernel.kptr_restrict"), "{rules}");
    assert!(!rules.contains("kernel.perf_event_paranoid"), "{rules}");
    assert!(
        find(
            &docs,
            "ValidatingAdmissionPolicyBinding",
            "nodetune-sysctl-policy"
        )
        .is_some()
    );
    assert!(
        find(
            &docs,
            "ValidatingAdmissionPolicy",
            "nodetune-agent-own-report"
        )
        .is_some()
    );

    // crds.keep=false: no keep annotation; the CRDs are still there.
    let crd = find(
        &docs,
        "CustomResourceDefinition",
        "nodetuningprofiles.nodetune.dev",
    )
    .expect("crd");
    assert!(crd["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "ServiceMonitor").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "PodMonitor").count(), 1);
    let dash = find(&docs, "ConfigMap", "nodetune-dashboard").expect("dashboard");
    let _: Value = serde_json::from_str(dash["data"]["nodetune.json"].as_str().expect("json"))
        .expect("the dashboard is valid JSON");
    let job = find(&docs, "Job", "nodetune-uninstall").expect("uninstall hook");
    assert_eq!(job["metadata"]["annotations"]["helm.sh/hook"], "pre-delete");

    // Defaults: CRDs kept; crds.enabled=false drops them.
    let defaults = helm::documents(&helm::template(&helm, &[]).expect("defaults"));
    let crd = find(
        &defaults,
        "CustomResourceDefinition",
        "nodetuningreports.nodetune.dev",
    )
    .expect("crd");
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let deploy = find(&defaults, "Deployment", "nodetune-controller").expect("controller");
    assert_eq!(
        deploy["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/nodetune/nodetune:{}", env!("CARGO_PKG_VERSION"))
    );
    let none =
        helm::documents(&helm::template(&helm, &["--set", "crds.enabled=false"]).expect("no crds"));
    assert!(!none.iter().any(|d| d["kind"] == "CustomResourceDefinition"));
}

/// Metric families named in the README's metrics table (`| \`name\` | ...`).
fn readme_metrics() -> BTreeSet<String> {
    read("README.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `nodetune_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("nodetune_{n}"))
        .collect()
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let dash: Value = serde_json::from_str(&read("charts/nodetune/files/dashboards/nodetune.json"))
        .expect("valid JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 4, "the dashboard has queries: {exprs:?}");
    // What the binaries really export (read from their registries), and the README table.
    let known: BTreeSet<String> = nodetune::agent::metrics::exported_names()
        .into_iter()
        .chain(nodetune::controller::metrics::exported_names())
        .collect();
    let documented = readme_metrics();
    assert!(
        known.is_subset(&documented),
        "exported but not in the README metrics table: {:?}",
        known.difference(&documented).collect::<Vec<_>>()
    );
    assert!(
        known.contains("nodetune_tcp_sockets"),
        "README metrics table: {known:?}"
    );
    for e in &exprs {
        for name in metric_names(e) {
            let name = name.as_str();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                known.contains(family),
                "dashboard queries {name}, which is not in the README metrics table: {e}"
            );
        }
    }
    for needed in [
        "nodetune_tcp_sockets",
        "nodetune_sysctl_keys",
        "nodetune_agent_drift_corrections_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(needed)),
            "no panel shows {needed}"
        );
    }
}

/// Every `nodetune_[a-z0-9_]+` word in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("nodetune_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "expr"
                    && let Some(s) = v.as_str()
                {
                    out.push(s.to_string());
                }
                collect_exprs(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// `kubectl explain` shows a description for every spec and status field (recursively).
#[test]
fn every_spec_and_status_field_has_a_description() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema["properties"].as_object() {
            for (name, sub) in props {
                let p = format!("{path}.{name}");
                if sub["description"]
                    .as_str()
                    .is_none_or(|d| d.trim().is_empty())
                {
                    missing.push(p.clone());
                }
                walk(&p, sub, missing);
            }
        }
        if schema["items"].is_object() {
            walk(&format!("{path}[]"), &schema["items"], missing);
        }
        if schema["additionalProperties"].is_object() {
            walk(
                &format!("{path}{{}}"),
                &schema["additionalProperties"],
                missing,
            );
        }
    }
    let mut missing = Vec::new();
    for c in crd::all() {
        let v = serde_json::to_value(&c).expect("json");
        let kind = v["spec"]["names"]["kind"]
            .as_str()
            .expect("kind")
            .to_string();
        for version in v["spec"]["versions"].as_array().expect("versions") {
            let root = &version["schema"]["openAPIV3Schema"]["properties"];
            for part in ["spec", "status"] {
                walk(&format!("{kind}.{part}"), &root[part], &mut missing);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}

/// Issue 17 item 18: `kubectl explain` wraps descriptions itself, so a line break kept from a
/// wrapped doc comment cuts a sentence in two. Only paragraph breaks and list items may break.
#[test]
fn crd_descriptions_do_not_break_mid_sentence() {
    fn walk(path: &str, v: &Value, broken: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = format!("{path}.{k}");
                    if k == "description"
                        && let Some(d) = v.as_str()
                    {
                        let lines: Vec<&str> = d.lines().collect();
                        for pair in lines.windows(2) {
                            let next = pair[1].trim_start();
                            let ok = pair[0].trim().is_empty()
                                || next.is_empty()
                                || next.starts_with("* ")
                                || next.starts_with("- ");
                            if !ok {
                                broken.push(format!("{p}: {:?} / {:?}", pair[0], pair[1]));
                            }
                        }
                    }
                    walk(&p, v, broken);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(path, v, broken)),
            _ => {}
        }
    }
    let mut broken = Vec::new();
    for c in crd::all() {
        walk("", &serde_json::to_value(&c).expect("json"), &mut broken);
    }
    assert!(
        broken.is_empty(),
        "descriptions broken mid-sentence: {broken:#?}"
    );
}

/// Issue 17 item 18: the example in `kubectl explain ntp.spec.sysctls` must not be a value
/// `plan` warns about (it was a port range overlapping the NodePort range).
#[test]
fn crd_sysctls_example_draws_no_warning() {
    let v = serde_json::to_value(&crd::all()[0]).expect("json");
    let d = v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["sysctls"]["description"]
        .as_str()
        .expect("description")
        .to_owned();
    let example = d
        .split('`')
        .find_map(|part| part.split_once(": \""))
        .map(|(k, v)| (k.trim().to_owned(), v.trim_end_matches('"').to_owned()))
        .expect("an example `key: \"value\"` in the description");
    let warnings = nodetune::sysctl::checks::check([example.clone()], None);
    assert!(
        warnings.is_empty(),
        "{example:?} in the description draws {warnings:?}"
    );
}

/// kube-score findings the chart keeps on purpose, as `Kind/name check-id (container): summary`,
/// each with the reason. Any other finding fails `chart_is_kube_score_clean`.
const KUBE_SCORE_ACCEPTED: &[(&str, &str)] = &[
    (
        "Deployment/nodetune-controller pod-networkpolicy: The pod does not have a matching NetworkPolicy",
        "the controller only dials out to the API server, whose address and CNI are the \
         cluster's; an egress NetworkPolicy cannot be written portably (users add their own)",
    ),
    (
        "Job/nodetune-uninstall pod-networkpolicy: The pod does not have a matching NetworkPolicy",
        "as the controller: the hook only talks to the API server",
    ),
    (
        "Deployment/nodetune-controller container-resources (controller): CPU limit is not set",
        "deliberate (values: controller.resources): a throttled controller only acts late; \
         requests and the memory limit are set",
    ),
    (
        "Deployment/nodetune-controller container-image-pull-policy (controller): ImagePullPolicy is not set to Always",
        "the image is pinned by tag or digest; the policy is image.pullPolicy (IfNotPresent \
         keeps the controller starting while the registry is down)",
    ),
    (
        "Job/nodetune-uninstall container-image-pull-policy (uninstall): ImagePullPolicy is not set to Always",
        "as the controller, and the hook must run on uninstall even when the registry is down",
    ),
    (
        "Deployment/nodetune-controller container-ephemeral-storage-request-and-limit (controller): Ephemeral Storage limit is not set",
        "the root filesystem is read-only and nothing is written to local storage",
    ),
    (
        "Deployment/nodetune-controller container-ephemeral-storage-request-and-limit (controller): Ephemeral Storage request is not set",
        "as the limit: no local storage is used",
    ),
    (
        "Job/nodetune-uninstall container-ephemeral-storage-request-and-limit (uninstall): Ephemeral Storage limit is not set",
        "read-only root filesystem: the hook writes nothing locally",
    ),
    (
        "Job/nodetune-uninstall container-ephemeral-storage-request-and-limit (uninstall): Ephemeral Storage request is not set",
        "as the limit",
    ),
    (
        "Service/nodetune-agent-metrics service-targets-pod: The services selector does not match any pods",
        "the agent pods come from the DaemonSet the controller renders at run time, not from \
         the chart, so kube-score cannot see them",
    ),
];

/// kube-score's findings (grade below 10, not skipped) on a rendered manifest, in the form of
/// [`KUBE_SCORE_ACCEPTED`].
fn kube_score_findings(report: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for object in report.as_array().into_iter().flatten() {
        let kind = object["type_meta"]["kind"].as_str().unwrap_or("?");
        let name = object["object_meta"]["name"].as_str().unwrap_or("?");
        for check in object["checks"].as_array().into_iter().flatten() {
            if check["skipped"] == true || check["grade"].as_u64() == Some(10) {
                continue;
            }
            let id = check["check"]["id"].as_str().unwrap_or("?");
            for comment in check["comments"].as_array().into_iter().flatten() {
                let path = comment["path"].as_str().unwrap_or_default();
                let path = if path.is_empty() {
                    String::new()
                } else {
                    format!(" ({path})")
                };
                let summary = comment["summary"].as_str().unwrap_or_default();
                out.insert(format!("{kind}/{name} {id}{path}: {summary}"));
            }
        }
    }
    out
}

/// Issue 17, item 17: kube-score finds nothing in the chart but the accepted findings (the
/// controller's PodDisruptionBudget and the hook's resources were missing). kube-score is
/// installed once by scripts/kube-score, outside the repository.
#[test]
fn chart_is_kube_score_clean() {
    let Some(helm) = helm::helm("chart_is_kube_score_clean") else {
        return;
    };
    let install = std::process::Command::new(root().join("scripts/kube-score"))
        .arg("--install")
        .output()
        .expect("scripts/kube-score runs");
    if !install.status.success() {
        let why = String::from_utf8_lossy(&install.stderr);
        let required =
            std::env::var("NODETUNE_REQUIRE_CLUSTER").is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(!required, "cannot install kube-score: {why}");
        eprintln!("SKIPPED chart_is_kube_score_clean: cannot install kube-score: {why}");
        return;
    }
    let kube_score = String::from_utf8_lossy(&install.stdout).trim().to_string();
    let rendered = root().join("target/chart-kube-score.yaml");
    std::fs::create_dir_all(rendered.parent().expect("parent")).expect("target dir");
    let text = helm::template(&helm, &["--set", "uninstall.hook=true"]).expect("renders");
    std::fs::write(&rendered, text).expect("write the rendered chart");
    let out = std::process::Command::new(&kube_score)
        .args(["score", "--output-format", "json"])
        .arg(&rendered)
        .output()
        .expect("kube-score runs");
    // kube-score exits 1 when it has findings; the JSON says which.
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kube-score JSON: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let found = kube_score_findings(&report);
    assert!(
        found
            .iter()
            .any(|f| f.starts_with("Deployment/nodetune-controller")),
        "kube-score scored the controller: {report}"
    );
    let accepted: BTreeSet<String> = KUBE_SCORE_ACCEPTED
        .iter()
        .map(|(f, _)| f.to_string())
        .collect();
    let new: Vec<&String> = found.difference(&accepted).collect();
    assert!(
        new.is_empty(),
        "kube-score findings that are not accepted (fix the chart, or accept one with a reason \
         in KUBE_SCORE_ACCEPTED): {new:#?}"
    );
}

/// Issue 17, items 3 and 17: the agents' metrics bind address and authentication reach the
/// controller (which renders the agents) and the agent's RBAC; the controller gets a
/// PodDisruptionBudget when it runs more than one replica; the hook Job has resources.
#[test]
fn chart_metrics_and_disruption_values_reach_the_objects() {
    let Some(helm) = helm::helm("chart_metrics_and_disruption_values_reach_the_objects") else {
        return;
    };
    let env = |docs: &[Value], name: &str| -> Value {
        let deploy = find(docs, "Deployment", "nodetune-controller").expect("controller");
        deploy["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
            .unwrap_or(Value::Null)
    };
    let agent_rules = |docs: &[Value]| -> String {
        let role = find(docs, "ClusterRole", "nodetune-agent").expect("agent role");
        serde_json::to_string(&role["rules"]).expect("json")
    };

    let defaults = helm::documents(&helm::template(&helm, &[]).expect("defaults"));
    assert_eq!(env(&defaults, "NODETUNE_AGENT_METRICS_BIND"), "hostIP");
    assert_eq!(env(&defaults, "NODETUNE_AGENT_METRICS_AUTH"), "false");
    assert!(!agent_rules(&defaults).contains("tokenreviews"));
    assert!(find(&defaults, "ClusterRole", "nodetune-metrics-reader").is_none());
    let pdb = find(&defaults, "PodDisruptionBudget", "nodetune-controller").expect("a PDB");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "controller"
    );
    let job = find(&defaults, "Job", "nodetune-uninstall").expect("uninstall hook");
    let resources = &job["spec"]["template"]["spec"]["containers"][0]["resources"];
    assert_eq!(resources["requests"]["memory"], "32Mi", "{resources}");
    assert_eq!(resources["limits"]["cpu"], "100m", "{resources}");

    let secured = helm::documents(
        &helm::template(
            &helm,
            &[
                "--set",
                "agent.metricsAuth=true,agent.metricsBindAddress=::,controller.replicas=1",
                "--set",
                "metrics.serviceMonitor.enabled=true",
            ],
        )
        .expect("renders"),
    );
    assert_eq!(env(&secured, "NODETUNE_AGENT_METRICS_BIND"), "::");
    assert_eq!(env(&secured, "NODETUNE_AGENT_METRICS_AUTH"), "true");
    let rules = agent_rules(&secured);
    assert!(
        rules.contains("tokenreviews") && rules.contains("subjectaccessreviews"),
        "{rules}"
    );
    let reader = find(&secured, "ClusterRole", "nodetune-metrics-reader").expect("reader role");
    assert_eq!(reader["rules"][0]["nonResourceURLs"][0], "/metrics");
    let sm = find(&secured, "ServiceMonitor", "nodetune-agent").expect("agent monitor");
    assert!(
        sm["spec"]["endpoints"][0]["bearerTokenFile"].is_string(),
        "{sm}"
    );
    assert!(
        find(&secured, "PodDisruptionBudget", "nodetune-controller").is_none(),
        "one replica: a PDB would block every drain"
    );
    let min = helm::documents(
        &helm::template(
            &helm,
            &["--set", "controller.podDisruptionBudget.minAvailable=1"],
        )
        .expect("renders"),
    );
    let pdb = find(&min, "PodDisruptionBudget", "nodetune-controller").expect("a PDB");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(pdb["spec"]["maxUnavailable"].is_null(), "{pdb}");

    for (set, complaint) in [
        ("agent.metricsBindAddress=eth0", "metricsBindAddress"),
        (
            "controller.podDisruptionBudget.maxUnavailable=0",
            "maxUnavailable",
        ),
        ("uninstall.resources.limits.memory=lots", "memory"),
    ] {
        let err = helm::template(&helm, &["--set", set]).expect_err(set);
        assert!(err.contains(complaint), "--set {set}: {err}");
    }
}
