//! A row as JSON text (PostgreSQL's `to_json` of the row): read field by field without
//! building a tree, so a value of any depth or size passes through whole and untouched.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A column name as it appears in the JSON text: borrowed unless it had escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

/// The top-level fields of a JSON object, in text order, each value as raw JSON text.
#[derive(Debug, Default)]
pub struct Fields<'a> {
    entries: Vec<(Name<'a>, &'a RawValue)>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<Name<'de>, &'de RawValue>()? {
                    entries.push(entry);
                }
                Ok(Fields { entries })
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

impl<'a> Fields<'a> {
    /// Splits an object's text into its fields (values are skipped, not parsed: no depth
    /// limit applies to them).
    pub fn parse(object: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(object)
    }

    /// The raw value of a column, if the row has it.
    pub fn get(&self, column: &str) -> Option<&'a RawValue> {
        self.entries
            .iter()
            .find(|(name, _)| name.0 == column)
            .map(|(_, value)| *value)
    }

    /// The fields in text order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> {
        self.entries
            .iter()
            .map(|(name, value)| (name.0.as_ref(), *value))
    }

    /// Whether the row has no fields.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Appends `value` as a JSON string literal.
pub fn push_json_string(out: &mut String, value: &str) {
    // Serializing a &str into a String cannot fail.
    let quoted = serde_json::to_string(value).unwrap_or_default();
    out.push_str(&quoted);
}

/// The object with only `columns` (in that order; columns the row lacks are left out).
pub fn project(fields: &Fields<'_>, columns: &[String]) -> String {
    let mut out = String::with_capacity(64);
    out.push('{');
    let mut first = true;
    for column in columns {
        if let Some(value) = fields.get(column) {
            if !first {
                out.push(',');
            }
            first = false;
            push_json_string(&mut out, column);
            out.push(':');
            out.push_str(value.get());
        }
    }
    out.push('}');
    out
}

/// The columns whose values differ between `old` and `new` (in `new`'s order, then those only
/// `old` has). Values are compared as text: PostgreSQL renders equal values of one column
/// identically.
pub fn changed_columns(old: &Fields<'_>, new: &Fields<'_>) -> Vec<String> {
    // By name through a map: a row may have hundreds of columns.
    let old_by_name: HashMap<&str, &RawValue> = old.iter().collect();
    let new_by_name: HashMap<&str, &RawValue> = new.iter().collect();
    let mut changed: Vec<String> = new
        .iter()
        .filter(|(name, value)| old_by_name.get(name).is_none_or(|o| o.get() != value.get()))
        .map(|(name, _)| name.to_owned())
        .collect();
    changed.extend(
        old.iter()
            .filter(|(name, _)| !new_by_name.contains_key(name))
            .map(|(name, _)| name.to_owned()),
    );
    changed
}

/// Whether a raw JSON value is `null`.
pub fn is_null(value: &RawValue) -> bool {
    value.get() == "null"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_a_row_without_parsing_values() {
        let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        let text = format!(r#"{{"id":1,"a\"b":"x","deep":{deep},"n":null}}"#);
        let fields = Fields::parse(&text).unwrap();
        assert_eq!(fields.get("id").unwrap().get(), "1");
        assert_eq!(fields.get("a\"b").unwrap().get(), "\"x\"");
        assert_eq!(fields.get("deep").unwrap().get(), deep);
        assert!(is_null(fields.get("n").unwrap()));
        assert!(fields.get("missing").is_none());
        let projected = project(&fields, &["n".into(), "id".into(), "gone".into()]);
        assert_eq!(projected, r#"{"n":null,"id":1}"#);
    }

    #[test]
    fn changed_columns_compare_values_as_text() {
        let old = Fields::parse(r#"{"id":1,"name":"a","gone":2}"#).unwrap();
        let new = Fields::parse(r#"{"id":1,"name":"b","added":[1]}"#).unwrap();
        assert_eq!(changed_columns(&old, &new), ["name", "added", "gone"]);
    }

    #[test]
    fn changed_columns_of_a_wide_row_take_linear_time() {
        let row = |v: usize| {
            let fields: Vec<String> = (0..5000).map(|i| format!(r#""c{i}":{}"#, i * v)).collect();
            format!("{{{}}}", fields.join(","))
        };
        let (old, new) = (row(1), row(2));
        let started = std::time::Instant::now();
        let changed = changed_columns(&Fields::parse(&old).unwrap(), &Fields::parse(&new).unwrap());
        assert_eq!(changed.len(), 4999);
        // Quadratic lookups took seconds here; linear ones take milliseconds.
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
    }
}
