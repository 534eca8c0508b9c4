//! Built-in policy: sysctl keys nodetune refuses to write, whatever a profile says.
//!
//! Denied are keys that
//! * make the kernel **run a program as root** (a path or pipe the kernel executes):
//!   `kernel.core_pattern` (`|/path` pipes core dumps to a helper), `kernel.modprobe`,
//!   `kernel.hotplug`, `kernel.poweroff_cmd`, `kernel.usermodehelper.*` (capabilities those
//!   helpers get), `fs.binfmt_misc.*` (registers interpreters run for matching executables);
//! * **change the node's identity**: `kernel.hostname`, `kernel.domainname`;
//! * are **one-way**: once written they cannot be set back until reboot, so the baseline ledger
//!   could never restore them: `kernel.modules_disabled`, `kernel.kexec_load_disabled`,
//!   `kernel.kexec_load_limit_panic`, `kernel.kexec_load_limit_reboot` (these two only accept
//!   stricter values).
//!
//! Allowed on purpose:
//! * `kernel.core_pipe_limit`: only caps how many crashing processes are piped concurrently; it
//!   chooses no program.
//! * `kernel.sysrq`: selects which magic SysRq functions the *console keyboard* may trigger
//!   (`/proc/sysrq-trigger` works for root regardless). It runs no code and is reversible, and
//!   hardening profiles commonly set it to 0, which a denial would prevent.
//!
//! Not handled here (value-dependent, so a key denylist is the wrong tool): values that are
//! one-way for otherwise reversible keys, e.g. `kernel.yama.ptrace_scope=3` or
//! `kernel.unprivileged_bpf_disabled=1`.
//!
//! Matching is on the canonical key, so both spellings (`kernel.core_pattern`,
//! `kernel/core_pattern`) are caught. A prefix matches whole components only. The CRD's CEL rule
//! is generated from [`DENIED_EXACT`] and [`DENIED_PREFIXES`] (see `api::schema`).

use super::key::SysctlKey;

/// Keys denied exactly (canonical dotted form).
pub const DENIED_EXACT: &[&str] = &[
    "kernel.core_pattern",
    "kernel.modprobe",
    "kernel.hotplug",
    "kernel.poweroff_cmd",
    "kernel.hostname",
    "kernel.domainname",
    "kernel.modules_disabled",
    "kernel.kexec_load_disabled",
    "kernel.kexec_load_limit_panic",
    "kernel.kexec_load_limit_reboot",
];

/// Denied key prefixes (canonical dotted form, ending in `.` so they match whole components).
pub const DENIED_PREFIXES: &[&str] = &["kernel.usermodehelper.", "fs.binfmt_misc."];

/// A key refused by the built-in policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sysctl {key} is denied by nodetune policy: {reason}")]
pub struct PolicyViolation {
    /// The canonical key.
    pub key: String,
    /// Why it is denied.
    pub reason: &'static str,
}

/// Why an entry of [`DENIED_EXACT`] or [`DENIED_PREFIXES`] is denied.
fn reason(entry: &str) -> Option<&'static str> {
    Some(match entry {
        "kernel.core_pattern" => {
            "a pattern starting with '|' makes the kernel run that program as root on every crash"
        }
        "kernel.modprobe" => "the kernel runs this path as root to load modules",
        "kernel.hotplug" => "the kernel runs this path as root for every device event",
        "kernel.poweroff_cmd" => "the kernel runs this command as root on orderly power-off",
        "kernel.usermodehelper." => {
            "sets the capabilities of programs the kernel starts as root (usermode helpers)"
        }
        "fs.binfmt_misc." => {
            "registers interpreters the kernel runs for matching executables (code execution)"
        }
        "kernel.hostname" | "kernel.domainname" => {
            "changes the node's identity, which Kubernetes and the node's services rely on"
        }
        "kernel.modules_disabled" | "kernel.kexec_load_disabled" => {
            "one-way until reboot: it cannot be set back, so nodetune could not restore it"
        }
        "kernel.kexec_load_limit_panic" | "kernel.kexec_load_limit_reboot" => {
            "only ever accepts stricter values until reboot, so nodetune could not restore it"
        }
        _ => return None,
    })
}

/// Checks `key` against the built-in denylist.
pub fn check(key: &SysctlKey) -> Result<(), PolicyViolation> {
    let dotted = key.dotted();
    let hit = DENIED_EXACT
        .iter()
        .find(|e| **e == dotted)
        .or_else(|| DENIED_PREFIXES.iter().find(|p| dotted.starts_with(**p)));
    match hit {
        None => Ok(()),
        Some(entry) => Err(PolicyViolation {
            key: dotted,
            reason: reason(entry).unwrap_or("on the built-in denylist"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(raw: &str) -> bool {
        check(&SysctlKey::parse(raw).unwrap()).is_err()
    }

    #[test]
    fn denylist() {
        for raw in [
            "kernel.core_pattern",
            "kernel/core_pattern",
            "kernel.modprobe",
            "kernel.hotplug",
            "kernel.poweroff_cmd",
            "kernel.usermodehelper.bset",
            "kernel/usermodehelper/inheritable",
            "kernel.hostname",
            "kernel.domainname",
            "kernel.modules_disabled",
            "kernel.kexec_load_disabled",
            "fs.binfmt_misc.register",
            "fs/binfmt_misc/status",
        ] {
            assert!(denied(raw), "{raw} should be denied");
        }
        for raw in [
            "kernel.core_pipe_limit",
            "kernel.core_uses_pid",
            "kernel.sysrq",
            "kernel.hostname_x",
            "kernel.usermodehelper_x",
            "kernel.usermodehelper/bset", // a different (non-existent) file: usermodehelper.bset
            "net.ipv4.tcp_fin_timeout",
            "vm.swappiness",
        ] {
            assert!(!denied(raw), "{raw} should be allowed");
        }
    }

    #[test]
    fn message_says_why() {
        let err = check(&SysctlKey::parse("kernel/core_pattern").unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("kernel.core_pattern"), "{msg}");
        assert!(msg.contains("as root"), "{msg}");
    }

    #[test]
    fn every_entry_has_a_reason_and_is_a_valid_key() {
        for e in DENIED_EXACT {
            assert!(reason(e).is_some(), "{e}");
            assert_eq!(SysctlKey::parse(e).unwrap().dotted(), *e);
        }
        for p in DENIED_PREFIXES {
            assert!(reason(p).is_some(), "{p}");
            assert!(p.ends_with('.'));
            assert!(SysctlKey::parse(&format!("{p}x")).is_ok());
        }
    }

    /// The CRD folds a raw key onto dots (`k.replace('/', '.')`) before comparing it with these
    /// lists. That is exact only because no entry contains a literal dot inside a component,
    /// i.e. the dotted form of every entry has no `/`.
    #[test]
    fn entries_have_no_literal_dots_so_folding_is_exact() {
        for e in DENIED_EXACT.iter().chain(DENIED_PREFIXES) {
            assert!(!e.contains('/'), "{e}");
            let slashed = e.replace('.', "/");
            if DENIED_EXACT.contains(e) {
                assert!(
                    check(&SysctlKey::parse(&slashed).unwrap()).is_err(),
                    "{slashed}"
                );
            } else {
                let k = SysctlKey::parse(&format!("{slashed}x")).unwrap();
                assert!(check(&k).is_err(), "{slashed}x");
            }
        }
    }
}
