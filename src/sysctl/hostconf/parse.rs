//! One sysctl.d file's lines, as systemd-sysctl reads them (sysctl.d(5); `parse_file()` in
//! systemd's `src/sysctl/sysctl.c`): whitespace stripped, empty lines and lines starting with
//! `#` or `;` skipped, `key = value` split at the first `=`, a leading `-` marking "ignore
//! failure", and a `-key` line without `=` a "negative match" that keeps globs off that key.
//! The key's first separator decides its form (`.` → dots and slashes swap, `/` → as is).
//!
//! `convert::parse_sysctl_conf` is not reused: it is made to turn a file into a profile, so it
//! drops globs and negative matches, applies the cluster policy and keeps no origin per line,
//! all of which matter here.
use super::super::key::{KEY_MAX_LEN, SysctlKey};

/// One assignment (or negative match) of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number.
    pub line: u32,
    /// The key or glob in slash form (`net/ipv4/conf/*/rp_filter`).
    pub key: String,
    /// `None` for a negative match (`-key` without `=`).
    pub value: Option<String>,
    /// Written with a leading `-`.
    pub ignore_failure: bool,
    /// The key contains `*`, `?` or `[` (systemd's `string_is_glob`).
    pub glob: bool,
}

/// Parses `text` (the file `file`, for messages); lines that cannot be used go to `warnings`.
pub fn parse(text: &str, file: &str, warnings: &mut Vec<String>) -> Vec<Line> {
    let mut lines = Vec::new();
    for (idx, raw) in text.split('\n').enumerate() {
        let line = u32::try_from(idx + 1).unwrap_or(u32::MAX);
        match parse_line(raw) {
            Ok(None) => {}
            Ok(Some((key, value, ignore_failure))) => {
                let glob = key.contains(['*', '?', '[']);
                lines.push(Line {
                    line,
                    key,
                    value,
                    ignore_failure,
                    glob,
                });
            }
            Err(why) => warnings.push(format!("host config: {file}:{line} ignored: {why}")),
        }
    }
    lines
}

type Parsed = (String, Option<String>, bool);

fn parse_line(raw: &str) -> Result<Option<Parsed>, String> {
    // Control characters (but tabs) could forge log lines or report text: refused.
    if raw
        .chars()
        .any(|c| c.is_control() && c != '\t' && c != '\r')
    {
        return Err("it contains control characters".into());
    }
    let p = raw.trim();
    if p.is_empty() || p.starts_with(['#', ';']) {
        return Ok(None);
    }
    let (key, value, ignore_failure) = match p.split_once('=') {
        Some((k, v)) => match k.strip_prefix('-') {
            Some(k) => (k, Some(v.trim().to_owned()), true),
            None => (k, Some(v.trim().to_owned()), false),
        },
        None => match p.strip_prefix('-') {
            Some(k) => (k, None, false),
            None => return Err("not an assignment".into()),
        },
    };
    let key = normalize(key.trim())?;
    Ok(Some((key, value, ignore_failure)))
}

/// The key in slash form, checked: a plain key by nodetune's key grammar, a glob by the same
/// grammar with `*`, `?`, `[`, `]` and `!` allowed.
fn normalize(key: &str) -> Result<String, String> {
    if key.len() > KEY_MAX_LEN {
        return Err(format!("the key is longer than {KEY_MAX_LEN} bytes"));
    }
    let slash = crate::sysctl::key::to_slash_form(key);
    if !slash.contains(['*', '?', '[']) {
        return SysctlKey::parse(&slash)
            .map(|k| k.path().to_owned())
            .map_err(|e| e.to_string());
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_-.:@+/*?[]!".contains(c);
    if let Some(c) = slash.chars().find(|&c| !ok_char(c)) {
        return Err(format!("the glob {key:?} contains {c:?}"));
    }
    if slash.split('/').any(|part| part.is_empty() || part == "..") {
        return Err(format!("the glob {key:?} has an empty or `..` component"));
    }
    Ok(slash)
}

/// Whether the glob `pattern` (slash form) matches the key path `path` as glob(3) would match
/// the file under /proc/sys: `*` and `?` never match `/`, `[...]` is a class (`[!...]` negated).
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    glob_regex(pattern).is_some_and(|re| re.is_match(path))
}

/// The regular expression of a glob (see [`glob_matches`]); `None` for an unclosed `[`.
pub fn glob_regex(pattern: &str) -> Option<regex::Regex> {
    let mut re = String::from("^");
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '[' => {
                let mut class = String::from("[");
                if chars.peek() == Some(&'!') {
                    chars.next();
                    class.push('^');
                }
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == ']' {
                        closed = true;
                        break;
                    }
                    if c != '-' {
                        class.push_str(&regex::escape(&c.to_string()));
                    } else {
                        class.push('-');
                    }
                }
                if !closed {
                    return None;
                }
                class.push(']');
                re.push_str(&class);
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_systemd_reads_them() {
        let mut w = Vec::new();
        let text = "# c\n; c\n\n  net.ipv4.tcp_fin_timeout = 30 \n-net/ipv4/conf/eth0.100/rp_filter=2\n\
                    -net.ipv4.conf.lo.rp_filter\nnonsense\nnet.ipv4.conf.*.rp_filter = 1\nkernel.x=\u{1b}[31m\n";
        let lines = parse(text, "/etc/sysctl.d/a.conf", &mut w);
        let got: Vec<(u32, &str, Option<&str>, bool, bool)> = lines
            .iter()
            .map(|l| {
                (
                    l.line,
                    l.key.as_str(),
                    l.value.as_deref(),
                    l.ignore_failure,
                    l.glob,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (4, "net/ipv4/tcp_fin_timeout", Some("30"), false, false),
                (
                    5,
                    "net/ipv4/conf/eth0.100/rp_filter",
                    Some("2"),
                    true,
                    false
                ),
                (6, "net/ipv4/conf/lo/rp_filter", None, false, false),
                (8, "net/ipv4/conf/*/rp_filter", Some("1"), false, true),
            ]
        );
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("a.conf:7") && w[0].contains("not an assignment"),
            "{w:?}"
        );
        assert!(w[1].contains(":9") && w[1].contains("control"), "{w:?}");
    }

    #[test]
    fn globs_do_not_cross_components() {
        assert!(glob_matches(
            "net/ipv4/conf/*/rp_filter",
            "net/ipv4/conf/eth0.100/rp_filter"
        ));
        assert!(!glob_matches(
            "net/ipv4/*/rp_filter",
            "net/ipv4/conf/all/rp_filter"
        ));
        assert!(glob_matches(
            "net/ipv4/conf/eth[0-9]/rp_filter",
            "net/ipv4/conf/eth3/rp_filter"
        ));
        assert!(!glob_matches(
            "net/ipv4/conf/[!e]*/rp_filter",
            "net/ipv4/conf/eth3/rp_filter"
        ));
        assert!(glob_matches(
            "net/ipv4/conf/?o/rp_filter",
            "net/ipv4/conf/lo/rp_filter"
        ));
        assert!(!glob_matches(
            "net/ipv4/conf/[lo/rp_filter",
            "net/ipv4/conf/lo/rp_filter"
        ));
    }
}
