//! Change events: what the capture task decodes and what subscribers receive on the wire.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kind of a row change, named as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A row was inserted.
    Create,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
}

/// One row change, as rendered by `pgrelay.event_json` in `sql/install.sql`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChangeEvent {
    /// Position in `pgrelay.changes`: assigned at insert, so not in commit order.
    pub seq: i64,
    /// The writer's transaction id (`xid8`); decides visibility in a snapshot.
    #[serde(deserialize_with = "xid_from_text")]
    pub xid: u64,
    /// When the trigger captured the change (ISO 8601, from `clock_timestamp()`).
    pub ts: String,
    /// Schema of the changed table.
    pub schema: String,
    /// Name of the changed table.
    pub table: String,
    /// Kind of change.
    pub op: Op,
    /// Primary key: the bare value, or an object for a composite key.
    pub id: Value,
    /// New row (create, update).
    #[serde(default)]
    pub data: Option<Value>,
    /// Old row (update, delete).
    #[serde(default)]
    pub old: Option<Value>,
}

fn xid_from_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// The subscriber-facing name of a table: `items` in `public`, `schema.table` elsewhere.
pub fn resource_name(schema: &str, table: &str) -> String {
    if schema == "public" {
        table.to_owned()
    } else {
        format!("{schema}.{table}")
    }
}

/// The columns whose values differ between `old` and `new` (in `new`'s key order).
pub fn changed_columns(old: &Value, new: &Value) -> Vec<String> {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        return Vec::new();
    };
    let mut changed: Vec<String> = new
        .iter()
        .filter(|(k, v)| old.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    // A column that exists only in the old row (dropped in between) also changed.
    changed.extend(
        old.keys()
            .filter(|k| !new.contains_key(k.as_str()))
            .cloned(),
    );
    changed
}

/// Wire form of a change event (DESIGN.md, "WebSocket protocol").
#[derive(Serialize)]
struct WireEvent<'a> {
    #[serde(rename = "type")]
    kind: Op,
    resource: &'a str,
    id: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changed: Option<Vec<String>>,
    seq: i64,
    ts: &'a str,
}

impl ChangeEvent {
    /// The subscriber-facing table name of this event.
    pub fn resource(&self) -> String {
        resource_name(&self.schema, &self.table)
    }

    /// Encodes the event once, as the JSON text frame every subscriber of the table receives.
    pub fn to_frame(&self, resource: &str) -> String {
        let changed = match (self.op, &self.old, &self.data) {
            (Op::Update, Some(old), Some(new)) => Some(changed_columns(old, new)),
            (Op::Update, _, _) => Some(Vec::new()),
            _ => None,
        };
        self.to_frame_with(resource, changed)
    }

    /// Encodes the event with a given `changed` list (`None` leaves the field out).
    pub fn to_frame_with(&self, resource: &str, changed: Option<Vec<String>>) -> String {
        let wire = WireEvent {
            kind: self.op,
            resource,
            id: &self.id,
            data: self.data.as_ref().filter(|_| self.op != Op::Delete),
            old: self.old.as_ref().filter(|_| self.op != Op::Create),
            changed,
            seq: self.seq,
            ts: &self.ts,
        };
        // Serializing borrowed JSON values into a Vec cannot fail: every map key is a string.
        serde_json::to_string(&wire).expect("a JSON value always serializes")
    }
}

/// Messages the server sends besides change events.
pub mod control {
    use serde_json::json;

    /// `{"type":"pong"}`.
    pub fn pong() -> String {
        json!({"type": "pong"}).to_string()
    }

    /// `{"type":"error","code":…,"message":…}`.
    pub fn error(code: &str, message: &str) -> String {
        json!({"type": "error", "code": code, "message": message}).to_string()
    }

    /// `{"type":"subscribed","resource":…}`.
    pub fn subscribed(resource: &str) -> String {
        json!({"type": "subscribed", "resource": resource}).to_string()
    }

    /// `{"type":"unsubscribed","resource":…}`.
    pub fn unsubscribed(resource: &str) -> String {
        json!({"type": "unsubscribed", "resource": resource}).to_string()
    }

    /// `{"type":"reset","resource":…,"reason":…}`: the client's copy is stale.
    pub fn reset(resource: &str, reason: &str) -> String {
        json!({"type": "reset", "resource": resource, "reason": reason}).to_string()
    }

    /// `{"type":"initial","resource":…,"data":[…],"done":…}` from rows already encoded as JSON.
    pub fn initial(resource: &str, rows: &[String], done: bool) -> String {
        let resource = serde_json::Value::from(resource).to_string();
        let size = rows.iter().map(|r| r.len() + 1).sum::<usize>() + resource.len() + 64;
        let mut out = String::with_capacity(size);
        out.push_str(r#"{"type":"initial","resource":"#);
        out.push_str(&resource);
        out.push_str(r#","data":["#);
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(row);
        }
        out.push_str(r#"],"done":"#);
        out.push_str(if done { "true" } else { "false" });
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn update_event() -> ChangeEvent {
        serde_json::from_value(json!({
            "seq": 42, "xid": "761", "ts": "2026-11-27T06:21:29.438585+00:00",
            "schema": "public", "table": "items", "op": "update", "id": 1,
            "data": {"id": 1, "name": "orange", "price": 12.0},
            "old": {"id": 1, "name": "apple", "price": 10.5}
        }))
        .unwrap()
    }

    #[test]
    fn update_frame_has_the_design_fields_and_changed_columns() {
        let frame = update_event().to_frame("items");
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            v,
            json!({"type": "update", "resource": "items", "id": 1,
                   "data": {"id": 1, "name": "orange", "price": 12.0},
                   "old": {"id": 1, "name": "apple", "price": 10.5},
                   "changed": ["name", "price"], "seq": 42,
                   "ts": "2026-11-27T06:21:29.438585+00:00"})
        );
    }

    #[test]
    fn delete_frame_has_old_and_no_data() {
        let mut e = update_event();
        e.op = Op::Delete;
        e.data = None;
        let v: Value = serde_json::from_str(&e.to_frame("items")).unwrap();
        assert_eq!(v["type"], "delete");
        assert!(v.get("data").is_none());
        assert!(v.get("changed").is_none());
        assert_eq!(v["old"]["name"], "apple");
    }

    #[test]
    fn resource_names_omit_public_only() {
        assert_eq!(resource_name("public", "items"), "items");
        assert_eq!(resource_name("shop", "orders"), "shop.orders");
    }

    #[test]
    fn initial_message_is_valid_json() {
        let rows = vec![r#"{"id":1}"#.to_owned(), r#"{"id":2}"#.to_owned()];
        let v: Value = serde_json::from_str(&control::initial("a\"b", &rows, true)).unwrap();
        assert_eq!(
            v,
            json!({"type":"initial","resource":"a\"b","data":[{"id":1},{"id":2}],"done":true})
        );
    }

    #[test]
    fn xid_must_be_a_number() {
        let bad = json!({"seq": 1, "xid": "x", "ts": "", "schema": "s", "table": "t",
                         "op": "create", "id": 1});
        assert!(serde_json::from_value::<ChangeEvent>(bad).is_err());
    }
}
