//! Canonical text forms for the types whose values the database would
//! store, compare or print differently from how upstream spells them.
//!
//! Each function takes what upstream sent and returns the one text the
//! database gives back for that value when driftd scans it, or an error
//! naming why the value cannot be stored faithfully. Nothing is rounded,
//! truncated or guessed: a value that would change on write is refused.
//!
//! - uuid: lower-case, hyphenated (PostgreSQL's `uuid::text`);
//! - timestamp: UTC, microseconds, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (what the
//!   PostgreSQL scan prints for `timestamptz`); more than microsecond
//!   precision is refused (PostgreSQL would round it);
//! - numeric: plain decimal, no exponent, no trailing fractional zeros
//!   (`trim_scale(numeric)::text`);
//! - json: jsonb's own text (keys ordered by length then bytes, the last of
//!   repeated keys kept, `", "` and `": "` separators, numbers as numeric).

use std::fmt::Write as _;

use serde_json::{Map, Number, Value as Json};

/// The canonical form of a uuid, or why `raw` is not one.
pub fn uuid(raw: &str) -> Result<String, String> {
    if is_canonical_uuid(raw) {
        return Ok(raw.to_string());
    }
    uuid::Uuid::try_parse(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| format!("`{raw}` is not a uuid"))
}

/// Whether `raw` is already a uuid's canonical form: 36 characters,
/// lower-case hex digits in groups of 8-4-4-4-12 (what [`uuid`] gives).
pub fn is_canonical_uuid(raw: &str) -> bool {
    // Each byte's class (1: a lower-case hex digit, 2: '-', 0: anything
    // else) must be the class its position wants; checked without
    // branching, as this runs on every uuid of a pass.
    const CLASS: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut c = 0;
        while c < 256 {
            t[c] = match c as u8 {
                b'0'..=b'9' | b'a'..=b'f' => 1,
                b'-' => 2,
                _ => 0,
            };
            c += 1;
        }
        t
    };
    const WANT: [u8; 36] = {
        let mut w = [1u8; 36];
        w[8] = 2;
        w[13] = 2;
        w[18] = 2;
        w[23] = 2;
        w
    };
    let b = raw.as_bytes();
    b.len() == 36
        && b.iter().zip(WANT).fold(0, |wrong, (&c, want)| {
            wrong | (CLASS[usize::from(c)] ^ want)
        }) == 0
}

