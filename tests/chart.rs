//! The Helm chart (charts/nodetune) and what is generated from it: versions, the CRD copies, the
//! scope tables the admission policy embeds, deploy/ (the chart rendered with defaults), values
//! that must fail, and the Grafana dashboard's queries. Tests that need helm skip loudly without
//! it (and fail under NODETUNE_REQUIRE_CLUSTER, as on CI).
#[path = "support/helm.rs"]
mod helm;

use std::collections::BTreeSet;
use std::path::Path;

use nodetune::api::crd;
use nodetune::sysctl::scope;
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
    let kube = chart["kubeVersion"].as_str().expect("kubeVersion is set");
    assert!(
        kube.starts_with(">=1.30"),
        "{kube}: the chart uses ValidatingAdmissionPolicy v1 and node-bound tokens (1.30)"
    );
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
  allowWeakening: [net.ipv4.tcp_syncookies]
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
               "deniedKeys": ["net\\.ipv4\\.tcp_tw_.*"], "allowWeakening": ["net.ipv4.tcp_syncookies"]})
    );
    let vap = find(&docs, "ValidatingAdmissionPolicy", "nodetune-sysctl-policy").expect("policy");
    let rules = serde_json::to_string(&vap["spec"]).expect("json");
    assert!(rules.contains("^(?:"), "patterns are anchored: {rules}");
    assert!(rules.contains("deniedKeys pattern"), "{rules}");
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
