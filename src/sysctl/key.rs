//! Sysctl key grammar: parsing, validation and the mapping to a `/proc/sys` path.
//!
//! # Grammar
//!
//! A key names a file below `/proc/sys`. It is written in one of the two forms sysctl(8)
//! accepts; which form is meant is decided, as in sysctl(8), by the *first* separator in the key:
//!
//! * **dotted form** (first separator is `.`): components are separated by `.`; a `/` inside a
//!   component stands for a literal dot in the file name.
//!   `net.ipv4.conf.eth0/100.rp_filter` → `net/ipv4/conf/eth0.100/rp_filter`.
//! * **slash form** (first separator is `/`): components are separated by `/`; a `.` is a literal
//!   dot in the file name. `net/ipv4/conf/eth0.100/rp_filter` → the same path.
//!
//! A path component is one or more *words* joined by single literal dots, and a word is one or
//! more of `[a-z0-9_-]`. So, in both forms:
//!
//! * at least two components (`kernel` alone is a directory, not a key);
//! * no empty component, no repeated, leading or trailing separator, hence no `.`/`..`
//!   components and no absolute paths;
//! * literal dots only *inside* a component (`eth0.100`), never at its start or end;
//! * lowercase ASCII letters, digits, `_` and `-` only (`-` occurs in real keys such as
//!   `debug.exception-trace` and in interface names such as `br-3f2a`);
//! * at most [`KEY_MAX_LEN`] bytes.
//!
//! Deliberately **not** accepted: uppercase letters, `:` (the kernel forbids it in interface names;
//! `eth0:1` aliases have no sysctl directory), `@` (`veth1@if3` is how `ip link` *displays* a veth
//! peer, not a device name), whitespace. The consequence is that an interface whose name uses
//! uppercase letters or other unusual characters cannot be addressed; nodetune prefers a strict
//! grammar that a CRD can validate with one pattern ([`KEY_PATTERN`]).
//!
//! The canonical form, used for display, the ledger and reports, is the dotted form
//! (what `sysctl -a` prints).
//!
//! # Optional keys
//!
//! In a profile's `spec.sysctls` (and in sysctl.conf, as sysctl.d(5) has it) a key may start
//! with one `-`: the key may be missing on a node's kernel, which is then reported Unsupported
//! but not counted as a failure. [`parse_spec`] reads that form; [`SysctlKey::parse`] refuses the
//! marker, so a key's first character is never `-` and the marker is unambiguous.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::vocab::Scope;

/// Longest accepted key, in bytes (the same in both forms, since the forms only swap `.` and `/`).
pub const KEY_MAX_LEN: usize = 255;

/// The grammar of a key as a profile writes it ([`parse_spec`]: an optional `-` marker, then a
/// key) as one anchored regular expression, valid both as an OpenAPI `pattern` (ECMA-262) and
/// inside a Kubernetes CEL rule (`self.matches(...)`, RE2). The length limit is separate:
/// [`KEY_MAX_LEN`] bytes after the marker.
///
/// Alternative one is the dotted form, alternative two the slash form (see the module docs).
/// A unit test checks it against [`parse_spec`] over a table of keys and every short string.
pub const KEY_PATTERN: &str = concat!(
    r"^-?(?:",
    r"[a-z0-9_][a-z0-9_-]*(?:\.[a-z0-9_-]+(?:/[a-z0-9_-]+)*)+",
    r"|",
    r"[a-z0-9_][a-z0-9_-]*(?:/[a-z0-9_-]+(?:\.[a-z0-9_-]+)*)+",
    r")$"
);

/// Why a string is not a valid sysctl key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is the empty string.
    #[error("sysctl key is empty")]
    Empty,
    /// Longer than [`KEY_MAX_LEN`] bytes.
    #[error("sysctl key is {len} bytes long; at most {KEY_MAX_LEN} are allowed")]
    TooLong {
        /// Length of the rejected key in bytes.
        len: usize,
    },
    /// A character outside `[a-z0-9_-./]`.
    #[error(
        "sysctl key {key:?} has {ch:?} at byte {position}; only lowercase letters, digits, '_', '-' and the separators '.' and '/' are allowed"
    )]
    InvalidChar {
        /// The key as given.
        key: String,
        /// The offending character.
        ch: char,
        /// Its byte offset.
        position: usize,
    },
    /// An empty component or word: leading, trailing or repeated separators (this also rejects
    /// `.` and `..` components).
    #[error(
        "sysctl key {key:?} has an empty component at byte {position} (leading, trailing or repeated '.' or '/')"
    )]
    EmptyComponent {
        /// The key as given.
        key: String,
        /// Byte offset where the empty component starts.
        position: usize,
    },
    /// Starts with `-`, the optional-key marker, where only a plain key is accepted.
    #[error(
        "sysctl key {key:?} starts with '-', which marks an optional key and is only allowed in a profile's sysctls or a sysctl.conf"
    )]
    OptionalMarker {
        /// The key as given.
        key: String,
    },
    /// Only one component (no separator at all).
    #[error(
        "sysctl key {key:?} has no separator; a key has at least two components such as 'vm.swappiness'"
    )]
    TooFewComponents {
        /// The key as given.
        key: String,
    },
}

