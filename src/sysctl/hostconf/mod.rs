//! The host's boot-time sysctl configuration, read as systemd-sysctl applies it at boot, and
//! where it disagrees with what the node's profiles want.
//!
//! Rules implemented (sysctl.d(5), and systemd's `src/sysctl/sysctl.c`):
//! 1. Files: every `*.conf` in `/etc/sysctl.d`, `/run/sysctl.d`, `/usr/local/lib/sysctl.d`,
//!    `/usr/lib/sysctl.d` and `/lib/sysctl.d` (skipped when it is `/usr/lib`'s), sorted by file
//!    name across the directories ([`files::HostRoot::sources`]).
//! 2. A name in an earlier directory masks the same name in later ones (`/etc` over `/run` over
//!    `/usr/local/lib` over `/usr/lib`); a mask that is a symlink to `/dev/null` (or an empty
//!    file) sets nothing.
//! 3. `/etc/sysctl.conf` is read last, unless one of the files above already is that file
//!    (`99-sysctl.conf -> ../sysctl.conf`), so it never counts twice.
//! 4. The later assignment to a key wins; one with the same value as the earlier keeps the
//!    earlier's place and origin (systemd's `parse_file()`: `streq_ptr(value, existing->value)`).
//! 5. Globs (`net.ipv4.conf.*.rp_filter`) apply to keys that exist in the kernel, but never to a
//!    key with an explicit entry anywhere, whatever the order (systemd's `apply_all()`: "Not
//!    setting %s (explicit setting exists)"); a `-key` line without a value is such an entry
//!    and only keeps globs off. Of several globs matching a key, the last in the order wins
//!    (they are written in order).
//! 6. Keys in either spelling (`.` or `/` separators), a `-` prefix (ignore failure), `#` and
//!    `;` comment lines, whitespace around keys and values.
//!
//! Reading is in [`files`] (bounded, confined to the host root); parsing in [`parse`]; what is
//! here is pure.
pub mod files;
pub mod parse;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::key::SysctlKey;
use super::value;

/// Most distinct globs kept (each is compiled once per read); more are ignored with a warning.
pub const MAX_GLOBS: usize = 4096;

/// Most warnings about the host's files kept per read.
pub const MAX_WARNINGS: usize = 10;

/// The agent's default host root (its read-only mount of the host's `/`).
pub const DEFAULT_HOST_ROOT: &str = "/host";

/// A profile key the host's boot configuration sets to another value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostConfigDiff {
    /// The key, canonical dotted form.
    pub key: String,
    /// The value the profiles want.
    pub desired: String,
    /// The value the boot configuration sets (the node has it from boot until the agent's
    /// first pass, and again after a restore).
    pub boot_value: String,
    /// The file that sets it, as a path on the host.
    pub file: String,
    /// The line in that file (1-based).
    pub line: u32,
    /// The glob that matched, when the key is set through one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glob: Option<String>,
}

/// One effective entry, with where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub file: String,
    pub line: parse::Line,
}

/// The host's boot-time sysctl settings in systemd-sysctl's order (see the module docs).
#[derive(Debug, Default)]
pub struct HostConfig {
    /// Entries by position in the order; an overridden entry is removed.
    ordered: BTreeMap<u64, Assignment>,
    /// Key or glob (slash form) → its position.
    index: HashMap<String, u64>,
    /// The positions of the glob entries (their patterns are in `compiled`).
    globs: BTreeMap<u64, String>,
    /// Each distinct glob compiled once per read (a glob reassigned over and over in a hostile
    /// file costs one compilation).
    compiled: HashMap<String, regex::Regex>,
    next: u64,
    /// The files read, in order (host paths).
    pub files: Vec<String>,
    /// Lines and files that could not be used.
    pub warnings: Vec<String>,
}

