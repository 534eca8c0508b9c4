//! Known TCP sockets in a node's namespace, and `ss`'s count of them, to compare with what
//! an agent reports.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};

use super::cluster::SimNode;
use super::socket_script::{SocketMix, netstat_name, python};

/// ESTABLISHED, LISTEN and TIME_WAIT sockets held in a node's namespace by a Python process
/// (killed on drop).
pub struct SocketLoad(tokio::process::Child);

impl SocketLoad {
    /// One listener, `established` connected pairs kept open, `time_wait` connections closed
    /// client-first (the client side then sits in TIME_WAIT).
    pub async fn start(
        node: &SimNode,
        established: usize,
        time_wait: usize,
    ) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let script = python(&SocketMix {
            established,
            time_wait,
            close_wait: 0,
            backlog: 128,
            close_gap_secs: 0.05,
            hold_secs: 300,
        });
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &node.netns, "python3", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await??;
        if first.as_deref() != Some("ready") {
            bail!("socket generator said {first:?}");
        }
        Ok(Self(child))
    }
}

impl Drop for SocketLoad {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// `ss -tanH` in the node's namespace, per state, in netstat's names.
pub async fn ss_counts(node: &SimNode) -> anyhow::Result<BTreeMap<String, i64>> {
    let out = node.exec_ok(&["ss", "-tanH"]).await?;
    let mut counts = BTreeMap::new();
    for line in out.lines() {
        let Some(state) = line.split_whitespace().next() else {
            continue;
        };
        let Some(name) = netstat_name(state) else {
            bail!("unknown ss state {state}");
        };
        *counts.entry(name.to_string()).or_default() += 1;
    }
    Ok(counts)
}

/// The entries that are not zero (reports may list zero counts, `ss` never does).
pub fn nonzero(m: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    m.iter()
        .filter(|(_, v)| **v != 0)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}