/// A validated sysctl key.
///
/// Stores the path relative to `/proc/sys` (e.g. `net/ipv4/conf/eth0.100/rp_filter`);
/// [`Display`](fmt::Display) and serde use the canonical dotted form
/// (`net.ipv4.conf.eth0/100.rp_filter`). Equality and ordering are by path, so the two spellings
/// of one key compare equal.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SysctlKey {
    path: String,
}

impl SysctlKey {
    /// Parses a key in dotted or slash form (see the module docs for the grammar).
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        if raw.len() > KEY_MAX_LEN {
            return Err(KeyError::TooLong { len: raw.len() });
        }
        if raw.starts_with('-') {
            return Err(KeyError::OptionalMarker {
                key: raw.to_owned(),
            });
        }
        if let Some((position, ch)) = raw
            .char_indices()
            .find(|&(_, c)| !(is_word_char(c) || c == '.' || c == '/'))
        {
            return Err(KeyError::InvalidChar {
                key: raw.to_owned(),
                ch,
                position,
            });
        }
        if !raw.contains(['.', '/']) {
            return Err(KeyError::TooFewComponents {
                key: raw.to_owned(),
            });
        }
        // Empty words: at the start, at the end, or two separators in a row (of either kind).
        let bytes = raw.as_bytes();
        let is_sep = |b: u8| b == b'.' || b == b'/';
        if is_sep(bytes[0]) {
            return Err(empty_at(raw, 0));
        }
        if is_sep(bytes[bytes.len() - 1]) {
            return Err(empty_at(raw, bytes.len()));
        }
        if let Some(i) = bytes.windows(2).position(|w| is_sep(w[0]) && is_sep(w[1])) {
            return Err(empty_at(raw, i + 1));
        }
        Ok(Self {
            path: to_slash_form(raw),
        })
    }

    /// The path relative to `/proc/sys`, with `/` separators (`net/ipv4/tcp_fin_timeout`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The canonical dotted form (`net.ipv4.conf.eth0/100.rp_filter`), as `sysctl -a` prints it.
    pub fn dotted(&self) -> String {
        swap_separators(&self.path)
    }

    /// The path components (`["net", "ipv4", "conf", "eth0.100", "rp_filter"]`).
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.path.split('/')
    }

    /// Which kernel namespace the key lives in (see [`super::scope`]).
    pub fn scope(&self) -> Scope {
        super::scope::scope_of(self)
    }
}

/// Parses a key as a profile or sysctl.conf writes it: an optional leading `-` (the key may be
/// missing on the node's kernel), then a key in either form. Returns the key and whether it was
/// marked optional.
pub fn parse_spec(raw: &str) -> Result<(SysctlKey, bool), KeyError> {
    match raw.strip_prefix('-') {
        Some(rest) => SysctlKey::parse(rest).map(|k| (k, true)),
        None => SysctlKey::parse(raw).map(|k| (k, false)),
    }
}

/// The key as a profile writes it: the canonical dotted form, with the `-` marker if optional.
pub fn spec_string(key: &SysctlKey, optional: bool) -> String {
    if optional {
        format!("-{}", key.dotted())
    } else {
        key.dotted()
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
}

fn empty_at(raw: &str, position: usize) -> KeyError {
    KeyError::EmptyComponent {
        key: raw.to_owned(),
        position,
    }
}

impl fmt::Display for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dotted())
    }
}

impl fmt::Debug for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SysctlKey({})", self.dotted())
    }
}

impl FromStr for SysctlKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SysctlKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.dotted())
    }
}

impl<'de> Deserialize<'de> for SysctlKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// The slash form (a path below `/proc/sys`) of a key or glob spelled either way. As
/// sysctl(8): the first separator decides; in the dotted form `.` and `/` swap, the slash form
/// already is one.
pub(crate) fn to_slash_form(raw: &str) -> String {
    let dotted = raw
        .find(['.', '/'])
        .is_some_and(|i| raw.as_bytes()[i] == b'.');
    if dotted {
        swap_separators(raw)
    } else {
        raw.to_owned()
    }
}

