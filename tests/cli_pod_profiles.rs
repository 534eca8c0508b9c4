//! Local commands and pod-targeting profiles: `nodetune plan` (and `apply --local`, which shares
//! the merge) never plans a pod-targeting profile's keys for this machine's namespace, and says
//! so instead of staying silent. Needs nothing but the built binary (plan only reads /proc/sys).
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_nodetune");

fn plan(path: &str) -> (Option<i32>, serde_json::Value, String) {
    let out = Command::new(BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["plan", "-o", "json", "-f", path])
        .output()
        .expect("nodetune runs");
    let doc = serde_json::from_slice(&out.stdout).expect("plan prints JSON");
    (
        out.status.code(),
        doc,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn profiles_of(doc: &serde_json::Value) -> Vec<String> {
    doc["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["profile"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn plan_leaves_pod_targeting_profiles_out_and_says_so() {
    let (code, doc, stderr) = plan("deploy/examples/squid-pods.yaml");
    assert_eq!(code, Some(0), "nothing to do on the host: {stderr}");
    assert!(profiles_of(&doc).is_empty(), "{doc}");
    assert!(
        stderr.contains("note: profile squid-pods targets pods") && stderr.contains("never"),
        "{stderr}"
    );
    // Beside host profiles (the whole examples directory): theirs are planned, its are not.
    let (_, doc, _) = plan("deploy/examples");
    let profiles = profiles_of(&doc);
    assert!(
        profiles.iter().any(|p| p == "caching-proxy"),
        "{profiles:?}"
    );
    assert!(!profiles.iter().any(|p| p == "squid-pods"), "{profiles:?}");
}
