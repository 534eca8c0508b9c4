//! Which pod a process belongs to, from the text of its `/proc/<pid>/cgroup`. Pure.
//!
//! The kubelet puts every container of a pod under one cgroup named after the pod's UID:
//!
//! - cgroupfs driver: `[<cgroup-root>]/kubepods[/besteffort|/burstable]/pod<uid>/<container>`;
//! - systemd driver: `kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid with _
//!   for ->.slice/cri-containerd-<container>.scope`;
//!
//! on cgroup v1 (one line per hierarchy, `N:controllers:/path`) and v2 (`0::/path`). The file is
//! written by the kernel, but the path inside it is whatever cgroup the process sits in, and a
//! privileged pod can make sub-cgroups of its own: the *outermost* pod cgroup is the one the
//! kubelet made, so that is the one that counts, and v1 hierarchies that disagree about the pod
//! are refused rather than guessed between.
use std::fmt;

/// A pod UID as the kubelet names it: a UUID (`8-4-4-4-12` hex digits) or, for static pods, 32
/// hex digits. Lower case, dashes restored from the systemd form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodUid(String);

impl PodUid {
    /// Validates `text` (cgroupfs form: dashes; or 32 hex digits).
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let dashed = bytes.len() == 36
            && bytes.iter().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        let bare = bytes.len() == 32 && bytes.iter().all(u8::is_ascii_hexdigit);
        (dashed || bare).then(|| PodUid(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a cgroup file names no single pod although it mentions one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    /// Two v1 hierarchies put the process in different pods: only a process that moved itself
    /// can look like that, so it is attributed to neither.
    #[error("cgroup hierarchies disagree about the pod: {0} and {1}")]
    Ambiguous(PodUid, PodUid),
}

/// The pod of the process whose `/proc/<pid>/cgroup` is `text`, `Ok(None)` for a process outside
/// any pod (host daemons, the kubelet, a plain `unshare -n`).
pub fn pod_of(text: &str) -> Result<Option<PodUid>, CgroupError> {
    let mut found: Option<PodUid> = None;
    for line in text.lines() {
        // `hierarchy-id:controllers:path`; the path may itself contain ':'.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let Some(uid) = pod_of_path(path) else {
            continue;
        };
        match &found {
            Some(seen) if *seen != uid => return Err(CgroupError::Ambiguous(seen.clone(), uid)),
            Some(_) => {}
            None => found = Some(uid),
        }
    }
    Ok(found)
}

/// The outermost pod cgroup on one path, if any.
pub fn pod_of_path(path: &str) -> Option<PodUid> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    parts.iter().enumerate().find_map(|(i, part)| {
        cgroupfs_pod(&parts[..i], part).or_else(|| systemd_pod(&parts[..i], part))
    })
}

/// Whether `parents` is only `..` components: the reader sits in a cgroup namespace (as a
/// containerized agent on cgroup v2 does) and the kernel shows other cgroups relative to its
/// root, hiding the `kubepods` ancestors. A process cannot put itself there unprivileged.
fn hidden(parents: &[&str]) -> bool {
    !parents.is_empty() && parents.iter().all(|p| *p == "..")
}

/// `pod<uid>` directly under `kubepods` or `kubepods/<qos>` (the ancestors possibly hidden).
fn cgroupfs_pod(parents: &[&str], part: &str) -> Option<PodUid> {
    let uid = part.strip_prefix("pod")?;
    let under_kubepods = match parents {
        [.., "kubepods"] => true,
        [.., "kubepods", qos] => is_qos(qos),
        [above @ .., qos] if is_qos(qos) => hidden(above),
        _ => hidden(parents),
    };
    if !under_kubepods {
        return None;
    }
    PodUid::parse(uid)
}

/// `kubepods[-<qos>]-pod<uid_>.slice` under `kubepods.slice[/kubepods-<qos>.slice]`.
fn systemd_pod(parents: &[&str], part: &str) -> Option<PodUid> {
    let stem = part.strip_prefix("kubepods-")?.strip_suffix(".slice")?;
    let (qos, uid) = match stem.split_once("-pod") {
        Some((qos, uid)) => (Some(qos), uid),
        None => (None, stem.strip_prefix("pod")?),
    };
    let parents_ok = match (qos, parents) {
        (None, [.., "kubepods.slice"]) => true,
        (Some(q), [.., "kubepods.slice", qos_slice]) => {
            is_qos(q) && *qos_slice == format!("kubepods-{q}.slice")
        }
        (Some(q), [above @ .., qos_slice])
            if hidden(above) && *qos_slice == format!("kubepods-{q}.slice") =>
        {
            is_qos(q)
        }
        (None, above) => hidden(above),
        (Some(q), above) => is_qos(q) && hidden(above),
    };
    // systemd cannot have '-' inside a unit name's component, so the UID's dashes are '_'.
    if !parents_ok || uid.contains('-') {
        return None;
    }
    PodUid::parse(&uid.replace('_', "-"))
}