/// `.` and `/` swapped: the one step between the dotted and the slash spelling.
pub(crate) fn swap_separators(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one conversion the key grammar, `dotted()` and the host-config globs share: the
    /// first separator decides the spelling, and swapping twice gives the input back.
    #[test]
    fn slash_form_follows_the_first_separator_and_swapping_round_trips() {
        for (raw, slash) in [
            (
                "net.ipv4.conf.eth0/100.rp_filter",
                "net/ipv4/conf/eth0.100/rp_filter",
            ),
            (
                "net/ipv4/conf/eth0.100/rp_filter",
                "net/ipv4/conf/eth0.100/rp_filter",
            ),
            ("net.ipv4.conf.*.rp_filter", "net/ipv4/conf/*/rp_filter"),
            ("nodots", "nodots"),
        ] {
            assert_eq!(to_slash_form(raw), slash, "{raw}");
        }
        let dotted = "net.ipv4.conf.eth0/100.rp_filter";
        assert_eq!(swap_separators(&swap_separators(dotted)), dotted);
        assert_eq!(
            SysctlKey::parse("net/ipv4/conf/eth0.100/rp_filter")
                .expect("key")
                .dotted(),
            dotted
        );
    }

    /// (input, expected /proc/sys path or None if rejected)
    const TABLE: &[(&str, Option<&str>)] = &[
        ("net.ipv4.tcp_fin_timeout", Some("net/ipv4/tcp_fin_timeout")),
        ("net/ipv4/tcp_fin_timeout", Some("net/ipv4/tcp_fin_timeout")),
        ("vm.swappiness", Some("vm/swappiness")),
        ("debug.exception-trace", Some("debug/exception-trace")),
        ("fs.file-max", Some("fs/file-max")),
        (
            "net.ipv4.conf.br-3f2a9c.rp_filter",
            Some("net/ipv4/conf/br-3f2a9c/rp_filter"),
        ),
        // interface names with dots (VLANs)
        (
            "net/ipv4/conf/eth0.100/rp_filter",
            Some("net/ipv4/conf/eth0.100/rp_filter"),
        ),
        (
            "net.ipv4.conf.eth0/100.rp_filter",
            Some("net/ipv4/conf/eth0.100/rp_filter"),
        ),
        (
            "net.ipv6.conf.bond0/10/20.forwarding",
            Some("net/ipv6/conf/bond0.10.20/forwarding"),
        ),
        (
            "net/ipv6/conf/bond0.10.20/forwarding",
            Some("net/ipv6/conf/bond0.10.20/forwarding"),
        ),
        // the first separator decides the form, as in sysctl(8)
        ("net/ipv4.conf", Some("net/ipv4.conf")),
        ("net.ipv4/conf", Some("net/ipv4.conf")),
        // rejected
        ("", None),
        ("kernel", None),
        ("Net.ipv4.tcp_fin_timeout", None),
        ("net.ipv4.TCP_fin_timeout", None),
        ("net.ipv4..tcp_fin_timeout", None),
        ("net/ipv4//tcp_fin_timeout", None),
        ("net/ipv4/../kernel/modprobe", None),
        ("net/ipv4/./tcp_fin_timeout", None),
        ("/net/ipv4/tcp_fin_timeout", None),
        (".net.ipv4.tcp_fin_timeout", None),
        ("net.ipv4.tcp_fin_timeout.", None),
        ("net/ipv4/tcp_fin_timeout/", None),
        ("net/ipv4/conf/eth0./rp_filter", None),
        ("net/ipv4/conf/.eth0/rp_filter", None),
        ("net.ipv4.conf.eth0/.rp_filter", None),
        ("net./ipv4", None),
        ("net.ipv4.conf.eth0:1.rp_filter", None),
        ("net.ipv4.conf.veth1@if3.rp_filter", None),
        ("net.ipv4.tcp_fin_timeout ", None),
        (" net.ipv4.tcp_fin_timeout", None),
        ("net.ipv4.tcp fin", None),
        ("net.ipv4.tcp_fin_timeout\n", None),
        ("net.ipv4.tcp_fin_timeout\0", None),
        ("net.ipv4.tcp_fin_timeout=30", None),
        ("net.ipv4.tcp_fin_tïmeout", None),
        ("*.ipv4.tcp_fin_timeout", None),
    ];

    #[test]
    fn grammar_table() {
        for &(raw, want) in TABLE {
            let got = SysctlKey::parse(raw);
            match (want, &got) {
                (Some(path), Ok(k)) => assert_eq!(k.path(), path, "path of {raw:?}"),
                (None, Err(_)) => {}
                _ => panic!("{raw:?}: expected {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn length_limit() {
        let max = format!("vm.{}", "a".repeat(KEY_MAX_LEN - 3));
        assert_eq!(max.len(), KEY_MAX_LEN);
        assert!(SysctlKey::parse(&max).is_ok());
        let over = format!("{max}a");
        assert_eq!(
            SysctlKey::parse(&over),
            Err(KeyError::TooLong {
                len: KEY_MAX_LEN + 1
            })
        );
    }

    #[test]
    fn error_kinds() {
        assert_eq!(SysctlKey::parse(""), Err(KeyError::Empty));
        assert!(matches!(
            SysctlKey::parse("Vm.swappiness"),
            Err(KeyError::InvalidChar {
                ch: 'V',
                position: 0,
                ..
            })
        ));
        assert!(matches!(
            SysctlKey::parse("vm..swappiness"),
            Err(KeyError::EmptyComponent { position: 3, .. })
        ));
        assert!(matches!(
            SysctlKey::parse("vm"),
            Err(KeyError::TooFewComponents { .. })
        ));
        let msg = SysctlKey::parse("net/../x").unwrap_err().to_string();
        assert!(msg.contains("empty component"), "{msg}");
    }

    #[test]
    fn canonical_form_is_dotted_and_round_trips() {
        for &(raw, want) in TABLE {
            if want.is_none() {
                continue;
            }
            let k = SysctlKey::parse(raw).unwrap();
            let dotted = k.dotted();
            assert!(!dotted.starts_with('/'));
            let again = SysctlKey::parse(&dotted).unwrap();
            assert_eq!(again, k, "{raw:?} -> {dotted:?}");
            let slashed = SysctlKey::parse(k.path()).unwrap();
            assert_eq!(slashed, k);
        }
        let k = SysctlKey::parse("net/ipv4/conf/eth0.100/rp_filter").unwrap();
        assert_eq!(k.to_string(), "net.ipv4.conf.eth0/100.rp_filter");
        assert_eq!(
            k.components().collect::<Vec<_>>(),
            ["net", "ipv4", "conf", "eth0.100", "rp_filter"]
        );
    }

    #[test]
    fn serde_uses_dotted_form_and_validates() {
        let k = SysctlKey::parse("net/ipv4/conf/eth0.100/rp_filter").unwrap();
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, "\"net.ipv4.conf.eth0/100.rp_filter\"");
        let back: SysctlKey = serde_json::from_str(&json).unwrap();
        assert_eq!(back, k);
        assert!(serde_json::from_str::<SysctlKey>("\"net/../x\"").is_err());
    }

    /// Keeps [`KEY_PATTERN`] in sync with the parser: the same table must be accepted and
    /// rejected by both (length aside, which the CRD checks separately). The `regex` crate
    /// speaks the RE2 syntax CEL uses.
    #[test]
    fn pattern_agrees_with_parser() {
        let re = regex::Regex::new(KEY_PATTERN).unwrap();
        let mut extra: Vec<String> = TABLE.iter().map(|(k, _)| k.to_string()).collect();
        extra.extend(TABLE.iter().map(|(k, _)| format!("-{k}")));
        extra.extend(TABLE.iter().map(|(k, _)| format!("--{k}")));
        // every 1- to 3-character string over a small alphabet, to catch corner cases
        let alphabet = ['a', 'Z', '0', '_', '-', '.', '/', ':'];
        for a in alphabet {
            extra.push(a.to_string());
            for b in alphabet {
                extra.push(format!("{a}{b}"));
                for c in alphabet {
                    extra.push(format!("{a}{b}{c}"));
                    for d in ['.', '/', 'x'] {
                        extra.push(format!("{a}{b}{c}{d}x"));
                    }
                }
            }
        }
        for raw in &extra {
            let parsed = parse_spec(raw).is_ok();
            let matched = re.is_match(raw);
            assert_eq!(
                parsed, matched,
                "parser and KEY_PATTERN disagree on {raw:?}"
            );
        }
    }

    #[test]
    fn optional_marker() {
        let (k, optional) = parse_spec("-net.ipv4.tcp_tw_recycle").unwrap();
        assert!(optional);
        assert_eq!(k.dotted(), "net.ipv4.tcp_tw_recycle");
        assert_eq!(spec_string(&k, optional), "-net.ipv4.tcp_tw_recycle");
        let (k2, optional) = parse_spec("net/ipv4/tcp_tw_recycle").unwrap();
        assert!(!optional);
        assert_eq!(k, k2);
        assert!(matches!(
            SysctlKey::parse("-net.ipv4.x"),
            Err(KeyError::OptionalMarker { .. })
        ));
        assert!(parse_spec("--net.ipv4.x").is_err());
        assert!(parse_spec("-").is_err());
        let max = format!("-vm.{}", "a".repeat(KEY_MAX_LEN - 3));
        assert!(parse_spec(&max).is_ok(), "the marker does not count");
    }
}
