//! The one duration grammar of stepmesh: every duration flag (clap
//! `value_parser = parse_duration`), every policy field (`maxAge`,
//! `leeway`, `jwks.refresh`, ...), the injector's configuration and its
//! per-pod annotations take the same text.
//!
//! ```text
//! duration := "0" | term+            surrounding whitespace is ignored
//! term     := digits ["." digits] unit
//! unit     := "ms" | "s" | "m" | "h" | "d"
//! ```
//!
//! So `500ms`, `1.5s`, `10m`, `1h`, `1h30m`, `24h`, `7d`. A bare number
//! other than `0` is refused (is `30` seconds or minutes?), as are negative
//! values, spaces inside, and anything longer than [`MAX`].
//!
//! Ours rather than `humantime::parse_duration`: humantime reads `M` as
//! months next to `m` minutes and `y` as 365.25 days, takes spaces and a
//! dozen spellings (`2 hours 5min`) we would then document everywhere, and
//! what it accepts has changed between releases (fractions such as `1.5s`
//! only in recent ones), so our grammar would move with a dependency update.
//! This is one small function with exact integer arithmetic.

use std::time::Duration;

/// The longest duration accepted: 100 years (`36500d`). Far beyond any
/// useful timeout or lifetime, and small enough that adding it to any
/// `Instant` or `SystemTime` cannot overflow.
pub const MAX: Duration = Duration::from_secs(36_500 * 86_400);

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Fraction digits read; the rest cannot change a whole nanosecond of a day.
const MAX_FRACTION_DIGITS: u32 = 18;
const EXPECTED: &str = "expected a duration like 500ms, 1.5s, 10m, 1h30m or 7d";

/// An idle timeout: a duration above zero (zero would close every
/// connection at its first poll).
pub fn parse_idle(s: &str) -> Result<Duration, String> {
    let idle = parse_duration(s)?;
    if idle.is_zero() {
        return Err("above 0: a connection would be closed before its first byte".into());
    }
    Ok(idle)
}

/// Parses a duration in the grammar of this module. The error is one line
/// without the input (clap, the policy loader and the injector each say
/// where the value came from).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err("a duration cannot be negative".into());
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("missing unit (ms, s, m, h or d), as in 30s".into());
    }
    let max = MAX.as_nanos();
    let too_long = || format!("longer than the maximum, {}d", MAX.as_secs() / 86_400);
    let mut total: u128 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return Err(EXPECTED.into());
    }
    while !rest.is_empty() {
        let (whole, after) = split_digits(rest);
        if whole.is_empty() {
            return Err(EXPECTED.into());
        }
        let (fraction, after) = match after.strip_prefix('.') {
            Some(f) => {
                let (digits, after) = split_digits(f);
                if digits.is_empty() {
                    return Err(EXPECTED.into());
                }
                (digits, after)
            }
            None => ("", after),
        };
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ms" => 1_000_000,
            "s" => NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "h" => 3_600 * NANOS_PER_SEC,
            "d" => 86_400 * NANOS_PER_SEC,
            "" => return Err("missing unit (ms, s, m, h or d), as in 30s".into()),
            other if other.contains(char::is_whitespace) || other.starts_with('.') => {
                return Err(EXPECTED.into())
            }
            other => return Err(format!("unknown unit {other:?} (ms, s, m, h or d)")),
        };
        // Digits only: `parse` fails only when the number is too large.
        let whole: u128 = whole.parse().map_err(|_| too_long())?;
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(too_long)?;
        let kept = &fraction[..fraction.len().min(MAX_FRACTION_DIGITS as usize)];
        if !kept.is_empty() {
            let numerator: u128 = kept.parse().map_err(|_| EXPECTED.to_owned())?;
            // numerator < 10^18 and unit_nanos < 10^14: no overflow in u128.
            nanos += numerator * unit_nanos / 10u128.pow(kept.len() as u32);
        }
        total = total.checked_add(nanos).ok_or_else(too_long)?;
        if total > max {
            return Err(too_long());
        }
        rest = after;
    }
    // total <= MAX, whose seconds fit in u64.
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| too_long())?;
    Ok(Duration::new(secs, (total % NANOS_PER_SEC) as u32))
}

/// `d` in the grammar of [`parse_duration`], exactly: `5s`, `90s`,
/// `0.25s`, `0s`.
pub fn format_duration(d: Duration) -> String {
    match d.subsec_nanos() {
        0 => format!("{}s", d.as_secs()),
        nanos => {
            let fraction = format!("{nanos:09}");
            format!("{}.{}s", d.as_secs(), fraction.trim_end_matches('0'))
        }
    }
}

/// For `#[serde(deserialize_with = ...)]` on an `Option<String>` duration
/// field, parsed with [`parse_duration`] by its owner so that errors name
/// the field: a string, or a YAML number as its text — so `0` is taken and
/// `30` is refused for its missing unit, as on the command line.
pub fn opt_text_or_number<'de, D>(de: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    de.deserialize_option(OptTextVisitor)
}

struct OptTextVisitor;

impl<'de> serde::de::Visitor<'de> for OptTextVisitor {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a duration like 500ms, 1.5s, 10m, 1h30m or 7d")
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }
}

fn split_digits(s: &str) -> (&str, &str) {
    s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn accepted() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("500ms", ms(500)),
            ("1.5s", ms(1500)),
            ("0.25s", ms(250)),
            ("1.5ms", Duration::from_micros(1500)),
            ("10m", ms(600_000)),
            ("1h", ms(3_600_000)),
            ("1h30m", ms(5_400_000)),
            ("1.5h", ms(5_400_000)),
            ("24h", ms(86_400_000)),
            ("7d", ms(604_800_000)),
            ("1m0.5s", ms(60_500)),
            (" 30s ", ms(30_000)),
            ("36500d", MAX),
            ("0.000000001s", Duration::from_nanos(1)),
            ("0.0000000019s", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn refused_with_a_reason() {
        for (text, reason) in [
            ("", "expected a duration"),
            ("s", "expected a duration"),
            ("xyz", "expected a duration"),
            ("1.s", "expected a duration"),
            (".5s", "expected a duration"),
            ("5 m", "expected a duration"),
            ("1h 30m", "expected a duration"),
            ("30", "missing unit"),
            ("1h30", "missing unit"),
            ("-5s", "negative"),
            ("1y", "unknown unit \"y\""),
            ("5 parsecs", "expected a duration"),
            ("10H", "unknown unit"),
            ("36500d1ms", "longer than the maximum, 36500d"),
            ("99999999999999999999999999999999999999999h", "longer"),
            ("18446744073709551616s", "longer"),
        ] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(reason), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{text:?}: {err}");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(5),
            Duration::from_millis(1500),
            Duration::from_nanos(1),
            Duration::from_millis(250),
            MAX,
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
        assert_eq!(format_duration(Duration::from_millis(250)), "0.25s");
    }
}