fn is_qos(name: &str) -> bool {
    matches!(name, "besteffort" | "burstable")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d7c3b2a-55e1-4c8e-9f0a-1234567890ab";
    const SYSTEMD_UID: &str = "0d7c3b2a_55e1_4c8e_9f0a_1234567890ab";
    const CID: &str = "4f1c0e9d2b7a6c5e8f3d1a0b9c8e7d6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d";

    fn uid() -> Option<PodUid> {
        PodUid::parse(UID)
    }

    #[test]
    fn cgroupfs_v2_every_qos_class_and_a_cgroup_root() {
        for path in [
            format!("/kubepods/besteffort/pod{UID}/{CID}"),
            format!("/kubepods/burstable/pod{UID}/{CID}"),
            format!("/kubepods/pod{UID}/{CID}"),
            format!("/ntc3-node-a/kubepods/besteffort/pod{UID}/{CID}"),
            format!("/kubepods/pod{UID}"),
        ] {
            assert_eq!(pod_of(&format!("0::{path}\n")), Ok(uid()), "{path}");
        }
    }

    #[test]
    fn cgroupfs_v1_hybrid_lines_agree() {
        let text = format!(
            "12:memory:/kubepods/besteffort/pod{UID}/{CID}\n\
             11:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{CID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{CID}\n\
             0::/\n"
        );
        assert_eq!(pod_of(&text), Ok(uid()));
    }

    #[test]
    fn systemd_v2_and_v1() {
        let v2 = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(pod_of(&v2), Ok(uid()));
        let guaranteed = format!(
            "0::/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(pod_of(&guaranteed), Ok(uid()));
        let v1 = format!(
            "4:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/docker-{CID}.scope\n\
             1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/docker-{CID}.scope\n"
        );
        assert_eq!(pod_of(&v1), Ok(uid()));
    }

    #[test]
    fn paths_relative_to_the_readers_cgroup_namespace() {
        // An agent in its own cgroup namespace sees other pods' cgroups as `/../..`-relative.
        for path in [
            format!("/../../../besteffort/pod{UID}/{CID}"),
            format!("/../../pod{UID}/{CID}"),
            format!("/../../kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope"),
            format!(
                "/../../../kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/x.scope"
            ),
            format!("/../kubepods-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope"),
        ] {
            assert_eq!(pod_of(&format!("0::{path}\n")), Ok(uid()), "{path}");
        }
        // Hidden ancestors do not make any directory a pod's.
        for path in [
            format!("/../guaranteed/pod{UID}"),
            format!("/../x/pod{UID}"),
            format!("/../kubepods-x-pod{SYSTEMD_UID}.slice"),
        ] {
            assert_eq!(pod_of(&format!("0::{path}\n")), Ok(None), "{path}");
        }
    }

    #[test]
    fn static_pod_uids_have_no_dashes() {
        let hash = "8f2a1c3b4d5e6f708192a3b4c5d6e7f8";
        assert_eq!(
            pod_of(&format!("0::/kubepods/burstable/pod{hash}/{CID}\n")),
            Ok(PodUid::parse(hash))
        );
    }

    #[test]
    fn host_processes_are_in_no_pod() {
        for text in [
            "0::/init.scope\n",
            "0::/system.slice/kubelet.service\n",
            "0::/kubepods/besteffort\n",
            "0::/kubepods.slice/kubepods-besteffort.slice\n",
            "12:memory:/user.slice\n1:name=systemd:/user.slice/user-0.slice/session-1.scope\n",
            "",
        ] {
            assert_eq!(pod_of(text), Ok(None), "{text:?}");
        }
    }

    #[test]
    fn hostile_paths_name_no_pod() {
        for path in [
            // Not under kubepods: a look-alike made anywhere else.
            format!("/system.slice/pod{UID}"),
            format!("/kubepods/guaranteed/pod{UID}"),
            format!("/kubepods-evil/pod{UID}"),
            // Malformed UIDs: traversal, too short, too long, not hex, misplaced dashes.
            "/kubepods/besteffort/pod../../etc".to_string(),
            "/kubepods/besteffort/pod1234".to_string(),
            format!("/kubepods/besteffort/pod{UID}0"),
            "/kubepods/besteffort/podzzzzzzzz-55e1-4c8e-9f0a-1234567890ab".to_string(),
            "/kubepods/besteffort/pod0d7c3b2a555e1-4c8e-9f0a-1234567890a".to_string(),
            // systemd forms with the wrong parent, a dash, or a QoS class that does not match.
            format!("/kubepods-besteffort-pod{SYSTEMD_UID}.slice"),
            format!("/kubepods.slice/kubepods-besteffort-pod{UID}.slice"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice"
            ),
            format!("/kubepods.slice/kubepods-x.slice/kubepods-x-pod{SYSTEMD_UID}.slice"),
        ] {
            assert_eq!(pod_of(&format!("0::{path}\n")), Ok(None), "{path}");
        }
    }

    #[test]
    fn the_outermost_pod_wins_over_one_made_inside_a_pod() {
        // A privileged pod running its own kubelet (kind in a pod) nests another kubepods tree.
        let inner = "11111111-2222-3333-4444-555555555555";
        let text = format!("0::/kubepods/besteffort/pod{UID}/{CID}/kubepods/pod{inner}/x\n");
        assert_eq!(pod_of(&text), Ok(uid()));
    }

    #[test]
    fn disagreeing_hierarchies_are_refused() {
        let other = "11111111-2222-3333-4444-555555555555";
        let text = format!(
            "12:memory:/kubepods/besteffort/pod{UID}/{CID}\n1:name=systemd:/kubepods/pod{other}/x\n"
        );
        assert!(matches!(pod_of(&text), Err(CgroupError::Ambiguous(..))));
    }

    #[test]
    fn uid_is_lower_cased_and_shown_plainly() {
        let upper = UID.to_ascii_uppercase();
        assert_eq!(PodUid::parse(&upper), uid());
        assert_eq!(uid().map(|u| u.to_string()).as_deref(), Some(UID));
    }
}
