//! What the agent learns from the node itself: whether it rebooted since the ledger was written
//! (see [`crate::sysctl::boot`]), and where the host's boot-time sysctl configuration sets a
//! profile key to another value (see [`crate::sysctl::hostconf`]). Kept apart from the pass so
//! the pass only calls [`HostWatch::before_pass`] and [`HostWatch::annotate`].
use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::NodeTuningReportStatus;
use crate::conditions::{Builder, Reason, Type};
use crate::plan::Merged;
use crate::sysctl::boot;
use crate::sysctl::hostconf::HostConfig;
use crate::sysctl::{Ledger, SysctlFs, key};

pub struct HostWatch {
    boot_id_file: PathBuf,
    host_root: PathBuf,
    /// The boot the node is in, once read.
    boot_id: Option<String>,
    /// When this agent found the node rebooted since its ledger was written.
    rebooted_at: Option<Time>,
    /// The boot id or host root problem was logged already (said once, not every pass).
    said_boot: bool,
    said_root: bool,
}

impl HostWatch {
    /// `boot_id_file` is where the kernel tells the boot id (under the sysctl root, so tests
    /// can fake it); `host_root` the host mount.
    pub fn new(boot_id_file: PathBuf, host_root: PathBuf) -> Self {
        Self {
            boot_id_file,
            host_root,
            boot_id: None,
            rebooted_at: None,
            said_boot: false,
            said_root: false,
        }
    }

    /// Before anything is written: brings the ledger to this boot. `Ok(true)` when the node
    /// rebooted since the ledger was written (the pass must count no drift then). An error
    /// means the new boot's originals could not be recorded: nothing may be written.
    pub fn before_pass(&mut self, fs: &SysctlFs, ledger: &mut Ledger) -> Result<bool, String> {
        let current = match boot::read_boot_id(&self.boot_id_file) {
            Ok(id) => id,
            Err(e) => {
                // Without a boot id reboots cannot be told apart; tuning goes on as before.
                if !self.said_boot {
                    tracing::warn!(error = %e, "boot id unknown: reboots are not detected");
                    self.said_boot = true;
                }
                return Ok(false);
            }
        };
        self.boot_id = Some(current.clone());
        match boot::reconcile(fs, ledger, &current) {
            Ok(None) => Ok(false),
            Ok(Some(r)) => {
                tracing::info!(
                    previous_boot = %r.previous_boot, boot = %r.boot, changed = r.changed.len(),
                    "the node rebooted: the originals are this boot's values"
                );
                self.rebooted_at = Some(Time(k8s_openapi::jiff::Timestamp::now()));
                Ok(true)
            }
            Err(e) => Err(format!(
                "the node rebooted but {e}; nothing is written until they are recorded"
            )),
        }
    }

    /// Adds the boot and the host configuration's differences to `status`.
    pub fn annotate(
        &mut self,
        status: &mut NodeTuningReportStatus,
        fs: &SysctlFs,
        merged: &Merged,
    ) {
        status.boot_id = self.boot_id.clone();
        status.rebooted_at = self.rebooted_at.clone();
        let config = match HostConfig::read(&self.host_root) {
            Ok(Some(c)) => c,
            Ok(None) => {
                if !self.said_root {
                    tracing::info!(host_root = %self.host_root.display(), "no host root: the host's boot-time sysctl configuration is not compared");
                    self.said_root = true;
                }
                return;
            }
            Err(e) => {
                status.warnings.push(format!(
                    "host config: cannot open {}: {e}",
                    self.host_root.display()
                ));
                return;
            }
        };
        let desired: Vec<(key::SysctlKey, &str)> = merged
            .desired
            .iter()
            .filter_map(|(k, d)| Some((key::parse_spec(k).ok()?.0, d.value.as_str())))
            .collect();
        status.host_config = config.differences(desired.iter().map(|(k, v)| (k, *v)), |k| {
            fs.path_of(k).exists()
        });
        explain_contested(&config, status, fs);
        status.warnings.extend(config.warnings);
        status.conditions.push(condition(status));
    }
}

/// Names the boot-config line that sets a contested key's foreign value: whatever re-runs the
/// host's sysctl configuration (`sysctl --system`, a package hook, systemd-sysctl restarted) is
/// then the likely other writer.
fn explain_contested(config: &HostConfig, status: &mut NodeTuningReportStatus, fs: &SysctlFs) {
    for c in &mut status.contested {
        let Ok(key) = key::SysctlKey::parse(&c.key) else {
            continue;
        };
        let Some(a) = config.setting_for(&key, fs.path_of(&key).exists()) else {
            continue;
        };
        if a.line
            .value
            .as_deref()
            .is_some_and(|v| crate::sysctl::value::same(v, &c.foreign_value))
        {
            c.source = Some(format!(
                "the host's boot configuration sets it: {}:{}",
                a.file, a.line.line
            ));
        }
    }
}

