//! Issue 19, boot-time configuration, on the simulated-node cluster: a node whose root holds a
//! sysctl.d file setting a profile key to another value gets it in its NodeTuningReport (file,
//! line, boot value) with `HostConfigDiffers` True, through the DaemonSet's read-only host
//! mount (the node shim maps the hostPath `/` to the node's root directory, a fake host root).
//!
//! Needs root and the control plane of tests/cluster/build; `#[ignore]`d like every cluster
//! test: `cargo test --test e2e_hostconf -- --ignored --nocapture`.
mod support;

use anyhow::Result;
use kube::Api;
use nodetune::api::{NodeTuningProfile, NodeTuningReport};
use nodetune::sysctl::hostconf::HostConfigDiff;
use support::e2e::{POLL, WAIT};
use support::fixtures::ROLE;
use support::{Cluster, wait_for};

const WEB: &str = "
apiVersion: nodetune.dev/v1alpha1
kind: NodeTuningProfile
metadata:
  name: web-fin
spec:
  nodeSelector:
    node.example.com/role: web
  sysctls:
    net.ipv4.tcp_fin_timeout: \"30\"
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn host_sysctl_d_difference_is_reported_with_file_and_line() -> Result<()> {
    let Some(bin) =
        support::cluster_prereqs("host_sysctl_d_difference_is_reported_with_file_and_line")
    else {
        return Ok(());
    };
    let cluster = Cluster::start(&bin).await?;
    let node = cluster.add_node("node-a", &[(ROLE, "web")]).await?;
    let conf = node.root.join("etc/sysctl.d");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(
        conf.join("10-net.conf"),
        "# the admin's boot value\nnet.ipv4.tcp_fin_timeout = 15\n",
    )?;
    cluster.start_shim(env!("CARGO_BIN_EXE_nodetune"))?;
    let mut deploy = support::deploy::apply_all_but_controller(&cluster).await?;
    support::deploy::short_intervals(&mut deploy)?;
    support::deploy::create_controller(&cluster, &deploy).await?;

    let p: NodeTuningProfile = serde_yaml::from_str(WEB)?;
    support::e2e::apply_profile(&cluster, &p).await?;
    let reports: Api<NodeTuningReport> = Api::all(cluster.client());
    let status = wait_for(
        "node-a reports the boot-time difference",
        WAIT,
        POLL,
        || async {
            let r = reports.get_opt("node-a").await?;
            Ok(r.and_then(|r| r.status)
                .filter(|s| !s.host_config.is_empty()))
        },
    )
    .await?;
    assert_eq!(
        status.host_config[0],
        HostConfigDiff {
            key: "net.ipv4.tcp_fin_timeout".into(),
            desired: "30".into(),
            boot_value: "15".into(),
            file: "/etc/sysctl.d/10-net.conf".into(),
            line: 2,
            glob: None,
        }
    );
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "HostConfigDiffers")
        .expect("HostConfigDiffers");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "BootValuesDiffer")
    );
    assert!(
        status.boot_id.as_deref().is_some_and(|b| b.len() == 36),
        "{:?}",
        status.boot_id
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "a difference is no failure: {:?}",
        status.conditions
    );
    Ok(())
}