/// The canonical form of an RFC 3339 timestamp, in UTC.
pub fn timestamp(raw: &str) -> Result<String, String> {
    let parsed = chrono::DateTime::parse_from_rfc3339(raw)
        .map_err(|e| format!("`{raw}` is not an RFC 3339 timestamp: {e}"))?;
    let mut utc = parsed.with_timezone(&chrono::Utc);
    let nanos = utc.timestamp_subsec_nanos();
    if nanos >= 1_000_000_000 {
        // A leap second (`23:59:60`): PostgreSQL stores the next second.
        utc = chrono::DateTime::from_timestamp(utc.timestamp() + 1, nanos - 1_000_000_000)
            .ok_or_else(|| format!("`{raw}` is out of range"))?;
    }
    if utc.timestamp_subsec_nanos() % 1000 != 0 {
        return Err(format!(
            "`{raw}` is more precise than the microseconds the database keeps"
        ));
    }
    let year = chrono::Datelike::year(&utc);
    if !(1..=9999).contains(&year) {
        return Err(format!("`{raw}` is outside the years 1 to 9999"));
    }
    Ok(utc.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

/// A decimal number split into its parts: `digits` × 10^-`scale`, with
/// `scale` the count of digits after the point as written (it may be
/// negative after an exponent).
struct Decimal {
    negative: bool,
    /// No leading zeros; empty for zero.
    digits: String,
    scale: i64,
}

fn parse_decimal(raw: &str) -> Option<Decimal> {
    let (negative, rest) = match raw.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, raw.strip_prefix('+').unwrap_or(raw)),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    if exponent.abs() > 100_000 {
        return None;
    }
    let all = format!("{int}{frac}");
    let digits = all.trim_start_matches('0').to_string();
    Some(Decimal {
        negative: negative && !digits.is_empty(),
        digits,
        scale: frac.len() as i64 - exponent,
    })
}

impl Decimal {
    /// Plain text with exactly `scale.max(0)` digits after the point.
    fn render(&self, scale: i64) -> String {
        let shown = scale.max(0) as usize;
        // digits × 10^-self.scale, shown with `shown` fractional digits
        let mut digits = self.digits.clone();
        let shift = shown as i64 - self.scale;
        if shift >= 0 {
            digits.push_str(&"0".repeat(shift as usize));
        } else {
            // only zeros are dropped: callers never ask for fewer digits
            let keep = digits.len().saturating_sub((-shift) as usize);
            digits.truncate(keep);
        }
        if digits.len() <= shown {
            let pad = shown + 1 - digits.len();
            digits.insert_str(0, &"0".repeat(pad));
        }
        // a zero scaled up (`0E+2`) has no digits of its own: one `0`
        let int_len = digits.len() - shown;
        let zeros = digits[..int_len].bytes().take_while(|b| *b == b'0').count();
        digits.drain(..zeros.min(int_len - 1));
        let point = digits.len() - shown;
        let mut out = String::with_capacity(digits.len() + 2);
        if self.negative {
            out.push('-');
        }
        out.push_str(&digits[..point]);
        if shown > 0 {
            out.push('.');
            out.push_str(&digits[point..]);
        }
        out
    }

    /// The smallest scale that shows the value exactly.
    fn minimal_scale(&self) -> i64 {
        if self.digits.is_empty() {
            return 0;
        }
        let zeros = self.digits.len() - self.digits.trim_end_matches('0').len();
        (self.scale - zeros as i64).max(0)
    }
}

/// The canonical form of a decimal number (JSON number text or a string).
/// With `limits = Some((precision, scale))` (a `numeric(p, s)` column), a
/// value needing more fractional digits than `s` or more integer digits
/// than `p - s` is refused: the column would round or reject it.
pub fn numeric(raw: &str, limits: Option<(i64, i64)>) -> Result<String, String> {
    let d = parse_decimal(raw.trim()).ok_or_else(|| format!("`{raw}` is not a decimal number"))?;
    let scale = d.minimal_scale();
    let text = d.render(scale);
    if let Some((precision, max_scale)) = limits {
        if scale > max_scale {
            return Err(format!(
                "`{raw}` has {scale} digits after the point; numeric({precision},{max_scale}) would round it"
            ));
        }
        let int_part = text.trim_start_matches('-').split('.').next().unwrap_or("");
        let int_digits = if int_part == "0" {
            0
        } else {
            int_part.len() as i64
        };
        if int_digits > precision - max_scale {
            return Err(format!(
                "`{raw}` has too many digits before the point for numeric({precision},{max_scale})"
            ));
        }
    }
    Ok(text)
}

/// jsonb's text for a JSON value.
pub fn json(value: &Json) -> Result<String, String> {
    let mut out = String::new();
    write_jsonb(value, &mut out)?;
    Ok(out)
}

fn write_jsonb(value: &Json, out: &mut String) -> Result<(), String> {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&jsonb_number(n)?),
        Json::String(s) => write_jsonb_string(s, out)?,
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_jsonb(item, out)?;
            }
            out.push(']');
        }
        Json::Object(map) => write_jsonb_object(map, out)?,
    }
    Ok(())
}

fn write_jsonb_object(map: &Map<String, Json>, out: &mut String) -> Result<(), String> {
    // serde_json keeps the last of repeated keys, as jsonb does.
    let mut entries: Vec<(&String, &Json)> = map.iter().collect();
    entries.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then(a.0.cmp(b.0)));
    out.push('{');
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_jsonb_string(key, out)?;
        out.push_str(": ");
        write_jsonb(value, out)?;
    }
    out.push('}');
    Ok(())
}

