//! The CRD manifests under crds/ are generated; this fails when they drift from the types.
use std::path::Path;

use nodetune::api::crd;

#[test]
fn crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    for c in crd::all() {
        let name = crd::file_name(&c);
        let want = crd::to_yaml(&c).expect("CRD serialises");
        let have = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            have == want,
            "crds/{name} is out of date with src/api: regenerate with `cargo run -- crd --dir crds`"
        );
    }
    let extra: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|f| !crd::all().iter().any(|c| &crd::file_name(c) == f))
        .collect();
    assert!(
        extra.is_empty(),
        "crds/ holds files no type generates: {extra:?}"
    );
}

#[test]
fn crds_have_the_printer_columns_and_rules() {
    let profile = crd::to_yaml(&crd::all()[0]).expect("yaml");
    for col in [
        "Mode",
        "Matched",
        "Applied",
        "Failed",
        "Time_Wait",
        "Established",
        "Ready",
        "Age",
    ] {
        assert!(
            profile.contains(&format!("name: {col}")),
            "missing printer column {col}"
        );
    }
    assert!(profile.contains("x-kubernetes-validations"));
    assert!(profile.contains("kernel.core_pattern"));
    assert!(profile.contains("x-kubernetes-list-map-keys"));
    assert!(profile.contains("scope: Cluster"));
    let report = crd::to_yaml(&crd::all()[1]).expect("yaml");
    for col in [
        "Profiles",
        "Applied",
        "Failed",
        "Established",
        "Time_Wait",
        "Age",
    ] {
        assert!(
            report.contains(&format!("name: {col}")),
            "missing printer column {col}"
        );
    }
}
