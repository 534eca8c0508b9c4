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
//!   stricter values), `kernel.tainted` (a write only ever adds taint flags).
//!
//! Allowed on purpose:
//! * `kernel.core_pipe_limit`: only caps how many crashing processes are piped concurrently; it
//!   chooses no program.
//! * `kernel.sysrq`: selects which magic SysRq functions the *console keyboard* may trigger
//!   (`/proc/sysrq-trigger` works for root regardless). It runs no code and is reversible, and
//!   hardening profiles commonly set it to 0, which a denial would prevent.
//!
//! Value-dependent rules (a key denylist is the wrong tool for these):
//! * **one-way values** of otherwise reversible keys are refused ([`ONE_WAY`]):
//!   `kernel.unprivileged_bpf_disabled=1` and `kernel.yama.ptrace_scope=3` cannot be set back
//!   until reboot;
//! * **weakening values** ([`WEAKENING`], e.g. `kernel.randomize_va_space=0`) are refused unless
//!   the cluster policy names the key in `allowWeakening`. This holds for restores too: a
//!   restore writes a value read from the ledger, and the ledger is input like any other.
//! * Both judge the number **the kernel will store**: its integer handlers read `0100000` as
//!   octal and `0x3` as hex ([`super::value::kernel_integer`]). Values of keys under these rules
//!   must moreover be plain decimal, so a reviewer reads what the kernel stores; admission
//!   (CRD and admission policy, generated from these lists) refuses the same values.
//!
//! On top of the built-in rules, a [`SysctlPolicy`] (the cluster sysctl policy, from a file the
//! platform team controls) restricts scopes and key patterns; see [`Policy::check`].
//!
//! Matching is on the canonical key, so both spellings (`kernel.core_pattern`,
//! `kernel/core_pattern`) are caught; an optional key's `-` marker is stripped first. A prefix matches whole components only. The CRD's CEL rule
//! is generated from [`DENIED_EXACT`] and [`DENIED_PREFIXES`] (see `api::schema`).

use std::collections::BTreeSet;
use std::path::Path;

use regex::{Regex, RegexBuilder};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::key::SysctlKey;
use super::value;
use super::vocab::{KeyState, Scope};

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
    "kernel.tainted",
];

/// Denied key prefixes (canonical dotted form, ending in `.` so they match whole components).
pub const DENIED_PREFIXES: &[&str] = &["kernel.usermodehelper.", "fs.binfmt_misc."];

/// A key refused by the built-in denylist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sysctl {key} is denied by nodetune policy: {reason}")]
pub struct PolicyViolation {
    /// The canonical key.
    pub key: String,
    /// Why it is denied.
    pub reason: &'static str,
}

/// A key and value that must not be written, with the state to report and a message naming
/// the key and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// [`KeyState::Denied`] for policy rules, [`KeyState::Invalid`] for a malformed value.
    pub state: KeyState,
    /// Names the key and the rule.
    pub message: String,
}

impl Refusal {
    fn denied(message: String) -> Self {
        Self {
            state: KeyState::Denied,
            message,
        }
    }
}

/// Which integers a rule is about. Data rather than a closure, so the same rule is written out
/// as CEL for admission ([`Values::cel`]) and cannot drift from what the agent checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Every integer below this one.
    Below(i64),
    /// Every integer above this one.
    Above(i64),
    /// Exactly this one.
    Is(i64),
    /// Every integer but this one.
    Not(i64),
}

impl Values {
    /// Whether `n` is one of these values.
    pub fn contains(self, n: i128) -> bool {
        match self {
            Self::Below(x) => n < i128::from(x),
            Self::Above(x) => n > i128::from(x),
            Self::Is(x) => n == i128::from(x),
            Self::Not(x) => n != i128::from(x),
        }
    }

    /// The comparison operator (as CEL writes it) and its operand: `n < 2` is `("<", 2)`.
    pub fn comparison(self) -> (&'static str, i64) {
        match self {
            Self::Below(x) => ("<", x),
            Self::Above(x) => (">", x),
            Self::Is(x) => ("==", x),
            Self::Not(x) => ("!=", x),
        }
    }

