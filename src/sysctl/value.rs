//! Sysctl values: normalisation for comparison, and the few checks made before a write.
//!
//! The kernel prints vectors with tabs (`1024\t65000`) while people write spaces
//! (`"1024 65000"`); both normalise to `1024 65000`. Nothing else is interpreted for comparison:
//! `030` and `30` stay different (the kernel reads `030` as octal), so a value the kernel prints
//! differently from how it was written shows up as a read-back mismatch rather than being
//! guessed equal.
//!
//! The rules that judge a number (one-way and weakening values, `policy`) must see the number
//! the kernel will store, not the one a reader sees: [`kernel_integer`] parses as the kernel's
//! integer handlers do, octal and hex included. Values of keys under such a rule must also be
//! written in plain decimal ([`DECIMAL_PATTERN`]), at admission and in the agent alike, so that
//! what a reviewer reads is what the kernel stores.

/// Splits on ASCII whitespace and joins with single spaces (trims both ends).
pub fn normalize(value: &str) -> String {
    value.split_ascii_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether two values are equal after [`normalize`].
pub fn same(a: &str, b: &str) -> bool {
    a.split_ascii_whitespace().eq(b.split_ascii_whitespace())
}

/// Plain decimal integer, optionally surrounded by spaces or tabs: no sign other than `-`, no
/// leading zero (the kernel would read octal), at most 18 digits (so CEL's `int()` cannot
/// overflow). Valid in the `regex` crate and in Kubernetes CEL (RE2); the CRD and the admission
/// policy are generated from it.
pub const DECIMAL_PATTERN: &str = r"^[ \t]*(?:0|-?[1-9][0-9]{0,17})[ \t]*$";

/// Whether `value` is written as [`DECIMAL_PATTERN`] says.
pub fn is_plain_decimal(value: &str) -> bool {
    // Checked by hand rather than by compiling the pattern each time; a test holds the two equal.
    let t = value.trim_matches([' ', '\t']);
    let digits = t.strip_prefix('-').unwrap_or(t);
    let plain = !digits.is_empty()
        && digits.len() <= 18
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    plain && !(t.starts_with('-') && digits == "0")
}

/// The integer the kernel stores when `value` is written to a single-integer sysctl, or `None`
/// when the kernel refuses it. Mirrors `proc_get_long` (kernel/sysctl.c) as used by
/// `proc_dointvec*` and `proc_doulongvec*`:
/// * leading whitespace is skipped;
/// * an optional `-`; a `+` is accepted here too, as the `kstrto*` based handlers take it
///   (judging a value the kernel would refuse anyway is harmless);
/// * the base is auto-detected (`strtoul(.., 0)`): `0x`/`0X` and a hex digit is hex, any other
///   leading `0` octal (`0100000` is 32768), else decimal;
/// * the number must end the value or be followed by whitespace; the rest is not parsed, and
///   for a single-integer key the kernel keeps the first number (`"3 0"` stores 3);
/// * a magnitude beyond 64 bits is refused (the handlers' range checks are left to the kernel).
pub fn kernel_integer(value: &str) -> Option<i128> {
    let s = value.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b');
    let (negative, s) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = match s.as_bytes() {
        [b'0', b'x' | b'X', h, ..] if h.is_ascii_hexdigit() => (16, &s[2..]),
        [b'0', ..] => (8, s),
        [d, ..] if d.is_ascii_digit() => (10, s),
        _ => return None,
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let (number, rest) = digits.split_at(end);
    if !rest.is_empty() && !rest.starts_with([' ', '\t', '\n']) {
        return None;
    }
    let magnitude = u64::from_str_radix(number, radix).ok()?;
    Some(if negative {
        -i128::from(magnitude)
    } else {
        i128::from(magnitude)
    })
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

    /// The forms of issue 17 item 1, as the kernel reads them (checked against the real kernel in
    /// `sysctl_kernel::kernel_reads_numbers_as_nodetune_judges_them`).
    #[test]
    fn kernel_integer_reads_octal_hex_and_spaces() {
        for (value, want) in [
            ("0100000", Some(32768)),
            ("0x3", Some(3)),
            ("0X1f", Some(31)),
            (" 3", Some(3)),
            ("\t3\t", Some(3)),
            ("+3", Some(3)),
            ("-3", Some(-3)),
            ("-0", Some(0)),
            ("00", Some(0)),
            ("3 0", Some(3)),
            ("18446744073709551615", Some(18446744073709551615)),
            ("08", None),
            ("0x", None),
            ("0xg", None),
            ("3x", None),
            ("1e3", None),
            ("0x 3", None),
            ("- 3", None),
            ("", None),
            ("lots", None),
            ("18446744073709551616", None),
        ] {
            assert_eq!(kernel_integer(value), want, "{value:?}");
        }
    }

    #[test]
    fn plain_decimal_agrees_with_its_pattern() {
        let re = regex::Regex::new(DECIMAL_PATTERN).unwrap();
        for v in [
            "0",
            "3",
            "-3",
            " 3 ",
            "\t65536",
            "65536",
            "0100000",
            "0x3",
            "+3",
            "-0",
            "00",
            "3 0",
            "",
            " ",
            "-",
            "1e3",
            "999999999999999999",
            "1000000000000000000",
            "3\n",
            "\u{a0}3",
        ] {
            assert_eq!(is_plain_decimal(v), re.is_match(v), "{v:?}");
        }
        assert!(is_plain_decimal(" 65536\t"));
        assert!(!is_plain_decimal("0100000"));
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