fn write_jsonb_string(s: &str, out: &mut String) -> Result<(), String> {
    out.push('"');
    for c in s.chars() {
        match c {
            '\0' => return Err("a JSON string holds \\u0000, which jsonb cannot store".into()),
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(())
}

/// A JSON number as jsonb prints it: numeric keeps the scale written
/// (`1.50` stays `1.50`), an exponent moves it (`1.5e1` is `15`).
fn jsonb_number(n: &Number) -> Result<String, String> {
    let raw = n.to_string();
    let d = parse_decimal(&raw).ok_or_else(|| format!("`{raw}` is not a decimal number"))?;
    Ok(d.render(d.scale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn uuids_are_lower_case_and_hyphenated() {
        assert_eq!(
            uuid("6F9619FF-8B86-D011-B42D-00C04FC964FF").unwrap(),
            "6f9619ff-8b86-d011-b42d-00c04fc964ff"
        );
        assert_eq!(
            uuid("6f9619ff8b86d011b42d00c04fc964ff").unwrap(),
            "6f9619ff-8b86-d011-b42d-00c04fc964ff"
        );
        assert!(uuid("not-a-uuid").is_err());
        // The shortcut for canonical text agrees with parsing it.
        for raw in [
            "6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "00000000-0000-0000-0000-000000000000",
            "6f9619ff-8b86-d011-b42d-00c04fc964fF",
            "6f9619ff-8b86-d011-b42d-00c04fc964f",
            "6f9619ff-8b86-d011-b42d000c04fc964ff",
            "6f9619ffx8b86-d011-b42d-00c04fc964ff",
            "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
            "6f9619ff-8b86-d011-b42d-00c04fc964fg",
        ] {
            let parsed = uuid::Uuid::try_parse(raw).map(|u| u.hyphenated().to_string());
            assert_eq!(
                is_canonical_uuid(raw),
                parsed.as_deref() == Ok(raw),
                "{raw}"
            );
        }
        // Every byte value at every position of a canonical uuid.
        let base = b"6f9619ff-8b86-d011-b42d-00c04fc964ff".to_vec();
        let mut checked = 0;
        for at in 0..base.len() {
            for byte in 0..=127u8 {
                let mut raw = base.clone();
                raw[at] = byte;
                let raw = String::from_utf8(raw).unwrap();
                let parsed = uuid::Uuid::try_parse(&raw).map(|u| u.hyphenated().to_string());
                assert_eq!(
                    is_canonical_uuid(&raw),
                    parsed.as_deref() == Ok(raw.as_str()),
                    "{raw:?}"
                );
                checked += usize::from(is_canonical_uuid(&raw));
            }
        }
        // 16 hex digits at each of 32 places, '-' at each of 4.
        assert_eq!(checked, 32 * 16 + 4);
        // A multi-byte character in place of a digit.
        assert!(!is_canonical_uuid("6f9619ff-8b86-d011-b42d-00c04fc964é"));
    }

    #[test]
    fn timestamps_are_utc_microseconds() {
        assert_eq!(
            timestamp("2027-03-28T02:30:00+02:00").unwrap(),
            "2027-03-28T00:30:00.000000Z"
        );
        assert_eq!(
            timestamp("2027-01-01T00:00:00.123456Z").unwrap(),
            "2027-01-01T00:00:00.123456Z"
        );
        assert!(timestamp("2027-01-01T00:00:00.1234567Z").is_err());
        assert_eq!(
            timestamp("2016-12-31T23:59:60Z").unwrap(),
            "2017-01-01T00:00:00.000000Z"
        );
        assert!(timestamp("yesterday").is_err());
    }

    #[test]
    fn numerics_are_plain_and_trimmed() {
        for (raw, want) in [
            ("1e2", "100"),
            ("1.50", "1.5"),
            ("-0.0", "0"),
            ("0", "0"),
            ("007.250", "7.25"),
            ("1.5e-3", "0.0015"),
            ("-12345678901234567890.5", "-12345678901234567890.5"),
            ("2E+3", "2000"),
            ("0E+2", "0"),
            ("-0e3", "0"),
            ("0.00e1", "0"),
        ] {
            assert_eq!(numeric(raw, None).unwrap(), want, "{raw}");
        }
        assert!(numeric("12abc", None).is_err());
        assert!(numeric("", None).is_err());
        assert!(numeric("1.234", Some((10, 2))).is_err());
        assert!(numeric("123456789", Some((10, 2))).is_err());
        assert_eq!(numeric("12345678.9", Some((10, 2))).unwrap(), "12345678.9");
        assert_eq!(numeric("1.200", Some((3, 1))).unwrap(), "1.2");
    }

    #[test]
    fn json_is_printed_as_jsonb_does() {
        let v: Json = serde_json::from_str(r#"{"bb": [1, 1.50, 1.5e1, 1e-2], "a": {"z": null, "yy": "q\"\n\u0001é"}, "ccc": true}"#).unwrap();
        assert_eq!(
            json(&v).unwrap(),
            r#"{"a": {"z": null, "yy": "q\"\n\u0001é"}, "bb": [1, 1.50, 15, 0.01], "ccc": true}"#
        );
        assert!(json(&json!("a\u{0}")).is_err());
        assert_eq!(json(&json!([])).unwrap(), "[]");
        let zeros: Json = serde_json::from_str(r#"[0e3, 0.00e1, -0.0, 0E+2]"#).unwrap();
        assert_eq!(json(&zeros).unwrap(), "[0, 0.0, 0.0, 0]");
        assert_eq!(json(&json!({})).unwrap(), "{}");
    }
}