    /// The same test as a CEL expression on the integer expression `n`.
    pub fn cel(self, n: &str) -> String {
        let (op, x) = self.comparison();
        format!("{n} {op} {x}")
    }
}

/// A value of an otherwise reversible key that cannot be set back until reboot.
#[derive(Debug, Clone, Copy)]
pub struct OneWay {
    /// Canonical key.
    pub key: &'static str,
    /// The refused value(s), as documentation.
    pub values: &'static str,
    /// Which integers are one-way.
    pub one_way: Values,
    /// Why.
    pub why: &'static str,
}

/// Values refused whatever the cluster policy says (also refused at admission: the CRD's rules
/// are generated from this list).
pub const ONE_WAY: &[OneWay] = &[
    OneWay {
        key: "kernel.unprivileged_bpf_disabled",
        values: "1",
        one_way: Values::Is(1),
        why: "1 cannot be changed back until reboot (2 disables unprivileged BPF reversibly)",
    },
    OneWay {
        key: "kernel.yama.ptrace_scope",
        values: "3",
        one_way: Values::Is(3),
        why: "3 (no attach) cannot be changed back until reboot",
    },
];

/// A key whose value can weaken the node's security; such values need `allowWeakening` in the
/// cluster policy.
#[derive(Debug, Clone, Copy)]
pub struct Weakening {
    /// Canonical key.
    pub key: &'static str,
    /// Which values weaken, as documentation.
    pub weak_values: &'static str,
    /// Which integers weaken.
    pub weakens: Values,
    /// What it opens up.
    pub why: &'static str,
}

/// The built-in weakening list (documented in SECURITY.md; the chart's values schema and
/// admission policy are generated from it by `scripts/generate`).
pub const WEAKENING: &[Weakening] = &[
    Weakening {
        key: "kernel.randomize_va_space",
        weak_values: "0 or 1",
        weakens: Values::Below(2),
        why: "turns address space layout randomisation off or down",
    },
    Weakening {
        key: "kernel.kptr_restrict",
        weak_values: "0",
        weakens: Values::Below(1),
        why: "shows kernel addresses to unprivileged users, easing kernel exploits",
    },
    Weakening {
        key: "kernel.dmesg_restrict",
        weak_values: "0",
        weakens: Values::Below(1),
        why: "lets unprivileged users read the kernel log",
    },
    Weakening {
        key: "kernel.perf_event_paranoid",
        weak_values: "below 2",
        weakens: Values::Below(2),
        why: "lets unprivileged users profile the kernel",
    },
    Weakening {
        key: "kernel.yama.ptrace_scope",
        weak_values: "0",
        weakens: Values::Below(1),
        why: "lets any process trace any other of the same user",
    },
    Weakening {
        key: "kernel.unprivileged_bpf_disabled",
        weak_values: "0",
        weakens: Values::Is(0),
        why: "lets unprivileged users load BPF programs",
    },
    Weakening {
        key: "fs.suid_dumpable",
        weak_values: "1 or 2",
        weakens: Values::Not(0),
        why: "lets set-uid programs dump core, leaking their memory",
    },
    Weakening {
        key: "fs.protected_symlinks",
        weak_values: "0",
        weakens: Values::Below(1),
        why: "re-opens symlink races in world-writable directories",
    },
    Weakening {
        key: "fs.protected_hardlinks",
        weak_values: "0",
        weakens: Values::Below(1),
        why: "re-opens hardlink attacks on files the user does not own",
    },
    Weakening {
        key: "fs.protected_fifos",
        weak_values: "0",
        weakens: Values::Below(1),
        why: "lets a process write to a FIFO another user planted in a sticky world-writable \
              directory (spoofed input to root's programs)",
    },
    Weakening {
        key: "fs.protected_regular",
        weak_values: "0",
        weakens: Values::Below(1),
        why: "lets a process open a file another user planted in a sticky world-writable \
              directory (the /tmp file races the setting closes)",
    },
    Weakening {
        key: "vm.mmap_min_addr",
        weak_values: "below 65536",
        weakens: Values::Below(65536),
        why: "lets processes map low addresses, turning kernel NULL dereferences into exploits",
    },
    Weakening {
        key: "vm.unprivileged_userfaultfd",
        weak_values: "1",
        weakens: Values::Not(0),
        why: "gives unprivileged users userfaultfd, a common kernel-exploit primitive",
    },
    Weakening {
        key: "user.max_user_namespaces",
        weak_values: "any value above 0",
        weakens: Values::Above(0),
        why: "allows unprivileged user namespaces, a large kernel attack surface",
    },
];

