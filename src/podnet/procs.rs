//! One scan of `/proc`: every process's start time, network namespace and pod. The I/O of
//! discovery; what it means is decided in [`super::sandbox`], purely.
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use super::cgroup::{self, PodUid};
use super::error::PodNetError;

/// A network namespace's identity: the (device, inode) of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

/// What discovery needs of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    /// Clock ticks after boot (field 22 of `/proc/<pid>/stat`): with the PID, names the process
    /// for good, since a reused PID comes with a later start time.
    pub start_time: u64,
    pub ns: NsId,
    /// The pod its cgroup names; `None` outside pods and for contradictory cgroup files.
    pub pod: Option<PodUid>,
}

/// Processes found, and whether the scan stopped early at its deadline or process bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub processes: Vec<Process>,
    pub truncated: bool,
}

/// The start time in a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its *last* `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // Field 3 (state) is the first after the name; field 22 is 19 further.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The namespace of `path` (a `/proc/<pid>/ns/net` link, followed).
pub fn ns_of(path: &Path) -> std::io::Result<NsId> {
    let meta = std::fs::metadata(path)?;
    Ok(NsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// The calling thread's own network namespace (the host's, for a hostNetwork agent).
pub fn own_ns(proc_root: &Path) -> std::io::Result<NsId> {
    ns_of(&proc_root.join("thread-self/ns/net"))
}

/// The start time of `pid` now, `None` once it has exited.
pub fn start_time_of(proc_root: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_start_time(&stat)
}

/// Reads every process under `proc_root`, up to `max_processes` and until `deadline`.
/// Processes that exit mid-scan, or hide their files, are left out: they cannot be entered.
pub fn scan(
    proc_root: &Path,
    deadline: Instant,
    max_processes: usize,
) -> Result<Scan, PodNetError> {
    let entries = std::fs::read_dir(proc_root).map_err(|source| PodNetError::ListProc {
        path: proc_root.to_owned(),
        source,
    })?;
    let mut out = Scan::default();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if out.processes.len() >= max_processes || Instant::now() >= deadline {
            out.truncated = true;
            break;
        }
        if let Some(process) = read_process(proc_root, pid) {
            out.processes.push(process);
        }
    }
    Ok(out)
}

fn read_process(proc_root: &Path, pid: i32) -> Option<Process> {
    let dir = proc_root.join(pid.to_string());
    let start_time = parse_start_time(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
    let ns = ns_of(&dir.join("ns/net")).ok()?;
    let cgroup_text = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
    let pod = match cgroup::pod_of(&cgroup_text) {
        Ok(pod) => pod,
        Err(e) => {
            tracing::debug!(pid, error = %e, "process attributed to no pod");
            None
        }
    };
    Some(Process {
        pid,
        start_time,
        ns,
        pod,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_command_names() {
        let fields = "S 1 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 4242 1000 10";
        assert_eq!(parse_start_time(&format!("7 (pause) {fields}")), Some(4242));
        assert_eq!(
            parse_start_time(&format!("7 (a) b) ( c) {fields}")),
            Some(4242)
        );
        assert_eq!(parse_start_time("7 (pause) S 1 1"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn scans_a_fixture_proc_and_skips_vanished_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let stat = "S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 900 0 0";
        for (pid, cgroup) in [
            (
                10,
                "0::/kubepods/pod0d7c3b2a-55e1-4c8e-9f0a-1234567890ab/c\n",
            ),
            (11, "0::/init.scope\n"),
        ] {
            let p = root.join(pid.to_string());
            std::fs::create_dir_all(p.join("ns")).expect("mkdir");
            std::fs::write(p.join("stat"), format!("{pid} (x) {stat}")).expect("write");
            std::fs::write(p.join("cgroup"), cgroup).expect("write");
            std::fs::write(p.join("ns/net"), "").expect("write");
        }
        // A process whose files are gone mid-scan.
        std::fs::create_dir_all(root.join("12")).expect("mkdir");
        std::fs::create_dir_all(root.join("self")).expect("mkdir");
        let far = Instant::now() + std::time::Duration::from_secs(60);
        let mut scan = scan(root, far, 100).expect("scan");
        scan.processes.sort_by_key(|p| p.pid);
        assert!(!scan.truncated);
        let pids: Vec<i32> = scan.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [10, 11]);
        assert_eq!(scan.processes[0].start_time, 900);
        assert!(scan.processes[0].pod.is_some());
        assert!(scan.processes[1].pod.is_none());
        assert_ne!(scan.processes[0].ns, scan.processes[1].ns);

        let bounded = super::scan(root, far, 1).expect("scan");
        assert_eq!((bounded.processes.len(), bounded.truncated), (1, true));
    }
}
