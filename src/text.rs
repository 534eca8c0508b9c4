//! Bounded text for statuses, conditions and Events: whatever the cluster size, a message stays
//! within a fixed number of bytes and says how much it left out.
use std::cmp::Reverse;
use std::collections::BTreeMap;

/// Cut `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// `parts` joined by "; ", stopping before `max` bytes with "and N more".
pub fn bounded_list(parts: &[String], max: usize) -> String {
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        let sep = if out.is_empty() { "" } else { "; " };
        let rest = parts.len() - i - 1;
        let tail = if rest > 0 {
            format!("; and {rest} more").len()
        } else {
            0
        };
        if out.len() + sep.len() + part.len() + tail > max {
            out.push_str(&format!("{sep}and {} more", parts.len() - i));
            return truncate(out, max);
        }
        out.push_str(sep);
        out.push_str(part);
    }
    out
}

/// "1 node" / "N nodes".
pub fn nodes_word(n: usize) -> String {
    if n == 1 {
        "1 node".into()
    } else {
        format!("{n} nodes")
    }
}

/// Group counts into "what on N nodes" parts, most frequent first (ties keep key order).
pub fn counted<K: Ord>(counts: BTreeMap<K, usize>, label: impl Fn(&K) -> String) -> Vec<String> {
    let mut v: Vec<(K, usize)> = counts.into_iter().collect();
    v.sort_by_key(|(_, n)| Reverse(*n));
    v.iter()
        .map(|(k, n)| format!("{} on {}", label(k), nodes_word(*n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(10);
        let t = truncate(s, 7);
        assert!(t.len() <= 7, "{t}");
        assert!(t.ends_with('…'));
        assert_eq!(truncate("short".into(), 7), "short");
    }

    #[test]
    fn bounded_list_says_how_many_it_left_out() {
        let parts: Vec<String> = (0..100)
            .map(|i| format!("net.ipv4.key_{i}: Invalid"))
            .collect();
        let s = bounded_list(&parts, 120);
        assert!(s.len() <= 120, "{s}");
        assert!(s.starts_with("net.ipv4.key_0: Invalid; "), "{s}");
        let left: usize = s
            .rsplit("and ")
            .next()
            .and_then(|t| t.trim_end_matches(" more").parse().ok())
            .expect("and N more");
        let shown = s.matches(": Invalid").count();
        assert_eq!(shown + left, 100, "{s}");
        assert_eq!(
            bounded_list(&parts[..2], 1000),
            "net.ipv4.key_0: Invalid; net.ipv4.key_1: Invalid"
        );
    }

    #[test]
    fn counted_sorts_by_frequency() {
        let c: BTreeMap<&str, usize> = [("a", 1), ("b", 3), ("c", 1)].into();
        assert_eq!(
            counted(c, |k| k.to_string()),
            vec!["b on 3 nodes", "a on 1 node", "c on 1 node"]
        );
    }
}
