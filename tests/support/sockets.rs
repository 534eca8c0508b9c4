//! Known TCP sockets in a node's namespace, and `ss`'s count of them, to compare with what
//! an agent reports.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};

use super::cluster::SimNode;

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
        let script = format!(
            r#"
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(128)
port = srv.getsockname()[1]
held = []
for _ in range({established}):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept(); held += [c, s]
for _ in range({time_wait}):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept()
    c.close(); time.sleep(0.05); s.close()
print("ready", flush=True)
time.sleep(300)
"#
        );
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
        let name = match state {
            "ESTAB" => "ESTABLISHED",
            "SYN-SENT" => "SYN_SENT",
            "SYN-RECV" => "SYN_RECV",
            "FIN-WAIT-1" => "FIN_WAIT1",
            "FIN-WAIT-2" => "FIN_WAIT2",
            "TIME-WAIT" => "TIME_WAIT",
            "UNCONN" | "CLOSE" => "CLOSE",
            "CLOSE-WAIT" => "CLOSE_WAIT",
            "LAST-ACK" => "LAST_ACK",
            "LISTEN" => "LISTEN",
            "CLOSING" => "CLOSING",
            other => bail!("unknown ss state {other}"),
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
