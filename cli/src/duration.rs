//! Human-readable durations in the config file ("500ms", "1s", "2m", "1m30s", "30d") and their
//! display.
//!
//! Small enough to own rather than pull in a crate: a sequence of `<number><unit>` terms, where the
//! number may have a decimal fraction. A bare number is refused on purpose: "cache_ttl = 1" is
//! ambiguous between seconds and milliseconds, and guessing wrong costs a slow or stale drive.

use std::time::Duration;

const UNITS: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("sec", 1_000_000_000),
    ("m", 60_000_000_000),
    ("min", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

/// Parses a duration such as "500ms", "1.5s", "2m", "1m30s" or "30d" (a day is 24 hours).
pub fn parse(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {text:?}: expected a number with a unit, e.g. \"500ms\", \"1s\", \"2m\""
        )
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total_nanos: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        if num.is_empty() || unit.is_empty() {
            return Err(bad());
        }
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(bad)?;
        total_nanos = total_nanos
            .checked_add(scale_number(num, scale).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        rest = after.trim_start();
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| bad())?;
    // The remainder is below 1e9, so it always fits.
    let nanos = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// `num` (digits with at most one '.') times `scale` nanoseconds, exactly, without floats.
fn scale_number(num: &str, scale: u64) -> Option<u128> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut total = int.checked_mul(u128::from(scale))?;
    // Each fractional digit is worth scale/10^k; digits below one nanosecond are dropped.
    let mut place = u128::from(scale);
    for digit in frac.chars() {
        let d = u128::from(digit.to_digit(10)?);
        place /= 10;
        total = total.checked_add(d * place)?;
    }
    Some(total)
}

/// Formats a duration the way the config file spells it (round-trips through [`parse`]).
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos % 1_000_000_000 == 0 {
        let secs = d.as_secs();
        return match secs {
            s if s % 86_400 == 0 => format!("{}d", s / 86_400),
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        };
    }
    if nanos % 1_000_000 == 0 {
        return format!("{}ms", nanos / 1_000_000);
    }
    if nanos % 1_000 == 0 {
        return format!("{}us", nanos / 1_000);
    }
    format!("{nanos}ns")
}

/// Formats an uptime for people: "3d 4h", "1h 2m 3s", "45s".
pub fn format_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m {s}s"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("1s", Duration::from_secs(1)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1m 30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
            (".25s", Duration::from_millis(250)),
            ("0s", Duration::ZERO),
            ("250us", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            (" 10 s ", Duration::from_secs(10)),
            ("30d", Duration::from_secs(30 * 86_400)),
            ("1d12h", Duration::from_secs(36 * 3600)),
            ("0.5d", Duration::from_secs(12 * 3600)),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refuses_ambiguous_or_malformed_input() {
        for text in [
            "", "1", "s", "1x", "1.2.3s", "-1s", "1s2", "ms500", ".s", "1e3s", "1day", "d",
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains("invalid duration"), "{err}");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in [
            "0s", "1s", "2m", "1h", "500ms", "250us", "7ns", "90s", "30d", "36h",
        ] {
            let d = parse(text).expect(text);
            assert_eq!(parse(&format(d)), Ok(d), "{text}");
        }
        assert_eq!(format(Duration::from_secs(90)), "90s");
        assert_eq!(format(Duration::from_secs(30 * 86_400)), "30d");
        assert_eq!(format(Duration::from_secs(36 * 3600)), "36h");
    }

    #[test]
    fn uptime_is_compact() {
        assert_eq!(format_uptime(5), "5s");
        assert_eq!(format_uptime(65), "1m 5s");
        assert_eq!(format_uptime(3723), "1h 2m 3s");
        assert_eq!(format_uptime(90061), "1d 1h 1m");
    }
}
