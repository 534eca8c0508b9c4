//! Durations as flags take them: `30s`, `5m`, `1h`, `250ms`, or plain seconds; [`parse`] reads
//! them and [`format`] writes a spelling [`parse`] reads back to the same value.
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: use a number with ms, s, m or h (e.g. 30s)")]
pub struct DurationError(pub String);

pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(text.to_string());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
        _ => return Err(err()),
    };
    Ok(d)
}

/// Seconds (`30s`, `300s`), or milliseconds when not whole (`1500ms`): what [`parse`] reads
/// back to the same value (durations are kept to the millisecond).
pub fn format(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "1d", "-1s", "1.5s", "99999999999999999999h"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn format_reads_back() {
        for d in ["30s", "300s", "1500ms", "0s", "90s", "5m", "1h", "250ms"] {
            let parsed = parse(d).expect("parse");
            assert_eq!(parse(&format(parsed)), Ok(parsed), "{d}");
        }
        assert_eq!(format(Duration::from_secs(300)), "300s");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    }
}
