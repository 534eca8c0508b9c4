//! Sysctl values: normalisation for comparison, and the few checks made before a write.
//!
//! The kernel prints vectors with tabs (`1024\t65000`) while people write spaces
//! (`"1024 65000"`); both normalise to `1024 65000`. Nothing else is interpreted: `030` and `30`
//! stay different (the kernel reads `030` as octal), so a value the kernel prints differently from
//! how it was written shows up as a read-back mismatch rather than being guessed equal.

/// Splits on ASCII whitespace and joins with single spaces (trims both ends).
pub fn normalize(value: &str) -> String {
    value.split_ascii_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether two values are equal after [`normalize`].
pub fn same(a: &str, b: &str) -> bool {
    a.split_ascii_whitespace().eq(b.split_ascii_whitespace())
}

/// Why a value is refused before it reaches the kernel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A control character other than tab (C0, DEL or C1): NUL would truncate the value, a line
    /// break would make one write look like several, the rest are never meaningful in a sysctl.
    #[error("value contains a newline or control character (only tab is allowed)")]
    ControlChar,
    /// Empty or only whitespace.
    #[error("value is empty or blank")]
    Blank,
}

/// Rejects values that are blank or contain control characters other than tab (the same rule
/// as the CRD's validation of `spec.sysctls` values).
pub fn check(value: &str) -> Result<(), ValueError> {
    // C1 controls (U+0080..U+009F) too: U+009B is a terminal escape (CSI) on its own, and YAML
    // refuses them raw, so a profile holding one could not even be written back as YAML.
    if value.chars().any(|c| c != '\t' && c.is_control()) {
        Err(ValueError::ControlChar)
    } else if value.trim_ascii().is_empty() {
        Err(ValueError::Blank)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        assert_eq!(normalize("1024\t65000"), "1024 65000");
        assert_eq!(normalize("  1024   65000 \n"), "1024 65000");
        assert_eq!(normalize("30\n"), "30");
        assert_eq!(normalize(""), "");
        assert_eq!(normalize("cubic"), "cubic");
        assert!(same("4096\t131072\t6291456", "4096 131072 6291456"));
        assert!(same("30\n", "30"));
        assert!(!same("030", "30"));
        assert!(!same("1024 65000", "1024 65001"));
    }

    #[test]
    fn value_checks() {
        assert!(check("1024 65000").is_ok());
        assert!(check("1024\t65000").is_ok());
        assert_eq!(check(""), Err(ValueError::Blank));
        assert_eq!(check(" \t "), Err(ValueError::Blank));
        assert_eq!(check("a\x1bb"), Err(ValueError::ControlChar));
        assert_eq!(check("a\x7f"), Err(ValueError::ControlChar));
        assert!(check("1 2\t3").is_ok());
        assert_eq!(check("1\n2"), Err(ValueError::ControlChar));
        assert_eq!(check("1\r"), Err(ValueError::ControlChar));
        assert_eq!(check("a\0b"), Err(ValueError::ControlChar));
        // C1 controls (found by fuzzing convert: YAML refuses them raw)
        assert_eq!(check("a\u{91}b"), Err(ValueError::ControlChar));
        assert_eq!(check("\u{9b}31m"), Err(ValueError::ControlChar));
        assert!(check("caf\u{e9}").is_ok());
    }
}
