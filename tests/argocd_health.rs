//! The Argo CD health check (deploy/argocd/health.lua) on the sample objects of
//! deploy/argocd/health_test.yaml, run by a Lua interpreter (Argo CD runs it with gopher-lua;
//! Debian's lua5.4 runs the same code). Skips loudly without one, unless
//! NODETUNE_REQUIRE_CLUSTER or NODETUNE_REQUIRE_LUA is set (CI): scripts/argocd-health installs it.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/argocd")
}

fn lua() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["lua5.4", "lua5.3", "lua"] {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return Some(p);
        }
    }
    let required = ["NODETUNE_REQUIRE_LUA", "NODETUNE_REQUIRE_CLUSTER"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty() && v != "0"));
    if required {
        panic!("no Lua interpreter (scripts/argocd-health installs lua5.4)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED argocd health tests: no Lua interpreter (run scripts/argocd-health, which installs lua5.4)"
    );
    None
}

/// A Lua table constructor for a JSON value (what Argo CD hands the script as `obj`).
fn to_lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(a) => format!(
            "{{{}}}",
            a.iter().map(to_lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), to_lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

/// Runs health.lua on `obj`; returns (status, message).
fn health(lua: &Path, obj: &Value) -> (String, String) {
    let script = std::fs::read_to_string(dir().join("health.lua")).expect("health.lua");
    let program = format!(
        "obj = {}\nlocal function check()\n{script}\nend\nlocal hs = check()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        to_lua(obj)
    );
    let out = Command::new(lua)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(program.as_bytes())?;
            child.wait_with_output()
        })
        .expect("lua runs");
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

#[test]
fn health_check_on_the_sample_profiles() {
    let Some(lua) = lua() else { return };
    let cases: Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir().join("health_test.yaml")).expect("health_test.yaml"),
    )
    .expect("yaml");
    let cases = cases["tests"].as_array().expect("tests");
    assert!(cases.len() >= 5);
    let mut seen = std::collections::BTreeSet::new();
    for case in cases {
        let input = case["inputPath"].as_str().expect("inputPath");
        let obj: Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir().join(input)).expect("sample"))
                .expect("sample yaml");
        let (status, message) = health(&lua, &obj);
        assert_eq!(
            status,
            case["healthStatus"]["status"].as_str().expect("status"),
            "{input}"
        );
        assert_eq!(
            message,
            case["healthStatus"]["message"].as_str().expect("message"),
            "{input}"
        );
        seen.insert(status);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["Degraded", "Healthy", "Progressing", "Suspended"],
        "every health state has a sample"
    );
}

#[test]
fn readme_argocd_snippet_is_the_script() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let script = std::fs::read_to_string(dir().join("health.lua")).expect("health.lua");
    let snippet = script
        .lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("    {l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        readme.contains("resource.customizations.health.nodetune.dev_NodeTuningProfile: |")
            && readme.contains(&snippet),
        "README's argocd-cm snippet must hold deploy/argocd/health.lua verbatim, indented by 4"
    );
}