/// Whether a value-dependent rule ([`ONE_WAY`], [`WEAKENING`]) judges values of `dotted`: such
/// keys take plain decimal values only.
pub fn has_value_rule(dotted: &str) -> bool {
    ONE_WAY.iter().any(|o| o.key == dotted) || WEAKENING.iter().any(|w| w.key == dotted)
}

/// Keys of [`ONE_WAY`] and [`WEAKENING`], each once, sorted.
pub fn value_rule_keys() -> Vec<&'static str> {
    let keys: BTreeSet<&'static str> = ONE_WAY
        .iter()
        .map(|o| o.key)
        .chain(WEAKENING.iter().map(|w| w.key))
        .collect();
    keys.into_iter().collect()
}

/// The cluster sysctl policy as written by the platform team (YAML or JSON, strict: unknown
/// fields are refused). Every list is optional; the default allows what the built-in rules allow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SysctlPolicy {
    /// Scopes profiles may set; absent allows all three.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_scopes: Option<Vec<Scope>>,
    /// RE2 patterns, each matched against the whole canonical dotted key; empty allows every key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_keys: Vec<String>,
    /// RE2 patterns of keys refused in addition to the built-in denylist (whole-key match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_keys: Vec<String>,
    /// Keys of the built-in weakening list whose weakening values are allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_weakening: Vec<String>,
    /// Whether profiles may set `persist: true` (write their keys to the node's sysctl.d);
    /// absent allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_persist: Option<bool>,
}

/// Most patterns a policy may hold, and the compiled size of each: a policy is input too.
pub const MAX_POLICY_PATTERNS: usize = 1000;
const MAX_PATTERN_BYTES: usize = 1 << 20;
/// Largest policy file read.
pub const MAX_POLICY_FILE_BYTES: u64 = 1 << 20;

/// A cluster policy that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read (or is not a regular file, or is too large).
    #[error("cannot read the sysctl policy {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Not valid YAML/JSON for a [`SysctlPolicy`] (an unknown field is named).
    #[error("invalid sysctl policy: {0}")]
    Syntax(String),
    /// A pattern that does not compile, or a bad `allowWeakening` entry.
    #[error("invalid sysctl policy: {field}: {message}")]
    Invalid {
        /// `allowedKeys[3]`, ...
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// A compiled [`SysctlPolicy`] plus the built-in rules: what the engine checks before every
/// write, restores included. [`Policy::default`] is the built-in rules alone.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Set when the policy could not be loaded: every write is refused (fail closed).
    refuse_all: Option<String>,
    scopes: Option<BTreeSet<Scope>>,
    allowed: Vec<(String, Regex)>,
    denied: Vec<(String, Regex)>,
    allow_weakening: BTreeSet<String>,
    /// `allowPersist: false` in the cluster policy.
    forbid_persist: bool,
}

fn compile(field: &str, patterns: &[String]) -> Result<Vec<(String, Regex)>, PolicyError> {
    if patterns.len() > MAX_POLICY_PATTERNS {
        return Err(PolicyError::Invalid {
            field: field.to_owned(),
            message: format!("more than {MAX_POLICY_PATTERNS} patterns"),
        });
    }
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            RegexBuilder::new(&format!("^(?:{p})$"))
                .size_limit(MAX_PATTERN_BYTES)
                .build()
                .map(|re| (p.clone(), re))
                .map_err(|e| PolicyError::Invalid {
                    field: format!("{field}[{i}]"),
                    message: format!("{p:?} is not a valid pattern: {e}"),
                })
        })
        .collect()
}

