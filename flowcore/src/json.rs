//! JSON as it enters flowcore: nested at most [`MAX_DEPTH`] levels, with no key twice in an
//! object.
//!
//! serde_json reads at most 128 levels and writes any depth, so a document one level under its
//! read limit could be stored (wrapped in a record, deeper still) and never read back. Every
//! value flowcore takes in (request bodies, node outputs) is held to [`MAX_DEPTH`], half the
//! read limit, which leaves room for the records that wrap it: what is stored can always be
//! read.
//!
//! ```
//! use flowcore::json;
//!
//! assert!(json::parse(br#"{"a": [1, {"b": 2}]}"#).is_ok());
//! let dup = json::parse(br#"{"a": 1, "a": 2}"#).unwrap_err();
//! assert_eq!(dup.to_string(), "duplicate key `a` at line 1 column 12");
//! let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
//! assert!(json::parse(deep.as_bytes()).is_err());
//! assert_eq!(json::depth(&serde_json::json!([[1], {"a": {}}])), 3);
//! ```

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// How deep a JSON value flowcore takes in may nest: an array or object is one level, a scalar
/// none (`[[1]]` is 2 deep).
pub const MAX_DEPTH: usize = 64;

/// A JSON document that was refused: malformed, too deep, or with a key twice.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(#[source] serde_json::Error);

impl JsonError {
    /// The stable error code, `invalid_json`.
    pub fn code(&self) -> &'static str {
        "invalid_json"
    }
}

/// Reads `bytes` as one JSON value, refusing duplicate keys and nesting deeper than
/// [`MAX_DEPTH`].
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict { depth: 0 }
        .deserialize(&mut de)
        .map_err(JsonError)?;
    de.end().map_err(JsonError)?;
    Ok(value)
}

/// The JSON type of `value`, as an error message names it: `null`, `a boolean`, `a number`,
/// `a string`, `an array` or `an object`.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// How deep `value` nests (0 for a scalar). Walks without recursion, so any value is safe.
pub fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, level)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(fields) => Box::new(fields.values()),
            _ => continue,
        };
        deepest = deepest.max(level + 1);
        stack.extend(children.map(|child| (child, level + 1)));
    }
    deepest
}

/// Whether `value` nests deeper than [`MAX_DEPTH`].
pub fn too_deep(value: &Value) -> bool {
    depth(value) > MAX_DEPTH
}

/// Builds a [`Value`] while counting levels and refusing duplicate keys.
struct Strict {
    depth: usize,
}

impl Strict {
    fn enter<E: de::Error>(&self) -> Result<Strict, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(Strict {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(Strict { depth: inner.depth })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
            }
            let value = map.next_value_seed(Strict { depth: inner.depth })?;
            fields.insert(key, value);
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn depth_is_bounded_where_serde_json_would_read_and_not_read_back() {
        assert_eq!(
            depth(&parse(nested(MAX_DEPTH).as_bytes()).unwrap()),
            MAX_DEPTH
        );
        let err = parse(nested(MAX_DEPTH + 1).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("nested deeper than 64"), "{err}");
        // 127 levels: serde_json reads it, but not once wrapped in a record.
        assert!(serde_json::from_str::<Value>(&nested(127)).is_ok());
        assert!(parse(nested(127).as_bytes()).is_err());
        // Far past serde_json's own limit: refused, not a stack overflow.
        assert!(parse(nested(100_000).as_bytes()).is_err());
        let objects = format!(
            "{}1{}",
            "{\"a\":".repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert!(parse(objects.as_bytes()).is_err());
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_level() {
        assert!(parse(br#"{"a": {"b": 1, "b": 1}}"#).is_err());
        assert!(parse(br#"[{"x": 1}, {"x": 2}]"#).is_ok());
        assert!(parse(br#"{"a": 1} x"#).is_err(), "trailing data");
    }

    #[test]
    fn depth_of_a_value_built_in_memory() {
        let mut value = Value::Null;
        for _ in 0..10_000 {
            value = Value::Array(vec![value]);
        }
        assert_eq!(depth(&value), 10_000);
        assert!(too_deep(&value));
        // Dropping a 10,000-deep value recurses in serde_json: leak it instead of risking
        // the test thread's stack.
        std::mem::forget(value);
        assert_eq!(depth(&serde_json::json!({"a": 1, "b": [true]})), 2);
    }
}
