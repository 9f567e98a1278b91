//! Durations (`30s`, `5m`, `1h30m`, `2 days`) and byte sizes (`2GiB`, `500MB`, `512M`) as written
//! in settings. Parsed here, simply, rather than with another crate: the grammar is small and the
//! error messages can then say exactly which units are accepted.
//!
//! Sizes follow systemd's reading: `K`, `M`, `G`, `T` and the IEC `KiB`...`TiB` are powers of
//! 1024; `KB`, `MB`, `GB`, `TB` are powers of 1000.

use std::time::Duration;

const DURATION_UNITS: &str = "ms, s, m, h, d (or sec, min, hour, day and their plurals)";
const SIZE_UNITS: &str = "B, K/KiB, M/MiB, G/GiB, T/TiB (1024) or KB, MB, GB, TB (1000)";

/// Splits `"1h30m"` / `"1 h 30 min"` into `(number, unit)` pairs.
fn pieces(s: &str) -> Result<Vec<(u64, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("is empty".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{s:?}: expected a number at {rest:?}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        out.push((n, rest[..unit_len].to_string()));
        rest = rest[unit_len..].trim_start();
    }
    Ok(out)
}

/// Parses a duration. A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    for (n, unit) in pieces(s)? {
        let per: Duration = match unit.to_ascii_lowercase().as_str() {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => Duration::from_secs(1),
            "ms" | "msec" | "millis" | "milliseconds" => Duration::from_millis(1),
            "m" | "min" | "mins" | "minute" | "minutes" => Duration::from_secs(60),
            "h" | "hr" | "hrs" | "hour" | "hours" => Duration::from_secs(3600),
            "d" | "day" | "days" => Duration::from_secs(86400),
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use {DURATION_UNITS})")),
        };
        let part = u32::try_from(n)
            .ok()
            .and_then(|n| per.checked_mul(n))
            .ok_or_else(|| format!("{s:?} is too long"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("{s:?} is too long"))?;
    }
    Ok(total)
}

/// Parses a byte size. A bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let p = pieces(s)?;
    let [(n, unit)] = p.as_slice() else {
        return Err(format!("{s:?}: expected one number and one unit, e.g. \"2GiB\""));
    };
    let mul: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use {SIZE_UNITS})")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))
}

/// `90s` -> "1m30s": durations as a person would write them, for `--check-config`.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    let ms = d.subsec_millis();
    if secs == 0 && ms != 0 {
        return format!("{ms}ms");
    }
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    if ms != 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

/// `2147483648` -> "2GiB" when exact, else the number of bytes.
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n != 0 && n % (1u64 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration(" 1 hour 2 min ").unwrap(),
            Duration::from_secs(3720)
        );
        assert_eq!(parse_duration("2 days").unwrap(), Duration::from_secs(172800));
        assert_eq!(parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("15 Minutes").unwrap(), Duration::from_secs(900));
        for bad in ["", "m", "5x", "-5s", "1.5h", "5m garbage", "99999999999d"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse_duration("5 weeks")
            .unwrap_err()
            .contains("unknown unit \"weeks\""));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("10kb").unwrap(), 10_000);
        for bad in ["", "GiB", "2 XB", "1G 2M", "-1", "99999999999TiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for s in ["1h30m", "15m", "1d2h", "45s", "250ms"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert_eq!(format_size(parse_size("2GiB").unwrap()), "2GiB");
        assert_eq!(format_size(1000), "1000B");
    }
}
