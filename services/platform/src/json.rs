//! Writing a JSON object field by field into a buffer: for records written
//! by the million (audit exports, the relay's messages), where serializing
//! through a struct would first decode a stored JSON text only to write it
//! out again.

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
}
