//! What one subscription asks for (`Params`, from a query string or a subscribe message) and
//! what it receives of each event (`Shape`: filter, projection, event types).
//!
//! With a filter, an update that moves a row into the filter is sent as `create`, one that
//! moves it out as `delete`, so a client's copy of the filtered rows stays exact; `events=`
//! applies to the type as sent. Frames are shared: an event that passes a shape unchanged
//! reuses the table-wide frame, and any other (type as sent, projection) pair is encoded once
//! per event and cached on the event for every subscriber of that shape.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::event::{ChangeEvent, Op, changed_columns};
use crate::filter::{self, Filter, FilterError, RawCondition};
use crate::hub::Entry;
use crate::sql::TableInfo;

/// A subscription request, parsed but not yet checked against the table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    /// Send the initial rows first (with `since`: only if the resume is impossible).
    pub snapshot: bool,
    /// Resume after this event's seq.
    pub since: Option<i64>,
    /// Columns to send in `data`/`old`.
    pub select: Option<Vec<String>>,
    /// Event types to send (as sent, after filter conversion); `None` is all.
    pub events: Option<Vec<Op>>,
    /// Row filter conditions, ANDed.
    pub filters: Vec<RawCondition>,
}

impl Params {
    /// Parses `key=value` pairs: the reserved keys, and `column=op.value` filters.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut params = Params::default();
        for (key, value) in pairs {
            match key.as_str() {
                "snapshot" => params.snapshot = parse_bool(key, value)?,
                "since" => {
                    let seq = value
                        .parse()
                        .map_err(|_| format!("since must be an event seq, not {value:?}"))?;
                    params.since = Some(seq);
                }
                "select" => {
                    let columns: Vec<String> =
                        value.split(',').map(|c| c.trim().to_owned()).collect();
                    if columns.iter().any(String::is_empty) {
                        return Err(format!("select must list columns, not {value:?}"));
                    }
                    params.select = Some(columns);
                }
                "events" => {
                    let mut ops = Vec::new();
                    for name in value.split(',') {
                        ops.push(match name.trim() {
                            "create" => Op::Create,
                            "update" => Op::Update,
                            "delete" => Op::Delete,
                            other => {
                                return Err(format!(
                                    "events takes create, update, delete; not {other:?}"
                                ));
                            }
                        });
                    }
                    params.events = Some(ops);
                }
                column => params
                    .filters
                    .push(filter::parse(column, value).map_err(|e| e.to_string())?),
            }
        }
        Ok(params)
    }

    /// The keys of `self` overridden by those `message` carries: its filter (if it has one)
    /// replaces the whole filter, its `select`/`events` replace those; `snapshot` and `since`
    /// are the message's own.
    pub fn overridden_by(&self, message: Params) -> Params {
        Params {
            snapshot: message.snapshot,
            since: message.since,
            select: message.select.or_else(|| self.select.clone()),
            events: message.events.or_else(|| self.events.clone()),
            filters: if message.filters.is_empty() {
                self.filters.clone()
            } else {
                message.filters
            },
        }
    }

    /// Whether the filter needs PostgreSQL to type its values.
    pub fn has_filters(&self) -> bool {
        !self.filters.is_empty()
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{key} must be true or false, not {value:?}")),
    }
}

/// The query keys carried by a subscribe message, as string pairs (`type` and `resource`
/// are the message's own).
pub fn message_pairs(value: &Value) -> Result<Vec<(String, String)>, String> {
    let Some(object) = value.as_object() else {
        return Err("Message must be a JSON object".into());
    };
    let mut pairs = Vec::new();
    for (key, v) in object {
        if key == "type" || key == "resource" {
            continue;
        }
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Bool(_) | Value::Number(_) => v.to_string(),
            _ => return Err(format!("{key} must be a string, number or boolean")),
        };
        pairs.push((key.clone(), text));
    }
    Ok(pairs)
}

/// Why a subscription's shape was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    /// A filter, column or value is wrong.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// `select` names a column the table does not have.
    #[error("Unknown column {0:?} in select")]
    UnknownSelect(String),
}

/// What a subscriber receives of each event.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// Rows must match this.
    pub filter: Filter,
    /// Columns of `data`/`old`, or all.
    select: Option<Arc<Vec<String>>>,
    /// Hash of `select`, the cache key of projected frames.
    select_key: u64,
    /// Which types (as sent) to send.
    events: [bool; 3],
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Create => 0,
        Op::Update => 1,
        Op::Delete => 2,
    }
}

