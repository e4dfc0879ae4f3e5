//! Writing a JSON object field by field into a buffer: for records written
//! by the million (audit exports, the relay's messages), where serializing
//! through a struct would first decode a stored JSON text only to write it
//! out again.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serialize;

/// Appends `"name":value` to `out`, after a comma unless it is the object's
/// `first` field (whose `{` it writes). `name` is written as given: a plain
/// field name, nothing JSON escapes.
pub fn push_field<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    first: bool,
    name: &str,
    value: &T,
) -> serde_json::Result<()> {
    push_name(out, first, name);
    serde_json::to_writer(&mut *out, value)
}

/// Appends `"name":` and `raw`, a JSON text written as it is.
pub fn push_raw_field(out: &mut Vec<u8>, first: bool, name: &str, raw: &str) {
    push_name(out, first, name);
    out.extend_from_slice(raw.as_bytes());
}

/// Appends `"name":` and `value` as a JSON string (`null` for none): the
/// bytes serde_json writes for it, written without its escaping pass when
/// nothing in `value` needs escaping (ids, sealed values: most of what an
/// export or the relay writes).
pub fn push_str_field<'v>(
    out: &mut Vec<u8>,
    first: bool,
    name: &str,
    value: impl Into<Option<&'v str>>,
) -> serde_json::Result<()> {
    push_name(out, first, name);
    match value.into() {
        Some(value) => push_str(out, value),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// Appends `value` as a JSON string, as serde_json writes it.
pub fn push_str(out: &mut Vec<u8>, value: &str) -> serde_json::Result<()> {
    // One pass over every byte, which the compiler vectorizes, finds
    // whether any is one serde_json escapes: a control character, a quote
    // or a backslash.
    let escapes = value.bytes().fold(false, |any, b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if escapes {
        return serde_json::to_writer(&mut *out, value);
    }
    out.reserve(value.len() + 2);
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
    Ok(())
}

/// Appends `"name":` and `at` as serde writes a UTC time (RFC 3339, `Z`,
/// the fraction in 0, 3, 6 or 9 digits as it needs), without the
/// `Display` machinery serde goes through (about 1.5% of a tenant-wide
/// export's CPU in a profile). Years outside 0–9999 go through serde.
pub fn push_time_field(
    out: &mut Vec<u8>,
    first: bool,
    name: &str,
    at: &DateTime<Utc>,
) -> serde_json::Result<()> {
    push_name(out, first, name);
    // The fields read once off the naive time (each of `at`'s own getters
    // converts it again).
    let naive = at.naive_utc();
    let year = naive.year();
    if !(0..=9999).contains(&year) {
        return serde_json::to_writer(&mut *out, at);
    }
    let (mut second, mut nano) = (naive.second(), naive.nanosecond());
    // A leap second, as chrono writes it.
    if nano >= 1_000_000_000 {
        second += 1;
        nano -= 1_000_000_000;
    }
    let two = |out: &mut Vec<u8>, n: u32| {
        out.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8])
    };
    out.push(b'"');
    two(out, year as u32 / 100);
    two(out, year as u32 % 100);
    out.push(b'-');
    two(out, naive.month());
    out.push(b'-');
    two(out, naive.day());
    out.push(b'T');
    two(out, naive.hour());
    out.push(b':');
    two(out, naive.minute());
    out.push(b':');
    two(out, second);
    let (fraction, digits) = if nano == 0 {
        (0, 0)
    } else if nano % 1_000_000 == 0 {
        (nano / 1_000_000, 3)
    } else if nano % 1_000 == 0 {
        (nano / 1_000, 6)
    } else {
        (nano, 9)
    };
    if digits > 0 {
        out.push(b'.');
        let mut buf = [0u8; 9];
        let mut rest = fraction;
        for d in buf[..digits].iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.extend_from_slice(&buf[..digits]);
    }
    out.extend_from_slice(b"Z\"");
    Ok(())
}

fn push_name(out: &mut Vec<u8>, first: bool, name: &str) {
    out.extend_from_slice(if first { b"{\"" } else { b",\"" });
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_make_the_object_serde_makes() {
        let mut out = Vec::new();
        push_field(&mut out, true, "a", &1).unwrap();
        push_field(&mut out, false, "b", "x \"y\"").unwrap();
        push_field(&mut out, false, "c", &None::<&str>).unwrap();
        push_raw_field(&mut out, false, "d", r#"{"k": [1, 2]}"#);
        out.push(b'}');
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":1,"b":"x \"y\"","c":null,"d":{"k": [1, 2]}}"#
        );
    }

    #[test]
    fn strings_are_written_as_serde_writes_them() {
        let strings = [
            "",
            "plain",
            "sealed:1:46714c40-1012-4660-ab1d-1bc9a28b281b:Xvg+9SuThQtvPDmZ/FHW=",
            "a \"quote\"",
            "back\\slash",
            "line\nbreak\ttab\u{1}\u{1f}",
            "del \u{7f}, é, ✓, 😀",
            "</script>",
        ];
        for s in strings {
            for value in [Some(s), None] {
                let mut out = Vec::new();
                push_str_field(&mut out, true, "s", value).unwrap();
                out.push(b'}');
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    serde_json::json!({ "s": value }).to_string(),
                    "{value:?}"
                );
            }
        }
    }

    #[test]
    fn times_are_written_as_serde_writes_them() {
        use chrono::{NaiveDate, TimeZone};
        let day = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap();
        let mut times: Vec<DateTime<Utc>> = Vec::new();
        for date in [
            day(2026, 12, 5),
            day(0, 1, 1),
            day(9999, 12, 31),
            day(1970, 1, 1),
        ] {
            for nano in [
                0,
                7,
                120_000_000,
                123_000_000,
                123_400_000,
                123_456_000,
                123_456_700,
                999_999_999,
                1_000_000_000,
                1_500_000_000,
            ] {
                let at = date.and_hms_nano_opt(23, 59, 59, nano).unwrap();
                times.push(Utc.from_utc_datetime(&at));
            }
        }
        times.push(Utc.from_utc_datetime(&day(10000, 1, 1).and_hms_opt(0, 0, 0).unwrap()));
        times.push(Utc.from_utc_datetime(&day(-1, 6, 1).and_hms_opt(1, 2, 3).unwrap()));
        times.push(
            Utc.from_utc_datetime(
                &day(2026, 12, 5)
                    .and_hms_nano_opt(21, 41, 42, 417_356_912)
                    .unwrap(),
            ),
        );
        for at in times {
            let mut out = Vec::new();
            push_time_field(&mut out, true, "at", &at).unwrap();
            out.push(b'}');
            let expected = format!("{{\"at\":{}}}", serde_json::to_string(&at).unwrap());
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{at:?}");
        }
    }
}