impl SysctlPolicy {
    /// Parses a policy document (YAML or JSON; an empty document is the default policy).
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        if let Err(line) = super::input::check_yaml_nesting(text, 16, 64) {
            return Err(PolicyError::Syntax(format!(
                "line {line}: nested or indented too deeply for a sysctl policy"
            )));
        }
        serde_yaml::from_str::<Option<Self>>(text)
            .map(Option::unwrap_or_default)
            .map_err(|e| PolicyError::Syntax(e.to_string()))
    }

    /// Checks the patterns and the `allowWeakening` entries.
    pub fn compile(&self) -> Result<Policy, PolicyError> {
        let mut allow_weakening = BTreeSet::new();
        for (i, raw) in self.allow_weakening.iter().enumerate() {
            let invalid = |message: String| PolicyError::Invalid {
                field: format!("allowWeakening[{i}]"),
                message,
            };
            let key = SysctlKey::parse(raw).map_err(|e| invalid(e.to_string()))?;
            let dotted = key.dotted();
            if !WEAKENING.iter().any(|w| w.key == dotted) {
                return Err(invalid(format!(
                    "{dotted} is not on the weakening list ({})",
                    WEAKENING
                        .iter()
                        .map(|w| w.key)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            allow_weakening.insert(dotted);
        }
        Ok(Policy {
            refuse_all: None,
            scopes: self
                .allowed_scopes
                .as_ref()
                .map(|s| s.iter().copied().collect()),
            allowed: compile("allowedKeys", &self.allowed_keys)?,
            denied: compile("deniedKeys", &self.denied_keys)?,
            allow_weakening,
            forbid_persist: self.allow_persist == Some(false),
        })
    }
}

impl Policy {
    /// Reads, parses and compiles a policy file. Refuses anything but a regular file of at most
    /// [`MAX_POLICY_FILE_BYTES`] without reading it (a FIFO would block, a device never end).
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let read_err = |reason: String| PolicyError::Read {
            path: path.display().to_string(),
            reason,
        };
        let text = crate::bounded_read::read_regular_file(path, MAX_POLICY_FILE_BYTES)
            .map_err(|e| read_err(e.to_string()))?;
        SysctlPolicy::parse(&text)?.compile()
    }

    /// Whether keys may be written to the node's sysctl.d file (`spec.persist`). A policy that
    /// refuses every write refuses this too.
    pub fn allows_persist(&self) -> bool {
        self.refuse_all.is_none() && !self.forbid_persist
    }

    /// A policy that refuses every write, for when the real one cannot be loaded: an agent must
    /// not fall back to allowing more than the platform team allowed.
    pub fn refuse_all(why: impl Into<String>) -> Self {
        Self {
            refuse_all: Some(why.into()),
            ..Self::default()
        }
    }

    /// Every rule for writing `value` to `key`: the built-in denylist, the value checks, one-way
    /// values, the cluster policy's scopes and patterns, the weakening list, and plain decimal
    /// values for keys under a value rule. The same check runs in `plan`, `apply`, the agent,
    /// and before every restore of a ledger entry.
    ///
    /// Numbers are judged as the kernel will read them ([`value::kernel_integer`]: `0100000` is
    /// 32768, `0x3` is 3), so no spelling slips past a rule; and since a reviewer reads `0100000`
    /// as a hundred thousand, such spellings are refused for keys under a rule even when the
    /// number itself would pass (admission refuses them the same way).
    pub fn check(&self, key: &SysctlKey, value: &str) -> Result<(), Refusal> {
        let dotted = key.dotted();
        if let Some(why) = &self.refuse_all {
            return Err(Refusal::denied(format!(
                "sysctl {dotted}: not written: the cluster sysctl policy is unusable ({why})"
            )));
        }
        check(key).map_err(|v| Refusal::denied(v.to_string()))?;
        value::check(value).map_err(|e| Refusal {
            state: KeyState::Invalid,
            message: format!("sysctl {dotted}: {e}"),
        })?;
        let n = value::kernel_integer(value);
        check_one_way(&dotted, value, n)?;
        self.check_scope_and_patterns(key, &dotted)?;
        self.check_weakening(&dotted, value, n)?;
        check_decimal(&dotted, value, n)
    }

    fn check_scope_and_patterns(&self, key: &SysctlKey, dotted: &str) -> Result<(), Refusal> {
        let scope = key.scope();
        if let Some(scopes) = &self.scopes
            && !scopes.contains(&scope)
        {
            return Err(Refusal::denied(format!(
                "sysctl {dotted}: denied by cluster policy: scope {} not in allowedScopes",
                scope.as_str()
            )));
        }
        let forms = pattern_forms(key);
        let matches = |re: &Regex| forms.iter().any(|f| re.is_match(f));
        if !self.allowed.is_empty() && !self.allowed.iter().any(|(_, re)| matches(re)) {
            return Err(Refusal::denied(format!(
                "sysctl {dotted}: denied by cluster policy: matches no allowedKeys pattern"
            )));
        }
        if let Some((p, _)) = self.denied.iter().find(|(_, re)| matches(re)) {
            return Err(Refusal::denied(format!(
                "sysctl {dotted}: denied by cluster policy: matches deniedKeys pattern {p:?}"
            )));
        }
        Ok(())
    }

    fn check_weakening(&self, dotted: &str, value: &str, n: Option<i128>) -> Result<(), Refusal> {
        // A value the kernel does not read as a number counts as weakening (fail closed).
        match WEAKENING.iter().find(|w| w.key == dotted) {
            Some(w)
                if n.is_none_or(|n| w.weakens.contains(n))
                    && !self.allow_weakening.contains(dotted) =>
            {
                Err(Refusal::denied(format!(
                    "sysctl {dotted}={}: denied: weakens the node ({}; weakening values: {}){}; \
                     the cluster policy must list it in allowWeakening",
                    value.trim(),
                    w.why,
                    w.weak_values,
                    kernel_reading(value, n),
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The forms policy patterns are matched against: the canonical dotted key, and the key with
/// every separator a dot, as people write keys whose components contain dots
/// (`net.ipv4.conf.eth0.100.rp_filter` for `net.ipv4.conf.eth0/100.rp_filter`). A pattern
/// matching either counts, for allowedKeys and deniedKeys alike; the admission policy does the
/// same.
fn pattern_forms(key: &SysctlKey) -> Vec<String> {
    let dotted = key.dotted();
    let flat = key.path().replace('/', ".");
    if flat == dotted {
        vec![dotted]
    } else {
        vec![dotted, flat]
    }
}

/// `" (the kernel reads 0x3 as 3)"` when the kernel reads the value as another spelling.
fn kernel_reading(value: &str, n: Option<i128>) -> String {
    match n {
        Some(n) if value.trim() != n.to_string() => {
            format!(" (the kernel reads {:?} as {n})", value.trim())
        }
        _ => String::new(),
    }
}

fn check_one_way(dotted: &str, value: &str, n: Option<i128>) -> Result<(), Refusal> {
    match (ONE_WAY.iter().find(|o| o.key == dotted), n) {
        (Some(o), Some(n)) if o.one_way.contains(n) => Err(Refusal::denied(format!(
            "sysctl {dotted}={}: denied by nodetune policy: one-way value{}: {}",
            value.trim(),
            kernel_reading(value, Some(n)),
            o.why
        ))),
        _ => Ok(()),
    }
}

/// Keys under a value rule take plain decimal values only ([`value::DECIMAL_PATTERN`]).
fn check_decimal(dotted: &str, value: &str, n: Option<i128>) -> Result<(), Refusal> {
    if !has_value_rule(dotted) || value::is_plain_decimal(value) {
        return Ok(());
    }
    let read = match n {
        Some(n) => format!("the kernel would read {:?} as {n}", value.trim()),
        None => format!("{:?} is not an integer", value.trim()),
    };
    Err(Refusal::denied(format!(
        "sysctl {dotted}={}: denied by nodetune policy: a key under a built-in value rule takes \
         a plain decimal integer ({read}); write it in decimal",
        value.trim()
    )))
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
        "kernel.tainted" => {
            "one-way: a write can only add taint flags, never clear them, so nodetune could not \
             restore it (and a taint flag misleads every later bug report)"
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

    fn k(raw: &str) -> SysctlKey {
        SysctlKey::parse(raw).unwrap()
    }

    fn policy(yaml: &str) -> Policy {
        SysctlPolicy::parse(yaml).unwrap().compile().unwrap()
    }

    /// Defect 11: one-way values are refused whatever the policy; weakening values need the
    /// opt-in, hardening values of the same keys do not.
    #[test]
    fn one_way_and_weakening_values() {
        let builtin = Policy::default();
        for (key, value) in [
            ("kernel.unprivileged_bpf_disabled", "1"),
            ("kernel.yama.ptrace_scope", "3"),
        ] {
            let r = builtin.check(&k(key), value).unwrap_err();
            assert_eq!(r.state, KeyState::Denied);
            assert!(r.message.contains("one-way"), "{r}");
            let opted = policy(&format!("allowWeakening: [{key}]"));
            assert!(opted.check(&k(key), value).is_err(), "opt-in does not help");
        }
        for (key, weak, strong) in [
            ("kernel.randomize_va_space", "0", "2"),
            ("kernel.kptr_restrict", "0", "2"),
            ("fs.suid_dumpable", "2", "0"),
            ("vm.mmap_min_addr", "0", "65536"),
            ("user.max_user_namespaces", "10000", "0"),
            ("kernel.unprivileged_bpf_disabled", "0", "2"),
        ] {
            let r = builtin.check(&k(key), weak).unwrap_err();
            assert!(r.message.contains("allowWeakening"), "{r}");
            assert!(r.message.contains(key), "{r}");
            assert!(builtin.check(&k(key), strong).is_ok(), "{key}={strong}");
            let opted = policy(&format!("allowWeakening: [\"{key}\"]"));
            assert!(opted.check(&k(key), weak).is_ok(), "{key}={weak} opted in");
        }
        // not a number: counts as weakening (fail closed)
        assert!(builtin.check(&k("vm.mmap_min_addr"), "lots").is_err());
    }

    /// Issue 17 item 1: the kernel reads `0100000` as octal and `0x3` as hex; the rules judge
    /// that number, and keys under a rule take plain decimal only (as admission does).
    #[test]
    fn numbers_are_judged_as_the_kernel_reads_them() {
        let builtin = Policy::default();
        let opted = policy(
            "allowWeakening: [vm.mmap_min_addr, kernel.yama.ptrace_scope, \
             kernel.unprivileged_bpf_disabled, kernel.randomize_va_space]",
        );
        // vm.mmap_min_addr=0100000 is 32768: weakening, whatever it looks like.
        let r = builtin
            .check(&k("vm.mmap_min_addr"), "0100000")
            .unwrap_err();
        assert_eq!(r.state, KeyState::Denied);
        assert!(r.message.contains("allowWeakening"), "{r}");
        assert!(r.message.contains("as 32768"), "{r}");
        // One-way values in hex (or followed by a second number the kernel ignores), with every
        // opt-in there is.
        for (key, value) in [
            ("kernel.yama.ptrace_scope", "0x3"),
            ("kernel.yama.ptrace_scope", " 03"),
            ("kernel.yama.ptrace_scope", "3 0"),
            ("kernel.unprivileged_bpf_disabled", "0x1"),
            ("kernel.unprivileged_bpf_disabled", "+1"),
        ] {
            let r = opted.check(&k(key), value).unwrap_err();
            assert!(r.message.contains("one-way"), "{key}={value:?}: {r}");
        }
        // Opted in, or hardening: still only plain decimal.
        for (key, value) in [
            ("vm.mmap_min_addr", "0100000"),
            ("vm.mmap_min_addr", "0x10000"),
            ("kernel.randomize_va_space", "02"),
            ("kernel.yama.ptrace_scope", "0x2"),
            ("kernel.yama.ptrace_scope", "2 2"),
            ("kernel.yama.ptrace_scope", "-0"),
        ] {
            let r = opted.check(&k(key), value).unwrap_err();
            assert_eq!(r.state, KeyState::Denied, "{key}={value:?}");
            assert!(r.message.contains("plain decimal"), "{key}={value:?}: {r}");
        }
        for (key, value) in [
            ("vm.mmap_min_addr", "65536"),
            ("vm.mmap_min_addr", " 65536\t"),
            ("kernel.yama.ptrace_scope", "2"),
            ("kernel.randomize_va_space", "2"),
        ] {
            assert!(builtin.check(&k(key), value).is_ok(), "{key}={value:?}");
        }
        assert!(opted.check(&k("vm.mmap_min_addr"), "4096").is_ok());
        // Keys under no rule keep every form the kernel takes.
        assert!(builtin.check(&k("net.core.somaxconn"), "0x400").is_ok());
    }

    /// The CEL written for admission says what [`Values::contains`] does.
    #[test]
    fn values_as_cel() {
        for (v, cel, inside, outside) in [
            (Values::Below(2), "n < 2", 1, 2),
            (Values::Above(0), "n > 0", 1, 0),
            (Values::Is(3), "n == 3", 3, 2),
            (Values::Not(0), "n != 0", 2, 0),
        ] {
            assert_eq!(v.cel("n"), cel);
            assert!(v.contains(inside) && !v.contains(outside), "{cel}");
        }
    }

    /// Issue 17 item 8: `kernel.tainted` only ever gains flags; `fs.protected_fifos` and
    /// `fs.protected_regular` at 0 re-open /tmp races.
    #[test]
    fn tainted_is_denied_and_protected_files_weaken() {
        let builtin = Policy::default();
        for value in ["0", "4096"] {
            let r = builtin.check(&k("kernel.tainted"), value).unwrap_err();
            assert!(r.message.contains("one-way"), "{r}");
        }
        assert!(denied("kernel/tainted"));
        for key in ["fs.protected_fifos", "fs.protected_regular"] {
            let r = builtin.check(&k(key), "0").unwrap_err();
            assert!(r.message.contains("allowWeakening"), "{key}: {r}");
            assert!(builtin.check(&k(key), "1").is_ok(), "{key}=1");
            assert!(builtin.check(&k(key), "2").is_ok(), "{key}=2");
            let opted = policy(&format!("allowWeakening: [{key}]"));
            assert!(opted.check(&k(key), "0").is_ok(), "{key}=0 opted in");
        }
    }

    /// Issue 17 item 7: a pattern written with the interface's own dots
    /// (`eth0.100`) matches the key, whose canonical form is `...eth0/100...`.
    #[test]
    fn patterns_match_the_form_people_write() {
        let key = k("net/ipv4/conf/eth0.100/rp_filter");
        assert_eq!(key.dotted(), "net.ipv4.conf.eth0/100.rp_filter");
        let p = policy("deniedKeys: ['net\\.ipv4\\.conf\\.eth0\\.100\\.rp_filter']");
        let r = p.check(&key, "1").unwrap_err();
        assert!(r.message.contains("deniedKeys"), "{r}");
        let p = policy("deniedKeys: ['net\\.ipv4\\.conf\\.[a-z0-9]+\\.rp_filter']");
        assert!(p.check(&key, "1").is_ok(), "no interface named eth0 alone");
        let p = policy("deniedKeys: ['net\\.ipv4\\.conf\\.[a-z0-9.]+\\.rp_filter']");
        assert!(p.check(&key, "1").is_err());
        // the canonical form still matches
        let p = policy("deniedKeys: ['net\\.ipv4\\.conf\\.eth0/100\\.rp_filter']");
        assert!(p.check(&key, "1").is_err());
        let p = policy("allowedKeys: ['net\\.ipv4\\.conf\\.eth0\\.100\\..*']");
        assert!(p.check(&key, "1").is_ok());
        assert!(p.check(&k("net.ipv4.conf.eth0.rp_filter"), "1").is_err());
    }

    #[test]
    fn cluster_policy_rules_name_key_and_rule() {
        let p = policy(
            "allowedScopes: [NetworkNamespace, IPCNamespace]\nallowedKeys: ['net\\.ipv4\\..*', 'kernel\\.shm.*']\ndeniedKeys: ['net\\.ipv4\\.tcp_syncookies']\n",
        );
        let err = p.check(&k("vm.swappiness"), "10").unwrap_err();
        assert_eq!(err.state, KeyState::Denied);
        assert_eq!(
            err.message,
            "sysctl vm.swappiness: denied by cluster policy: scope Node not in allowedScopes"
        );
        let err = p.check(&k("net.core.somaxconn"), "1024").unwrap_err();
        assert!(
            err.message.contains("matches no allowedKeys pattern"),
            "{err}"
        );
        let err = p.check(&k("net.ipv4.tcp_syncookies"), "1").unwrap_err();
        assert!(err.message.contains("deniedKeys"), "{err}");
        assert!(p.check(&k("net/ipv4/tcp_fin_timeout"), "30").is_ok());
        assert!(p.check(&k("kernel.shmmax"), "1").is_ok());
        // full match: a pattern is anchored at both ends
        let p = policy("allowedKeys: ['net\\.ipv4']");
        assert!(p.check(&k("net.ipv4.tcp_fin_timeout"), "30").is_err());
        // the built-in denylist holds whatever the policy allows
        let p = policy("allowedKeys: ['.*']");
        assert!(p.check(&k("kernel.core_pattern"), "core").is_err());
        // value checks run too
        let err = p.check(&k("net.ipv4.tcp_fin_timeout"), "3\n0").unwrap_err();
        assert_eq!(err.state, KeyState::Invalid);
    }

    #[test]
    fn bad_policies_are_refused_naming_the_field() {
        for (text, needle) in [
            ("allowedScope: [Node]", "allowedScope"),
            ("allowedScopes: [Host]", "Host"),
            ("allowedKeys: ['(']", "allowedKeys[0]"),
            (
                "allowWeakening: [vm.swappiness]",
                "not on the weakening list",
            ),
            ("allowWeakening: ['Bad Key']", "allowWeakening[0]"),
            ("[1, 2]", "invalid"),
            (&"[".repeat(100_000), "nested"),
        ] {
            let err = SysctlPolicy::parse(text)
                .and_then(|p| p.compile())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(SysctlPolicy::parse("").unwrap().compile().is_ok());
        assert!(SysctlPolicy::parse("{}").unwrap().compile().is_ok());
        let json = r#"{"allowedScopes": ["NetworkNamespace"], "allowedKeys": [], "deniedKeys": ["net\\.core\\..*"], "allowWeakening": []}"#;
        let p = SysctlPolicy::parse(json).unwrap().compile().unwrap();
        assert!(p.check(&k("net.core.somaxconn"), "1").is_err());
    }

    #[test]
    fn policy_file_must_be_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert!(
            Policy::from_file(&fifo)
                .unwrap_err()
                .to_string()
                .contains("regular")
        );
        assert!(Policy::from_file(Path::new("/dev/zero")).is_err());
        let ok = dir.path().join("p.yaml");
        std::fs::write(&ok, "allowedScopes: [NetworkNamespace]\n").unwrap();
        let p = Policy::from_file(&ok).unwrap();
        assert!(p.check(&k("vm.swappiness"), "1").is_err());
    }

    #[test]
    fn refuse_all_refuses_everything() {
        let p = Policy::refuse_all("bad file");
        let err = p.check(&k("net.ipv4.tcp_fin_timeout"), "30").unwrap_err();
        assert_eq!(err.state, KeyState::Denied);
        assert!(err.message.contains("bad file"), "{err}");
    }

    #[test]
    fn lists_are_valid_canonical_keys() {
        for key in WEAKENING
            .iter()
            .map(|w| w.key)
            .chain(ONE_WAY.iter().map(|o| o.key))
        {
            assert_eq!(SysctlKey::parse(key).unwrap().dotted(), key);
            assert!(
                check(&k(key)).is_ok(),
                "{key} must not also be denied outright"
            );
            // Admission folds keys onto dots before comparing with these lists (CRD rules,
            // files/rules.json): exact only while no entry has a literal dot in a component.
            assert!(!key.contains('/'), "{key}");
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