impl HostConfig {
    /// Reads the host's configuration under `root`; `Ok(None)` when `root` does not exist.
    pub fn read(root: &Path) -> std::io::Result<Option<Self>> {
        let Some(host) = files::HostRoot::open(root)? else {
            return Ok(None);
        };
        let mut warnings = Vec::new();
        let sources = host.sources(&mut warnings);
        let texts = host.read_all(&sources, &mut warnings);
        let mut config = Self::from_texts(&texts);
        warnings.append(&mut config.warnings);
        // A hostile file could fill the report with warnings: the first few say enough.
        if warnings.len() > MAX_WARNINGS {
            let more = warnings.len() - MAX_WARNINGS;
            warnings.truncate(MAX_WARNINGS);
            warnings.push(format!("host config: and {more} more problems"));
        }
        config.warnings = warnings;
        Ok(Some(config))
    }

    /// Builds the configuration from `(host path, text)` pairs already in reading order.
    pub fn from_texts(texts: &[(String, String)]) -> Self {
        let mut config = Self::default();
        for (file, text) in texts {
            config.files.push(file.clone());
            for line in parse::parse(text, file, &mut config.warnings) {
                config.add(file, line);
            }
        }
        config
    }

    /// Rule 4: a later assignment replaces an earlier one and takes its place at the end.
    fn add(&mut self, file: &str, line: parse::Line) {
        if let Some(&at) = self.index.get(&line.key) {
            if self
                .ordered
                .get(&at)
                .is_some_and(|a| a.line.value == line.value)
            {
                return;
            }
            self.ordered.remove(&at);
            self.globs.remove(&at);
            self.index.remove(&line.key);
        }
        let at = self.next;
        if line.glob && !self.compile(file, &line, at) {
            return;
        }
        self.next += 1;
        self.index.insert(line.key.clone(), at);
        self.ordered.insert(
            at,
            Assignment {
                file: file.to_owned(),
                line,
            },
        );
    }

    /// Compiles the glob of `line` for position `at`; false (with a warning) when it cannot be
    /// used.
    fn compile(&mut self, file: &str, line: &parse::Line, at: u64) -> bool {
        let why = if self.compiled.contains_key(&line.key) {
            self.globs.insert(at, line.key.clone());
            return true;
        } else if self.compiled.len() >= MAX_GLOBS {
            format!("more than {MAX_GLOBS} distinct globs")
        } else if let Some(re) = parse::glob_regex(&line.key) {
            self.compiled.insert(line.key.clone(), re);
            self.globs.insert(at, line.key.clone());
            return true;
        } else {
            format!("{} is not a valid glob", line.key)
        };
        self.warnings
            .push(format!("host config: {file}:{} ignored: {why}", line.line));
        false
    }

    /// The entry that sets `key` at boot, if any (rule 5); `exists` says whether the kernel has
    /// the key (globs only expand to existing keys).
    pub fn setting_for(&self, key: &SysctlKey, exists: bool) -> Option<&Assignment> {
        if let Some(at) = self.index.get(key.path()) {
            return self.ordered.get(at).filter(|a| a.line.value.is_some());
        }
        if !exists {
            return None;
        }
        // The last matching glob in the order wins (rule 5).
        self.globs
            .iter()
            .rev()
            .filter(|(_, pattern)| {
                self.compiled
                    .get(*pattern)
                    .is_some_and(|re| re.is_match(key.path()))
            })
            .filter_map(|(at, _)| self.ordered.get(at))
            .find(|a| a.line.value.is_some())
    }

    /// For each desired `(key, value)`, where the boot configuration sets another value.
    pub fn differences<'a>(
        &self,
        desired: impl IntoIterator<Item = (&'a SysctlKey, &'a str)>,
        exists: impl Fn(&SysctlKey) -> bool,
    ) -> Vec<HostConfigDiff> {
        desired
            .into_iter()
            .filter_map(|(key, want)| {
                let a = self.setting_for(key, exists(key))?;
                let boot = a.line.value.as_deref()?;
                (!value::same(boot, want)).then(|| HostConfigDiff {
                    key: key.dotted(),
                    desired: want.to_owned(),
                    boot_value: boot.to_owned(),
                    file: a.file.clone(),
                    line: a.line.line,
                    // A glob back in the dotted spelling people write.
                    glob: a
                        .line
                        .glob
                        .then(|| crate::sysctl::key::swap_separators(&a.line.key)),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
