//! Every test that needs the control plane is `#[ignore]`d, so that a plain `cargo test` (no
//! root, no binaries) counts it as ignored, never as passed; `scripts/test` runs them with
//! `--include-ignored`. A test file belongs to the cluster tiers when it includes the cluster
//! support library (`mod support;`). This reads the test sources: it fails naming any test
//! function in such a file that lacks `#[ignore = ...]`.
use std::path::Path;

/// The test functions of one source file: (name, ignored?).
fn tests_in(source: &str) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    let mut attrs: Vec<&str> = Vec::new();
    for line in source.lines().map(str::trim) {
        if line.starts_with("#[") {
            attrs.push(line);
            continue;
        }
        let is_test = attrs
            .iter()
            .any(|a| *a == "#[test]" || a.starts_with("#[tokio::test"));
        if is_test && let Some(name) = fn_name(line) {
            let ignored = attrs.iter().any(|a| a.starts_with("#[ignore"));
            found.push((name.to_string(), ignored));
        }
        if !line.starts_with("//") {
            attrs.clear();
        }
    }
    found
}

fn fn_name(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("pub ").unwrap_or(line);
    let rest = rest.strip_prefix("async ").unwrap_or(rest);
    let rest = rest.strip_prefix("fn ")?;
    rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
}

#[test]
fn every_cluster_test_is_ignored_by_default() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut cluster_tests = 0;
    let mut not_ignored = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/ is readable") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("test source is UTF-8");
        if !source.lines().any(|l| l.trim() == "mod support;") {
            continue;
        }
        for (name, ignored) in tests_in(&source) {
            cluster_tests += 1;
            if !ignored {
                not_ignored.push(format!(
                    "{}::{name}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ));
            }
        }
    }
    assert!(
        cluster_tests >= 10,
        "found only {cluster_tests} cluster tests: is the scan broken?"
    );
    assert!(
        not_ignored.is_empty(),
        "cluster tests a plain `cargo test` would report as passed: {not_ignored:?}"
    );
}

#[test]
fn the_scan_sees_attributes_of_each_function() {
    let src =
        "#[tokio::test]\n#[ignore = \"x\"]\nasync fn a() {}\n\n#[test]\nfn b() {}\nfn c() {}\n";
    assert_eq!(
        tests_in(src),
        vec![("a".to_string(), true), ("b".to_string(), false)]
    );
}
