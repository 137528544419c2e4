//! Comparable forms of `to_jsonb`-rendered values: exact decimals, instants, code point text.

use std::str::FromStr;

use bigdecimal::BigDecimal;
use serde_json::Value;

use super::Kind;

/// A comparable value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Key {
    Number(NumberKey),
    Text(String),
    Bool(bool),
    Time(TimeKey),
}

/// PostgreSQL's numeric order: -Infinity < numbers < Infinity < NaN (and NaN = NaN).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum NumberKey {
    NegInfinity,
    Finite(BigDecimal),
    Infinity,
    NaN,
}

/// Dates and times, with PostgreSQL's infinities: an instant in microseconds from
/// 1970-01-01 (UTC for `timestamptz`), over the whole range PostgreSQL stores (4713 BC to
/// 5874897 AD), which is wider than chrono's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimeKey {
    NegInfinity,
    At(i128),
    Infinity,
}

const MICROS_PER_DAY: i128 = 86_400_000_000;

/// Days from 1970-01-01 to a proleptic Gregorian date (astronomical year: 1 BC is 0).
fn days_from_civil(year: i64, month: u32, day: u32) -> i128 {
    let y = i128::from(year) - i128::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i128::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i128::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` (any number of year digits), days from 1970-01-01.
fn parse_date(text: &str, bc: bool) -> Option<i128> {
    let mut parts = text.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    if year < 0 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = if bc { 1 - year } else { year };
    Some(days_from_civil(year, month, day))
}

/// `HH:MM:SS[.ffffff]` (24:00:00 included, as PostgreSQL allows), microseconds.
pub(super) fn parse_clock(text: &str) -> Option<i128> {
    let (hms, fraction) = text.split_once('.').unwrap_or((text, ""));
    let mut parts = hms.splitn(3, ':');
    let h: i128 = parts.next()?.parse().ok()?;
    let m: i128 = parts.next()?.parse().ok()?;
    let s: i128 = parts.next()?.parse().ok()?;
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i128 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}").parse().ok()?
    };
    // Checked: PostgreSQL renders small numbers here, but a value that is not its rendering
    // must not overflow (a panic in a debug build, a wrong order in a release one).
    h.checked_mul(60)?
        .checked_add(m)?
        .checked_mul(60)?
        .checked_add(s)?
        .checked_mul(1_000_000)?
        .checked_add(micros)
}

/// `+HH[:MM[:SS]]` / `-…`, seconds east of UTC.
fn parse_offset(text: &str) -> Option<i128> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let mut total = 0i128;
    let mut unit = 3600;
    for part in rest.split(':') {
        if unit == 0 {
            return None;
        }
        let n: i128 = part.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        unit /= 60;
    }
    Some(sign * total)
}

/// A `to_json`-rendered date, timestamp or timestamptz (`…T…[+offset][ BC]`) as an instant.
fn parse_instant(text: &str, kind: Kind) -> Option<TimeKey> {
    match text {
        "infinity" => return Some(TimeKey::Infinity),
        "-infinity" => return Some(TimeKey::NegInfinity),
        _ => {}
    }
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    if kind == Kind::Date {
        return parse_date(text, bc).map(|d| TimeKey::At(d * MICROS_PER_DAY));
    }
    let (date, time) = text.split_once('T')?;
    let days = parse_date(date, bc)?;
    let (clock, offset) = if kind == Kind::TimestampTz {
        let at = time.find(['+', '-'])?;
        (&time[..at], parse_offset(&time[at..])?)
    } else {
        (time, 0)
    };
    let micros = days
        .checked_mul(MICROS_PER_DAY)?
        .checked_add(parse_clock(clock)?)?
        .checked_sub(offset.checked_mul(1_000_000)?)?;
    Some(TimeKey::At(micros))
}

/// The comparable form of a `to_jsonb`-rendered value of a column of `kind`.
pub(super) fn key_of(kind: Kind, value: &Value) -> Option<Key> {
    match (kind, value) {
        (Kind::Number, Value::Number(n)) => BigDecimal::from_str(&n.to_string())
            .ok()
            .map(|d| Key::Number(NumberKey::Finite(d))),
        (Kind::Number, Value::String(s)) => match s.as_str() {
            "NaN" => Some(Key::Number(NumberKey::NaN)),
            "Infinity" => Some(Key::Number(NumberKey::Infinity)),
            "-Infinity" => Some(Key::Number(NumberKey::NegInfinity)),
            _ => BigDecimal::from_str(s)
                .ok()
                .map(|d| Key::Number(NumberKey::Finite(d))),
        },
        (Kind::Bool, Value::Bool(b)) => Some(Key::Bool(*b)),
        (Kind::PaddedText, Value::String(s)) => Some(Key::Text(s.trim_end_matches(' ').to_owned())),
        (Kind::Text | Kind::Uuid | Kind::EqualityOnly, Value::String(s)) => {
            Some(Key::Text(s.clone()))
        }
        (Kind::TimestampTz | Kind::Timestamp | Kind::Date, Value::String(s)) => {
            parse_instant(s, kind).map(Key::Time)
        }
        (Kind::Time, Value::String(s)) => parse_clock(s).map(|t| Key::Time(TimeKey::At(t))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_order_like_postgres() {
        let n = |v: Value| key_of(Kind::Number, &v).unwrap();
        assert!(n(json!(2)) < n(json!(10)));
        assert_eq!(n(json!(1.0)), n(json!(1)));
        assert!(n(json!("Infinity")) < n(json!("NaN")));
        assert!(n(json!("-Infinity")) < n(json!(-1e300)));
        let t = |v: &str| key_of(Kind::TimestampTz, &json!(v)).unwrap();
        // Out of any range PostgreSQL renders: not a value, rather than an overflow.
        for (kind, text) in [
            (Kind::Time, "99999999999999999999999999999999999:00:00"),
            (
                Kind::Timestamp,
                "2026-01-01T99999999999999999999999999999999:00:00",
            ),
            (
                Kind::TimestampTz,
                "2026-01-01T00:00:00+99999999999999999999999999999999",
            ),
            (
                Kind::TimestampTz,
                "2026-01-01T00:00:00+00:99999999999999999999999999999999",
            ),
            (Kind::Date, "9223372036854775807-12-31"),
        ] {
            let key = key_of(kind, &json!(text));
            assert!(kind == Kind::Date || key.is_none(), "{text}");
        }
        assert_eq!(
            t("2026-01-01T05:00:00+05:00"),
            t("2026-01-01T00:00:00+00:00")
        );
        assert!(t("-infinity") < t("2026-01-01T00:00:00+00:00"));
        assert!(key_of(Kind::Text, &json!("B")) < key_of(Kind::Text, &json!("a")));
        assert!(key_of(Kind::Number, &Value::Null).is_none());
    }
}
