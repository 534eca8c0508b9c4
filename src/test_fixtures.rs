//! Objects for the unit tests, built in one place (the shape of kube-rs `controller-rs`'s
//! `Document::test().finalized()`): `NodeTuningProfile::test("web")` and
//! `NodeTuningReport::test("node-a")` start from the least a test needs, and each chained call
//! says the one thing the test cares about. The inherent `impl`s live here, not in `api`, so
//! production code cannot call them.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, Time,
};
use k8s_openapi::jiff::Timestamp;

use crate::api::{
    AppliedProfile, KeyState, Mode, NodeTuningProfile, NodeTuningProfileSpec, NodeTuningReport,
    NodeTuningReportSpec, NodeTuningReportStatus, Scope, SysctlEntry,
};
use crate::plan::NodeLabels;

impl NodeTuningProfile {
    /// A profile named `name` with an empty spec (no selector, no keys) and no metadata beyond
    /// its name.
    pub(crate) fn test(name: &str) -> Self {
        Self::new(name, NodeTuningProfileSpec::default())
    }

    /// Sets these keys to these values.
    pub(crate) fn with_sysctls(mut self, sysctls: &[(&str, &str)]) -> Self {
        self.spec.sysctls = sysctls
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }

    pub(crate) fn with_priority(mut self, priority: i32) -> Self {
        self.spec.priority = priority;
        self
    }

    pub(crate) fn with_mode(mut self, mode: Mode) -> Self {
        self.spec.mode = mode;
        self
    }

    /// `restoreOnRemoval: true` (the serde default; `Default` for the struct says false).
    pub(crate) fn restoring(mut self) -> Self {
        self.spec.restore_on_removal = true;
        self
    }

    /// Selects the nodes with all these `key=value` labels.
    pub(crate) fn selecting(mut self, pairs: &[&str]) -> Self {
        let pairs: Vec<String> = pairs.iter().map(|s| (*s).to_owned()).collect();
        self.spec.node_selector = crate::selector::from_pairs(&pairs).expect("label pairs");
        self
    }

    /// A node selector the API server accepts but no label can satisfy the grammar of
    /// (`Gt` is for node affinity, not label selectors).
    pub(crate) fn with_bad_selector(mut self) -> Self {
        self.spec.node_selector = Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "role".into(),
                operator: "Gt".into(),
                values: Some(vec!["1".into()]),
            }]),
            ..Default::default()
        });
        self
    }

    /// Tolerations the agent pods get for this profile.
    pub(crate) fn tolerating(
        mut self,
        tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    ) -> Self {
        self.spec.tolerations = tolerations;
        self
    }

    pub(crate) fn with_generation(mut self, generation: i64) -> Self {
        self.metadata.generation = Some(generation);
        self
    }

    /// As the API server returns a stored profile: `uid-{name}` at resourceVersion `7`.
    pub(crate) fn stored(mut self) -> Self {
        self.metadata.uid = Some(format!(
            "uid-{}",
            self.metadata.name.as_deref().unwrap_or("")
        ));
        self.metadata.resource_version = Some("7".into());
        self
    }

    pub(crate) fn with_finalizers(mut self, finalizers: &[&str]) -> Self {
        self.metadata.finalizers = Some(finalizers.iter().map(|f| (*f).to_owned()).collect());
        self
    }

    /// Being deleted since `at`.
    pub(crate) fn deleted_at(mut self, at: Timestamp) -> Self {
        self.metadata.deletion_timestamp = Some(Time(at));
        self
    }

    /// As the agent's watch cache holds it (a profile that deserialized).
    pub(crate) fn cached(self) -> std::sync::Arc<kube::core::DeserializeGuard<Self>> {
        std::sync::Arc::new(kube::core::DeserializeGuard(Ok(self)))
    }
}

impl NodeTuningReport {
    /// The report of node `node` (named after it, as the agent names it), without a status.
    pub(crate) fn test(node: &str) -> Self {
        Self::new(
            node,
            NodeTuningReportSpec {
                node_name: node.into(),
            },
        )
    }

    /// Lists these profiles as applied (generation 1, Enforce).
    pub(crate) fn listing(mut self, profiles: &[&str]) -> Self {
        self.status_mut().profiles = profiles
            .iter()
            .map(|p| AppliedProfile {
                name: (*p).to_owned(),
                generation: 1,
                mode: Mode::Enforce,
                overridden_keys: vec![],
                revision: None,
            })
            .collect();
        self
    }

    /// Holds the originals of these keys.
    pub(crate) fn holding(mut self, held: &[&str]) -> Self {
        self.status_mut().held_originals = held.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The status, created empty when there is none yet.
    pub(crate) fn status_mut(&mut self) -> &mut NodeTuningReportStatus {
        self.status
            .get_or_insert_with(NodeTuningReportStatus::default)
    }
}

/// A report's entry for `key` of `profile` in `state` (desired "1", network-namespace scope,
/// nothing read back, no message).
pub(crate) fn entry(key: &str, profile: &str, state: KeyState) -> SysctlEntry {
    SysctlEntry {
        key: key.into(),
        desired: Some("1".into()),
        actual: None,
        original: None,
        profile: Some(profile.into()),
        scope: Scope::NetworkNamespace,
        optional: false,
        state,
        message: None,
    }
}

/// Node name → labels, from literals.
pub(crate) fn nodes(list: &[(&str, &[(&str, &str)])]) -> NodeLabels<'static> {
    crate::plan::owned_node_labels(list.iter().map(|(n, l)| {
        (
            (*n).to_owned(),
            l.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }))
}

/// A node's `/proc/sys` as plain files in a temporary directory, and an empty state directory
/// for the ledger: enough for the engine, which cannot tell plain files from the kernel's.
pub(crate) struct FakeProc {
    pub proc_dir: tempfile::TempDir,
    pub state: tempfile::TempDir,
}

impl FakeProc {
    /// Files for these keys (slash form, below `/proc/sys`) holding these values.
    pub(crate) fn with(files: &[(&str, &str)]) -> Self {
        let proc_dir = tempfile::tempdir().expect("tmp");
        for (path, value) in files {
            let path = proc_dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, format!("{value}\n")).expect("write");
        }
        let state = tempfile::tempdir().expect("tmp");
        Self { proc_dir, state }
    }

    pub(crate) fn fs(&self) -> crate::sysctl::SysctlFs {
        crate::sysctl::SysctlFs::new(self.proc_dir.path())
    }

    /// The ledger in the state directory, as the agent loads it.
    pub(crate) fn ledger(&self) -> crate::sysctl::Ledger {
        crate::sysctl::Ledger::load(self.state.path())
            .expect("ledger")
            .ledger
    }

    /// What the file of `path` holds now.
    pub(crate) fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.proc_dir.path().join(path)).expect("read")
    }
}
