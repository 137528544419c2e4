//! Change events: what capture reads from the log and the wire format subscribers receive.
//!
//! Rows stay JSON text from the log to the socket: a frame is assembled from the raw `id`,
//! `data` and `old` texts PostgreSQL rendered, never parsed into a tree and re-serialized, so
//! any value PostgreSQL can store (nested to any depth, of any size) streams whole.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::row::{Fields, push_json_string};

/// The kind of a row change, named as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A row was inserted (or moved into a filter, or took a new key).
    Create,
    /// A row was updated.
    Update,
    /// A row was deleted (or moved out of a filter, or lost its old key).
    Delete,
}

impl Op {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// What one element of a log chunk's body says happened (see `sql/install.sql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOp {
    /// A row change.
    Change(Op),
    /// The table was truncated.
    Truncate,
    /// A partition of the table was truncated: its rows are gone, unlisted.
    PartitionTruncate,
    /// A relay's start marker (no table).
    Marker,
}

impl LogOp {
    fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "c" => LogOp::Change(Op::Create),
            "u" => LogOp::Change(Op::Update),
            "d" => LogOp::Change(Op::Delete),
            "t" => LogOp::Truncate,
            "p" => LogOp::PartitionTruncate,
            "m" => LogOp::Marker,
            _ => return None,
        })
    }
}

/// One event of a log chunk, borrowing its JSON texts from the chunk's body.
#[derive(Debug, Clone, Copy)]
pub struct LogEvent<'a> {
    /// Position in the log (assigned at the write, not at commit).
    pub seq: i64,
    /// What happened.
    pub op: LogOp,
    /// An update's second seq: the create's, when the update changed the key.
    pub seq2: Option<i64>,
    /// New row (create, update).
    pub data: Option<&'a RawValue>,
    /// Old row (update, delete).
    pub old: Option<&'a RawValue>,
}

/// Why a chunk body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not a JSON array of `[seq, op, id, data, old]`.
    #[error("Log chunk is not an array of events: {0}")]
    Malformed(#[from] serde_json::Error),
    /// An element names an op this relay does not know.
    #[error("Log chunk has an unknown op {0:?}")]
    UnknownOp(String),
}

/// Splits a chunk body (`[[seq, op, seq2, data, old], …]`) into its events, in body order.
pub fn parse_body(body: &str) -> Result<Vec<LogEvent<'_>>, BodyError> {
    type Element<'a> = (
        i64,
        &'a str,
        Option<i64>,
        Option<&'a RawValue>,
        Option<&'a RawValue>,
    );
    let mut elements: Vec<Element<'_>> = serde_json::from_str(body)?;
    // A chunk lists its events in seq order (the trigger aggregates them from a subquery
    // sorted by seq); should one ever come otherwise, seq order is restored here.
    if !elements.is_sorted_by_key(|e| e.0) {
        elements.sort_by_key(|e| e.0);
    }
    elements
        .into_iter()
        .map(|(seq, code, seq2, data, old)| {
            let op = LogOp::from_code(code).ok_or_else(|| BodyError::UnknownOp(code.into()))?;
            Ok(LogEvent {
                seq,
                op,
                seq2,
                data,
                old,
            })
        })
        .collect()
}

/// The key of a row (JSON text of an object) as the wire's `id`: the bare value of a
/// one-column key, an object of the key columns otherwise. `None` when a key column is missing.
pub fn key_of(row: &crate::row::Fields<'_>, keys: &[String]) -> Option<String> {
    if let [key] = keys {
        return row.get(key).map(|v| v.get().to_owned());
    }
    let mut out = String::from("{");
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        crate::row::push_json_string(&mut out, key);
        out.push(':');
        out.push_str(row.get(key)?.get());
    }
    out.push('}');
    Some(out)
}

/// The subscriber-facing name of a table: `items` in `public`, `schema.table` elsewhere.
pub fn resource_name(schema: &str, table: &str) -> String {
    if schema == "public" {
        table.to_owned()
    } else {
        format!("{schema}.{table}")
    }
}