impl Shape {
    /// Checks `params` against the table; `filter` comes from [`filter::compile`].
    pub fn new(table: &TableInfo, params: &Params, filter: Filter) -> Result<Shape, ShapeError> {
        if let Some(select) = &params.select {
            for column in select {
                if !table.columns.iter().any(|c| &c.name == column) {
                    return Err(ShapeError::UnknownSelect(column.clone()));
                }
            }
        }
        let mut events = [true; 3];
        if let Some(ops) = &params.events {
            events = [false; 3];
            for op in ops {
                events[op_index(*op)] = true;
            }
        }
        let select_key = params.select.as_ref().map_or(0, |s| {
            let mut h = DefaultHasher::new();
            s.hash(&mut h);
            h.finish() | 1
        });
        Ok(Shape {
            filter,
            select: params.select.clone().map(Arc::new),
            select_key,
            events,
        })
    }

    /// Projects a row to the selected columns.
    pub fn project(&self, row: Value) -> Value {
        match (&self.select, row) {
            (Some(select), Value::Object(mut map)) => {
                let mut out = Map::with_capacity(select.len());
                for column in select.iter() {
                    if let Some(v) = map.remove(column) {
                        out.insert(column.clone(), v);
                    }
                }
                Value::Object(out)
            }
            (_, row) => row,
        }
    }

    /// The frame this subscriber gets for `entry`, or `None` when it gets nothing.
    pub fn frame(&self, entry: &Entry) -> Option<Utf8Bytes> {
        let event = &entry.event;
        let sent = if self.filter.is_empty() {
            Some(event.op)
        } else {
            let matches =
                |row: &Option<Value>| row.as_ref().is_some_and(|r| self.filter.matches(r));
            match event.op {
                Op::Create => matches(&event.data).then_some(Op::Create),
                Op::Delete => matches(&event.old).then_some(Op::Delete),
                Op::Update => match (matches(&event.old), matches(&event.data)) {
                    (true, true) => Some(Op::Update),
                    (false, true) => Some(Op::Create),
                    (true, false) => Some(Op::Delete),
                    (false, false) => None,
                },
            }
        }?;
        if !self.events[op_index(sent)] {
            return None;
        }
        if sent == event.op && self.select.is_none() {
            return Some(entry.frame.clone());
        }
        Some(entry.shaped_frame(sent, self.select_key, || {
            self.encode(event, sent, &entry.resource)
        }))
    }

    fn encode(&self, event: &ChangeEvent, sent: Op, resource: &str) -> String {
        let mut shaped = event.clone();
        shaped.op = sent;
        match sent {
            Op::Create => shaped.old = None,
            Op::Delete => shaped.data = None,
            Op::Update => {}
        }
        let changed = match (&event.old, &event.data) {
            (Some(old), Some(new)) if sent == Op::Update => Some(changed_columns(old, new)),
            _ => None,
        };
        shaped.data = shaped.data.map(|d| self.project(d));
        shaped.old = shaped.old.map(|d| self.project(d));
        let changed = changed.map(|c| match &self.select {
            Some(select) => c.into_iter().filter(|col| select.contains(col)).collect(),
            None => c,
        });
        shaped.to_frame_with(resource, changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn params_parse_reserved_keys_and_filters() {
        let p = Params::from_pairs(&pairs(&[
            ("snapshot", "true"),
            ("since", "41"),
            ("select", "id,name"),
            ("events", "create,delete"),
            ("price", "gt.10"),
        ]))
        .unwrap();
        assert!(p.snapshot);
        assert_eq!(p.since, Some(41));
        assert_eq!(p.select, Some(vec!["id".into(), "name".into()]));
        assert_eq!(p.events, Some(vec![Op::Create, Op::Delete]));
        assert_eq!(p.filters.len(), 1);
        for bad in [
            ("since", "x"),
            ("snapshot", "maybe"),
            ("events", "upsert"),
            ("select", "a,,b"),
            ("price", "gt10"),
        ] {
            assert!(Params::from_pairs(&pairs(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subscribe_message_keys_become_pairs() {
        let v = serde_json::json!({"type": "subscribe", "resource": "items", "snapshot": true, "price": "gt.1"});
        let got = message_pairs(&v).unwrap();
        assert_eq!(got, pairs(&[("snapshot", "true"), ("price", "gt.1")]));
        assert!(message_pairs(&serde_json::json!({"type": "subscribe", "x": [1]})).is_err());
    }
}