/// `HostConfigDiffers`: informational, never an error.
fn condition(
    status: &NodeTuningReportStatus,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let b = Builder::new(&[], None, k8s_openapi::jiff::Timestamp::now());
    if status.host_config.is_empty() {
        return b.make(
            Type::HostConfigDiffers,
            false,
            Reason::MatchesHostConfig,
            String::new(),
        );
    }
    let list: Vec<String> = status
        .host_config
        .iter()
        .map(|d| format!("{} = {} at {}:{}", d.key, d.boot_value, d.file, d.line))
        .collect();
    b.make(
        Type::HostConfigDiffers,
        true,
        Reason::BootValuesDiffer,
        format!(
            "the host's boot-time sysctl configuration sets other values (the node has them from boot until the agent's first pass): {}",
            list.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use kube::core::DeserializeGuard;

    use super::super::{AgentArgs, NodeSide, metrics::AgentMetrics};
    use crate::api::NodeTuningProfile;
    use crate::conditions;

    const A: &str = "0f6d4e3a-6b1e-4c2a-9d57-2f1c7d2b9a10";
    const B: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    struct Fake {
        proc_sys: tempfile::TempDir,
        host: tempfile::TempDir,
        _state: tempfile::TempDir,
        node: NodeSide,
    }

    impl Fake {
        fn new() -> Self {
            let proc_sys = tempfile::tempdir().expect("tmp");
            let host = tempfile::tempdir().expect("tmp");
            let state = tempfile::tempdir().expect("tmp");
            let fake = |rel: &str, v: &str| {
                let p = proc_sys.path().join(rel);
                std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                std::fs::write(p, format!("{v}\n")).expect("write");
            };
            fake("net/ipv4/tcp_fin_timeout", "60");
            fake("kernel/random/boot_id", A);
            let mut args = AgentArgs::for_tests("node-a", state.path(), proc_sys.path());
            args.host_root = host.path().into();
            let node = NodeSide::open(&args, Arc::new(AgentMetrics::default())).expect("open");
            Self {
                proc_sys,
                host,
                _state: state,
                node,
            }
        }

        fn set(&self, rel: &str, v: &str) {
            std::fs::write(self.proc_sys.path().join(rel), format!("{v}\n")).expect("write");
        }

        fn fin(&self) -> String {
            std::fs::read_to_string(self.proc_sys.path().join("net/ipv4/tcp_fin_timeout"))
                .expect("read")
                .trim()
                .to_owned()
        }
    }

    fn web() -> Arc<DeserializeGuard<NodeTuningProfile>> {
        NodeTuningProfile::test("web")
            .with_sysctls(&[("net.ipv4.tcp_fin_timeout", "30")])
            .restoring()
            .cached()
    }

    /// A reboot between two passes: no drift counted, rebootedAt reported, and a restore puts
    /// back the admin's new boot value, not the stale original of the first boot.
    #[test]
    fn after_a_reboot_the_originals_are_this_boots_and_no_drift_is_counted() {
        let mut f = Fake::new();
        let labels = BTreeMap::new();
        let status = f.node.pass(&labels, &[web()]);
        assert_eq!(f.fin(), "30");
        assert_eq!(status.boot_id.as_deref(), Some(A));
        assert!(status.rebooted_at.is_none());

        f.set("kernel/random/boot_id", B);
        f.set("net/ipv4/tcp_fin_timeout", "45"); // the admin's boot config now says 45
        let status = f.node.pass(&labels, &[web()]);
        assert_eq!(f.fin(), "30");
        assert_eq!(
            status.drift_corrections, 0,
            "the first application is no drift"
        );
        assert_eq!(status.boot_id.as_deref(), Some(B));
        assert!(status.rebooted_at.is_some());

        f.node.pass(&labels, &[]);
        assert_eq!(
            f.fin(),
            "45",
            "the admin's boot value comes back, not the stale 60"
        );
    }

    #[test]
    fn a_host_file_setting_a_profile_key_differently_is_reported_with_file_and_line() {
        let mut f = Fake::new();
        let conf = f.host.path().join("etc/sysctl.d");
        std::fs::create_dir_all(&conf).expect("mkdir");
        std::fs::write(
            conf.join("10-net.conf"),
            "# net\nnet.ipv4.tcp_fin_timeout = 15\n",
        )
        .expect("write");
        let status = f.node.pass(&BTreeMap::new(), &[web()]);
        let d = status.host_config.first().expect("a difference");
        assert_eq!(
            (
                d.key.as_str(),
                d.boot_value.as_str(),
                d.file.as_str(),
                d.line
            ),
            (
                "net.ipv4.tcp_fin_timeout",
                "15",
                "/etc/sysctl.d/10-net.conf",
                2
            )
        );
        let c = conditions::find(&status.conditions, conditions::Type::HostConfigDiffers)
            .expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "BootValuesDiffer")
        );
        assert!(c.message.contains("10-net.conf:2"), "{}", c.message);
        assert!(conditions::is_true(
            &status.conditions,
            conditions::Type::Ready
        ));

        std::fs::write(conf.join("10-net.conf"), "net.ipv4.tcp_fin_timeout = 30\n").expect("w");
        let status = f.node.pass(&BTreeMap::new(), &[web()]);
        assert!(status.host_config.is_empty());
        assert!(!conditions::is_true(
            &status.conditions,
            conditions::Type::HostConfigDiffers
        ));
    }
}