/// The parts of a change frame.
#[derive(Debug, Clone, Copy)]
pub struct ChangeParts<'a> {
    /// Type as sent.
    pub op: Op,
    /// The resource name as a JSON string literal.
    pub resource: &'a str,
    /// Key, raw JSON.
    pub id: &'a str,
    /// New row, raw JSON (left out of deletes).
    pub data: Option<&'a str>,
    /// Old row, raw JSON (left out of creates).
    pub old: Option<&'a str>,
    /// Changed columns (updates only).
    pub changed: Option<&'a [String]>,
    /// Log position.
    pub seq: i64,
    /// Capture time, ISO 8601 (UTC), unquoted.
    pub ts: &'a str,
}

/// Encodes a change event:
/// `{"type":…,"resource":…,"id":…,"data":…,"old":…,"changed":[…],"seq":…,"ts":…}`.
pub fn change_frame(p: &ChangeParts<'_>) -> String {
    let size = p.resource.len()
        + p.id.len()
        + p.data.map_or(0, str::len)
        + p.old.map_or(0, str::len)
        + p.ts.len()
        + 96;
    let mut out = String::with_capacity(size);
    out.push_str(r#"{"type":""#);
    out.push_str(p.op.name());
    out.push_str(r#"","resource":"#);
    out.push_str(p.resource);
    out.push_str(r#","id":"#);
    out.push_str(p.id);
    if let Some(data) = p.data.filter(|_| p.op != Op::Delete) {
        out.push_str(r#","data":"#);
        out.push_str(data);
    }
    if let Some(old) = p.old.filter(|_| p.op != Op::Create) {
        out.push_str(r#","old":"#);
        out.push_str(old);
    }
    if let Some(changed) = p.changed.filter(|_| p.op == Op::Update) {
        out.push_str(r#","changed":["#);
        for (i, column) in changed.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, column);
        }
        out.push(']');
    }
    out.push_str(r#","seq":"#);
    out.push_str(&p.seq.to_string());
    out.push_str(r#","ts":""#);
    out.push_str(p.ts);
    out.push_str(r#""}"#);
    out
}

/// The fields of a change frame, for re-shaping it (filters, projections).
#[derive(Debug)]
pub struct FrameParts<'a> {
    /// Key.
    pub id: &'a RawValue,
    /// New row.
    pub data: Option<&'a RawValue>,
    /// Old row.
    pub old: Option<&'a RawValue>,
    /// Position.
    pub seq: i64,
    /// Capture time (unquoted).
    pub ts: &'a str,
}

impl<'a> FrameParts<'a> {
    /// Reads back a frame written by [`change_frame`].
    pub fn parse(frame: &'a str) -> Option<Self> {
        let fields = Fields::parse(frame).ok()?;
        let id = fields.get("id")?;
        let seq = fields.get("seq")?.get().parse().ok()?;
        let ts = fields.get("ts")?.get();
        Some(FrameParts {
            id,
            data: fields.get("data"),
            old: fields.get("old"),
            seq,
            ts: ts.strip_prefix('"')?.strip_suffix('"')?,
        })
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

    /// `{"type":"error","code":…,"message":…,"resource":…}`: a subscription's own error.
    pub fn resource_error(resource: &str, code: &str, message: &str) -> String {
        json!({"type": "error", "code": code, "message": message, "resource": resource}).to_string()
    }

    /// `{"type":"authenticated","role":…,"expires_at":…}`: an `auth` message was accepted.
    pub fn authenticated(role: &str, expires_at: Option<u64>) -> String {
        json!({"type": "authenticated", "role": role, "expires_at": expires_at}).to_string()
    }

    /// `{"type":"subscribed","resource":…,"key":[…]}`: `key` names the primary key columns,
    /// so that a client can key initial rows the way events carry `id`.
    pub fn subscribed(resource: &str, key: &[String]) -> String {
        json!({"type": "subscribed", "resource": resource, "key": key}).to_string()
    }

    /// `{"type":"unsubscribed","resource":…}`.
    pub fn unsubscribed(resource: &str) -> String {
        json!({"type": "unsubscribed", "resource": resource}).to_string()
    }

    /// `{"type":"reset","resource":…,"reason":…}`: the client's copy is stale.
    pub fn reset(resource: &str, reason: &str) -> String {
        json!({"type": "reset", "resource": resource, "reason": reason}).to_string()
    }

    /// `{"type":"truncate","resource":…,"seq":…,"ts":…}`: the table is empty.
    pub fn truncate(resource: &str, seq: i64, ts: &str) -> String {
        json!({"type": "truncate", "resource": resource, "seq": seq, "ts": ts}).to_string()
    }

    /// `{"type":"initial","resource":…,"data":[…],"done":…,"seq":…}` from rows already encoded
    /// as JSON; `seq` is the position to resume from after this initial data.
    pub fn initial(resource: &str, rows: &[String], done: bool, seq: Option<i64>) -> String {
        let resource = serde_json::Value::from(resource).to_string();
        let size = rows.iter().map(|r| r.len() + 1).sum::<usize>() + resource.len() + 80;
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
        if let Some(seq) = seq {
            out.push_str(r#","seq":"#);
            out.push_str(&seq.to_string());
        }
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn a_chunk_listed_out_of_seq_order_is_read_in_seq_order() {
        let body = r#"[[7, "c", null, {"id":2}, null], [5, "c", null, {"id":1}, null]]"#;
        let seqs: Vec<i64> = parse_body(body).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [5, 7]);
    }

    #[test]
    fn bodies_split_into_events_with_raw_rows() {
        let body = r#"[[3, "d", null, null, {"id":1,"name":"a"}], [4, "u", 5, {"id":2}, {"id":1}], [6, "t", null, null, null]]"#;
        let events = parse_body(body).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].op, LogOp::Change(Op::Delete));
        assert!(events[0].data.is_none());
        assert_eq!(events[0].old.unwrap().get(), r#"{"id":1,"name":"a"}"#);
        assert_eq!((events[1].seq, events[1].seq2), (4, Some(5)));
        assert_eq!(events[2].op, LogOp::Truncate);
        let row = crate::row::Fields::parse(r#"{"a":1,"b":"x","c":[1]}"#).unwrap();
        assert_eq!(key_of(&row, &["b".into()]).unwrap(), r#""x""#);
        assert_eq!(
            key_of(&row, &["c".into(), "a".into()]).unwrap(),
            r#"{"c":[1],"a":1}"#
        );
        assert!(key_of(&row, &["z".into()]).is_none());
        for bad in [
            "",
            "{}",
            r#"[[1, "x", 1, null, null]]"#,
            r#"[["a", "c", 1]]"#,
        ] {
            assert!(parse_body(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frames_have_the_design_fields_and_read_back() {
        let changed = vec!["name".to_owned()];
        let frame = change_frame(&ChangeParts {
            op: Op::Update,
            resource: r#""items""#,
            id: "1",
            data: Some(r#"{"id":1,"name":"orange"}"#),
            old: Some(r#"{"id":1,"name":"apple"}"#),
            changed: Some(&changed),
            seq: 42,
            ts: "2026-11-27T06:21:29.438585+00:00",
        });
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            v,
            json!({"type": "update", "resource": "items", "id": 1,
                   "data": {"id": 1, "name": "orange"}, "old": {"id": 1, "name": "apple"},
                   "changed": ["name"], "seq": 42, "ts": "2026-11-27T06:21:29.438585+00:00"})
        );
        let parts = FrameParts::parse(&frame).unwrap();
        assert_eq!((parts.seq, parts.id.get()), (42, "1"));
        assert_eq!(parts.ts, "2026-11-27T06:21:29.438585+00:00");
        let delete = change_frame(&ChangeParts {
            op: Op::Delete,
            data: Some("{}"),
            changed: None,
            ..ChangeParts {
                op: Op::Update,
                resource: r#""items""#,
                id: "1",
                data: None,
                old: Some(r#"{"id":1}"#),
                changed: None,
                seq: 1,
                ts: "t",
            }
        });
        let v: Value = serde_json::from_str(&delete).unwrap();
        assert!(v.get("data").is_none() && v.get("changed").is_none());
    }

    #[test]
    fn resource_names_omit_public_only() {
        assert_eq!(resource_name("public", "items"), "items");
        assert_eq!(resource_name("shop", "orders"), "shop.orders");
    }

    #[test]
    fn initial_message_is_valid_json() {
        let rows = vec![r#"{"id":1}"#.to_owned(), r#"{"id":2}"#.to_owned()];
        let v: Value =
            serde_json::from_str(&control::initial("a\"b", &rows, true, Some(7))).unwrap();
        assert_eq!(
            v,
            json!({"type":"initial","resource":"a\"b","data":[{"id":1},{"id":2}],"done":true,"seq":7})
        );
    }
}
