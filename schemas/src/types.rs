//! PostgreSQL text values → JSON, following Debezium's string-preserving handling modes
//! (`decimal.handling.mode=string`, `binary.handling.mode=base64`, `interval.handling.mode=string`,
//! time types as ISO-8601 strings). Capture requests ISO `DateStyle`, `UTC` and `iso_8601`
//! `IntervalStyle`, so the strings are canonical. Unknown types stay text.

use base64::Engine;
use serde_json::Value;

pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
}

/// Converts one text-format value of base type `type_oid` (element type `element_oid` for arrays,
/// else 0) to its JSON form. Never fails: anything it cannot read stays a string.
pub fn to_json(text: &str, type_oid: u32, element_oid: u32) -> Value {
    if element_oid != 0 {
        return match parse_array(text) {
            Some(a) => array_to_json(a, element_oid),
            None => Value::String(text.to_owned()),
        };
    }
    scalar_to_json(text, type_oid)
}

fn scalar_to_json(text: &str, type_oid: u32) -> Value {
    match type_oid {
        oid::BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            text.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        // NaN and ±Infinity have no JSON number: they stay strings, as Debezium does.
        oid::FLOAT4 | oid::FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_owned())),
        oid::BYTEA => match text.strip_prefix("\\x").and_then(decode_hex) {
            Some(bytes) => Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            None => Value::String(text.to_owned()),
        },
        _ => Value::String(text.to_owned()),
    }
}

/// One text value serialised straight to its JSON form ([`to_json`] without building a
/// `Value`): the common types write no intermediate string.
pub struct JsonText<'a> {
    pub text: &'a str,
    pub type_oid: u32,
    pub element_oid: u32,
}

impl serde::Serialize for JsonText<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.element_oid != 0 {
            return to_json(self.text, self.type_oid, self.element_oid).serialize(s);
        }
        match self.type_oid {
            oid::BOOL => match self.text {
                "t" => s.serialize_bool(true),
                "f" => s.serialize_bool(false),
                t => s.serialize_str(t),
            },
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => match self.text.parse::<i64>() {
                Ok(n) => s.serialize_i64(n),
                Err(_) => s.serialize_str(self.text),
            },
            oid::FLOAT4 | oid::FLOAT8 | oid::BYTEA => to_json(self.text, self.type_oid, 0).serialize(s),
            _ => s.serialize_str(self.text),
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A parsed PostgreSQL array literal: nested lists of optional element texts.
#[derive(Debug, PartialEq)]
pub enum ArrayValue {
    Null,
    Element(String),
    List(Vec<ArrayValue>),
}

fn array_to_json(a: ArrayValue, element_oid: u32) -> Value {
    match a {
        ArrayValue::Null => Value::Null,
        ArrayValue::Element(s) => scalar_to_json(&s, element_oid),
        ArrayValue::List(items) => Value::Array(items.into_iter().map(|i| array_to_json(i, element_oid)).collect()),
    }
}

/// Parses `{1,2}`, `{{"a b",NULL},{c,"d\"e"}}` and `[0:1]={1,2}`. Returns None on malformed input.
pub fn parse_array(text: &str) -> Option<ArrayValue> {
    let body = match text.strip_prefix('[') {
        // Explicit bounds: `[lo:hi]=` precede the braces.
        Some(_) => &text[text.find('=')? + 1..],
        None => text,
    };
    let mut chars = body.chars().peekable();
    let v = parse_list(&mut chars)?;
    chars.next().is_none().then_some(v)
}

fn parse_list(it: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<ArrayValue> {
    if it.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if it.peek() == Some(&'}') {
        it.next();
        return Some(ArrayValue::List(items));
    }
    loop {
        match it.peek()? {
            '{' => items.push(parse_list(it)?),
            '"' => {
                it.next();
                let mut s = String::new();
                loop {
                    match it.next()? {
                        '\\' => s.push(it.next()?),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(ArrayValue::Element(s));
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = it.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    if c == '\\' {
                        it.next();
                        s.push(it.next()?);
                        continue;
                    }
                    s.push(c);
                    it.next();
                }
                let s = s.trim().to_owned();
                items.push(if s.eq_ignore_ascii_case("NULL") { ArrayValue::Null } else { ArrayValue::Element(s) });
            }
        }
        match it.next()? {
            ',' => continue,
            '}' => return Some(ArrayValue::List(items)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars() {
        assert_eq!(to_json("t", oid::BOOL, 0), json!(true));
        assert_eq!(to_json("-42", oid::INT8, 0), json!(-42));
        assert_eq!(to_json("NaN", oid::FLOAT8, 0), json!("NaN"));
        assert_eq!(to_json("1.5", oid::FLOAT4, 0), json!(1.5));
        assert_eq!(to_json("\\x0102ff", oid::BYTEA, 0), json!("AQL/"));
        assert_eq!(to_json("12.340", 1700, 0), json!("12.340"));
    }

    #[test]
    fn direct_serialisation_matches_to_json() {
        for (text, ty, el) in [
            ("t", oid::BOOL, 0),
            ("x", oid::BOOL, 0),
            ("-42", oid::INT8, 0),
            ("99999999999999999999", oid::INT8, 0),
            ("NaN", oid::FLOAT8, 0),
            ("1.5", oid::FLOAT4, 0),
            ("\\x0102ff", oid::BYTEA, 0),
            ("12.340", 1700, 0),
            ("a \"quoted\" \\ line\n", 25, 0),
            ("{1,2,NULL}", 1007, oid::INT4),
        ] {
            let direct = serde_json::to_string(&JsonText { text, type_oid: ty, element_oid: el }).unwrap();
            assert_eq!(direct, to_json(text, ty, el).to_string(), "{text}");
        }
    }

    #[test]
    fn arrays() {
        assert_eq!(to_json("{1,2,NULL}", oid::INT4, oid::INT4), json!([1, 2, null]));
        assert_eq!(to_json(r#"{{"a b","c\"d"},{NULL,e}}"#, 1009, 25), json!([["a b", "c\"d"], [null, "e"]]));
        assert_eq!(to_json("[0:1]={1,2}", 1007, oid::INT4), json!([1, 2]));
        assert_eq!(to_json("{}", 1007, oid::INT4), json!([]));
        assert_eq!(to_json("{1,2", 1007, oid::INT4), json!("{1,2"));
        assert_eq!(to_json(r#"{"NULL"}"#, 1009, 25), json!(["NULL"]));
    }
}
