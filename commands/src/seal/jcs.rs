//! RFC 8785 JSON Canonicalization Scheme (JCS): the one byte string a JSON
//! value has, whatever the bytes it was written or stored as. PostgreSQL's
//! `jsonb` keeps neither key order nor the number spelling that was
//! written, so the audit log hashes this instead.
//!
//! - objects: members sorted by their names' UTF-16 code units, no
//!   whitespace;
//! - strings: `"` and `\` escaped, U+0000–U+001F as `\b \t \n \f \r` or
//!   `\u00xx` (lower-case hex), everything else as its UTF-8 bytes;
//! - numbers: the IEEE 754 double they denote, spelled as ECMAScript's
//!   `Number.prototype.toString` does (`1e+21`, `1e-7`, `0` for `-0`). An
//!   integer beyond ±2^53 is the double nearest to it, as RFC 8785 (and
//!   every ECMAScript reader) takes it: such numbers are committed to 53
//!   bits of precision, which the README states;
//! - `true`, `false`, `null`, arrays in order.

use serde_json::{Map, Number, Value};

/// The canonical (RFC 8785) serialization of `value`.
pub fn canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_value(&mut out, value);
    out
}

/// Appends the canonical serialization of `value` to `out`.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_object(out, map),
    }
}

fn write_object(out: &mut Vec<u8>, map: &Map<String, Value>) {
    // The map iterates in the order of the keys' UTF-8 bytes, which is
    // RFC 8785's order (UTF-16 code units) whenever no key holds a
    // character beyond U+DFFF: then nothing needs sorting.
    if map.keys().all(|k| utf8_order_is_utf16_order(k)) {
        write_members(out, map.iter());
    } else {
        let mut members: Vec<(&String, &Value)> = map.iter().collect();
        members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
        write_members(out, members.into_iter());
    }
}

fn write_members<'a>(out: &mut Vec<u8>, members: impl Iterator<Item = (&'a String, &'a Value)>) {
    out.push(b'{');
    for (i, (name, value)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, name);
        out.push(b':');
        write_value(out, value);
    }
    out.push(b'}');
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    // serde_json holds a number as an i64, a u64 or a finite f64; the
    // nearest double of each (exact up to ±2^53).
    let double = n.as_f64().unwrap_or(0.0);
    if double == 0.0 {
        // ECMAScript spells -0 as "0".
        out.push(b'0');
    } else {
        let mut buffer = ryu_js::Buffer::new();
        out.extend_from_slice(buffer.format_finite(double).as_bytes());
    }
}

/// Whether comparing `key` by its UTF-8 bytes orders it as comparing it
/// by UTF-16 code units does: true when it holds no character at or beyond
/// U+E000 (those are where the two orders part, surrogates sorting below
/// U+E000..U+FFFF in UTF-16 but above in UTF-8); a 3-byte sequence starting
/// 0xEE or above, or any 4-byte one, marks such a character.
pub fn utf8_order_is_utf16_order(key: &str) -> bool {
    key.bytes().all(|b| b < 0xEE)
}

/// Appends `s` as a canonical JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    write_string(out, s);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most strings need no escape: one branch-free pass (the compiler
    // vectorises it) decides, then one copy.
    let plain = bytes.iter().fold(true, |plain, &b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            0x08 => Some(b"\\b"),
            0x09 => Some(b"\\t"),
            0x0a => Some(b"\\n"),
            0x0c => Some(b"\\f"),
            0x0d => Some(b"\\r"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(value: &Value) -> String {
        String::from_utf8(canonical(value)).unwrap()
    }

    #[test]
    fn the_rfc_8785_example_canonicalizes_as_the_rfc_prints_it() {
        // RFC 8785 §3.2.2, its input and expected output.
        let input: Value = serde_json::from_str(
            r#"{
              "numbers": [333333333.33333329, 1E30, 4.50,
                          2e-3, 0.000000000000000000000000001],
              "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
              "literals": [null, true, false]
            }"#,
        )
        .unwrap();
        assert_eq!(
            text(&input),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    #[test]
    fn members_sort_by_utf16_code_units_not_bytes() {
        // RFC 8785 §3.2.3: U+1F600 (surrogates D83D DE00) sorts before
        // U+FB33 in UTF-16, after it in UTF-8.
        let value = json!({"\u{fb33}": 1, "\u{1f600}": 2, "\r": 3, "1": 4, "\u{80}": 5, "ö": 6});
        assert_eq!(
            text(&value),
            "{\"\\r\":3,\"1\":4,\"\u{80}\":5,\"ö\":6,\"\u{1f600}\":2,\"\u{fb33}\":1}"
        );
    }

    #[test]
    fn numbers_are_spelled_as_ecmascript_does() {
        for (number, spelled) in [
            (json!(0), "0"),
            (json!(-0.0), "0"),
            (json!(1), "1"),
            (json!(-1), "-1"),
            (json!(1.5), "1.5"),
            (json!(100.0), "100"),
            (json!(1e21), "1e+21"),
            (json!(1e20), "100000000000000000000"),
            (json!(1e-7), "1e-7"),
            (json!(0.000001), "0.000001"),
            (json!(9007199254740992_i64), "9007199254740992"),
            (json!(-9007199254740992_i64), "-9007199254740992"),
            (json!(5e-324), "5e-324"),
            (json!(1.7976931348623157e308), "1.7976931348623157e+308"),
        ] {
            assert_eq!(text(&number), spelled, "{number}");
        }
        // Beyond 2^53, the nearest double, as an ECMAScript reader takes it.
        assert_eq!(text(&json!(9007199254740993_i64)), "9007199254740992");
        assert_eq!(text(&json!(u64::MAX)), "18446744073709552000");
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let value = json!("\u{0}\u{1f}\u{7f}\u{2028}é\t\"\\/");
        assert_eq!(
            text(&value),
            "\"\\u0000\\u001f\u{7f}\u{2028}é\\t\\\"\\\\/\""
        );
    }

    #[test]
    fn equal_values_written_differently_have_one_form() {
        let a: Value =
            serde_json::from_str(r#"{ "b" : [1.0, 2e0, {"y":null,"x":true}], "a":"z" }"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":"z","b":[1,2,{"x":true,"y":null}]}"#).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(text(&a), r#"{"a":"z","b":[1,2,{"x":true,"y":null}]}"#);
    }
}
