//! What one subscription asks for (`Params`, from a query string or a subscribe message) and
//! what it receives of each event (`Shape`: filter, projection, event types).
//!
//! With a filter, an update that moves a row into the filter is sent as `create`, one that
//! moves it out as `delete`, so a client's copy of the filtered rows stays exact; `events=`
//! applies to the type as sent. A projection (`select`) always keeps the primary key columns,
//! so every row a client holds can be matched by later events. Frames are shared: an event
//! that passes a shape unchanged reuses the table-wide frame, and any other (type as sent,
//! projection) pair is encoded once per event and cached beside the ring for every subscriber of
//! that shape (projections are canonical: the same columns in any order are one shape).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::event::{ChangeParts, FrameParts, Op, change_frame};
use crate::filter::{self, Filter, FilterError, RawFilter};
use crate::hub::{Entry, EntryKind, Topic};
use crate::row::{Fields, changed_columns, project};
use crate::sql::TableInfo;

/// Event types a subscription can ask for (`events=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// A row change sent as this type.
    Change(Op),
    /// A truncate.
    Truncate,
}

/// A subscription request, parsed but not yet checked against the table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    /// Send the initial rows first (with `since`: only if the resume is impossible).
    pub snapshot: bool,
    /// Resume after this event's seq.
    pub since: Option<i64>,
    /// Columns to send in `data`/`old` (the key columns are always sent); `None` is all.
    pub select: Option<Vec<String>>,
    /// Event types to send (as sent, after filter conversion); `None` is all.
    pub events: Option<Vec<EventType>>,
    /// Row filters (conditions and `or`/`and` trees), ANDed.
    pub filters: Vec<RawFilter>,
    /// Receive events that arrive together as `batch` frames (`None`: as before, i.e. not).
    pub batch: Option<bool>,
}

impl Params {
    /// Parses `key=value` pairs: the reserved keys, and `column=op.value` filters.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut params = Params::default();
        for (key, value) in pairs {
            match key.as_str() {
                "snapshot" => params.snapshot = parse_bool(key, value)?,
                "batch" => params.batch = Some(parse_bool(key, value)?),
                "since" => {
                    let seq = value
                        .parse()
                        .map_err(|_| format!("since must be an event seq, not {value:?}"))?;
                    params.since = Some(seq);
                }
                "select" => {
                    if value.trim() == "*" {
                        params.select = None;
                        continue;
                    }
                    let columns: Vec<String> =
                        value.split(',').map(|c| c.trim().to_owned()).collect();
                    if columns.iter().any(String::is_empty) {
                        return Err(format!("select must list columns, not {value:?}"));
                    }
                    params.select = Some(columns);
                }
                "events" => {
                    let mut types = Vec::new();
                    for name in value.split(',') {
                        types.push(match name.trim() {
                            "create" => EventType::Change(Op::Create),
                            "update" => EventType::Change(Op::Update),
                            "delete" => EventType::Change(Op::Delete),
                            "truncate" => EventType::Truncate,
                            other => {
                                return Err(format!(
                                    "events takes create, update, delete, truncate; not {other:?}"
                                ));
                            }
                        });
                    }
                    params.events = Some(types);
                }
                column => params
                    .filters
                    .push(filter::parse_pair(column, value).map_err(|e| e.to_string())?),
            }
        }
        Ok(params)
    }

    /// Parses the query keys a subscribe message carries (see [`message_pairs`]).
    pub fn from_message(message: &Value) -> Result<Self, String> {
        message_pairs(message).and_then(|pairs| Params::from_pairs(&pairs))
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
            batch: message.batch.or(self.batch),
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

/// What a subscriber gets of one entry.
#[derive(Debug)]
pub enum Delivery {
    /// This frame.
    Send(Utf8Bytes),
    /// Nothing.
    Skip,
    /// The subscription cannot go on (a column it names changed): tell the client why.
    End(String),
}

/// What a subscriber receives of each event.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// Rows must match this (the subscriber's own filter).
    pub filter: Filter,
    /// And this (the caller's policy): a row that leaves it is sent as a delete carrying its
    /// key only.
    pub policy: Filter,
    /// Columns of `data`/`old` (key columns and the selected or visible ones, in table order),
    /// or all.
    projection: Option<Arc<Vec<String>>>,
    /// Hash of `projection`, part of the cache key of shaped frames.
    projection_key: u64,
    /// The key columns: what a delete for a row leaving the policy carries.
    key_only: Arc<Vec<String>>,
    /// Which types (as sent) to send: create, update, delete, truncate.
    events: [bool; 4],
    /// Every column the filters or `select` name (a change to one ends the subscription).
    named: Vec<String>,
}

/// How an event is sent to one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// As this type, projected.
    As(Op),
    /// As a delete carrying the key only (the row left the caller's policy).
    KeyOnlyDelete,
}

fn hash_of(columns: &[String]) -> u64 {
    let mut h = DefaultHasher::new();
    columns.hash(&mut h);
    h.finish()
}

fn type_index(t: EventType) -> usize {
    match t {
        EventType::Change(Op::Create) => 0,
        EventType::Change(Op::Update) => 1,
        EventType::Change(Op::Delete) => 2,
        EventType::Truncate => 3,
    }
}

impl Shape {
    /// Checks `params` against the table; `filter` comes from [`filter::compile`]. `policy`
    /// and `visible` are the caller's (see [`crate::access::Access`]): a column it may not see
    /// is, in `select`, an unknown column.
    pub fn new(
        table: &TableInfo,
        params: &Params,
        filter: Filter,
        policy: Filter,
        visible: Option<&[String]>,
    ) -> Result<Shape, ShapeError> {
        let sees = |c: &String| visible.is_none_or(|v| v.contains(c));
        let mut named: Vec<String> = filter::conditions(&params.filters)
            .map(|c| c.column.clone())
            .collect();
        named.extend(policy.columns().map(str::to_owned));
        let projection = match &params.select {
            None => visible.map(|_| {
                let columns: Vec<String> = table
                    .columns
                    .iter()
                    .map(|c| &c.name)
                    .filter(|c| table.key_columns.contains(c) || sees(c))
                    .cloned()
                    .collect();
                Arc::new(columns)
            }),
            Some(select) => {
                for column in select {
                    if !table.columns.iter().any(|c| &c.name == column) || !sees(column) {
                        return Err(ShapeError::UnknownSelect(column.clone()));
                    }
                }
                named.extend(select.iter().cloned());
                let columns: Vec<String> = table
                    .columns
                    .iter()
                    .map(|c| &c.name)
                    .filter(|c| table.key_columns.contains(c) || select.contains(c))
                    .cloned()
                    .collect();
                Some(Arc::new(columns))
            }
        };
        named.sort();
        named.dedup();
        let mut events = [true; 4];
        if let Some(types) = &params.events {
            events = [false; 4];
            for t in types {
                events[type_index(*t)] = true;
            }
        }
        let projection_key = projection.as_ref().map_or(0, |p| hash_of(p));
        Ok(Shape {
            filter,
            policy,
            projection,
            projection_key,
            key_only: Arc::new(table.key_columns.clone()),
            events,
            named,
        })
    }

    /// Both filters as one SQL condition (initial data).
    pub fn to_sql(&self, params: &mut Vec<Box<dyn ToSql + Sync + Send>>) -> String {
        self.filter.clone().and(self.policy.clone()).to_sql(params)
    }

    /// The row as this subscriber sees it (initial data): projected.
    pub fn project_text(&self, row: &str) -> String {
        match &self.projection {
            None => row.to_owned(),
            Some(columns) => match Fields::parse(row) {
                Ok(fields) => project(&fields, columns),
                Err(_) => row.to_owned(),
            },
        }
    }

    /// What this subscriber gets of `entry`.
    pub fn deliver(&self, entry: &Entry, topic: &Topic) -> Delivery {
        match &entry.kind {
            EntryKind::Reset => Delivery::Send(entry.frame.clone()),
            EntryKind::Truncate if self.events[3] => Delivery::Send(entry.frame.clone()),
            EntryKind::Truncate => Delivery::Skip,
            EntryKind::Columns(change) => {
                match self.named.iter().find(|c| change.columns.contains(c)) {
                    Some(column) => Delivery::End(format!(
                        "Column {column:?} of {} was dropped, renamed or retyped; subscribe again",
                        topic.resource()
                    )),
                    // Rows the change did not rewrite differ from the client's copy now (a
                    // column more or less, another type): it starts over.
                    None => Delivery::Send(entry.frame.clone()),
                }
            }
            EntryKind::Change(op) => match self.change(*op, entry, topic) {
                Some(frame) => Delivery::Send(frame),
                None => Delivery::Skip,
            },
        }
    }

    fn change(&self, op: Op, entry: &Entry, topic: &Topic) -> Option<Utf8Bytes> {
        let filtered = !self.filter.is_empty() || !self.policy.is_empty();
        if !filtered && self.projection.is_none() {
            return self.events[type_index(EventType::Change(op))].then(|| entry.frame.clone());
        }
        let parts = FrameParts::parse(&entry.frame)?;
        let sent = if filtered {
            // (in the policy, in the subscriber's filter) for a row; a row that is not there
            // (or not an object) is in neither.
            let place = |row: Option<&serde_json::value::RawValue>| {
                row.and_then(|r| Fields::parse(r.get()).ok())
                    .map_or((false, false), |fields| {
                        let allowed = self.policy.matches_fields(&fields);
                        (allowed, allowed && self.filter.matches_fields(&fields))
                    })
            };
            match op {
                Op::Create => place(parts.data).1.then_some(Sent::As(Op::Create))?,
                Op::Delete => place(parts.old).1.then_some(Sent::As(Op::Delete))?,
                Op::Update => match (place(parts.old).1, place(parts.data)) {
                    (true, (_, true)) => Sent::As(Op::Update),
                    (false, (_, true)) => Sent::As(Op::Create),
                    (true, (true, false)) => Sent::As(Op::Delete),
                    (true, (false, _)) => Sent::KeyOnlyDelete,
                    (false, (_, false)) => return None,
                },
            }
        } else {
            Sent::As(op)
        };
        let as_type = match sent {
            Sent::As(op) => op,
            Sent::KeyOnlyDelete => Op::Delete,
        };
        if !self.events[type_index(EventType::Change(as_type))] {
            return None;
        }
        if sent == Sent::As(op) && self.projection.is_none() {
            return Some(entry.frame.clone());
        }
        let (projection_key, variant) = match sent {
            Sent::As(op) => (
                self.projection_key,
                type_index(EventType::Change(op)) as u64 + 1,
            ),
            Sent::KeyOnlyDelete => (hash_of(&self.key_only), 0x4b),
        };
        let key = (projection_key ^ variant).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Some(entry.shaped_frame(topic, key, || self.encode(&parts, sent, topic)))
    }

    fn encode(&self, parts: &FrameParts<'_>, sent: Sent, topic: &Topic) -> String {
        let projection = match sent {
            Sent::As(_) => self.projection.as_deref(),
            Sent::KeyOnlyDelete => Some(&*self.key_only),
        };
        let shape_row = |row: Option<&serde_json::value::RawValue>| -> Option<String> {
            let row = row?;
            Some(match projection {
                None => row.get().to_owned(),
                Some(columns) => match Fields::parse(row.get()) {
                    Ok(fields) => project(&fields, columns),
                    Err(_) => row.get().to_owned(),
                },
            })
        };
        let op = match sent {
            Sent::As(op) => op,
            Sent::KeyOnlyDelete => Op::Delete,
        };
        let data = shape_row(parts.data).filter(|_| op != Op::Delete);
        let old = match sent {
            // The key is the same in old and new (a key change arrives as delete + create).
            Sent::KeyOnlyDelete => shape_row(parts.old).or_else(|| shape_row(parts.data)),
            Sent::As(_) => shape_row(parts.old).filter(|_| op != Op::Create),
        };
        let changed = match (&old, &data) {
            (Some(old), Some(new)) if op == Op::Update => {
                match (Fields::parse(old), Fields::parse(new)) {
                    (Ok(old), Ok(new)) => Some(changed_columns(&old, &new)),
                    _ => Some(Vec::new()),
                }
            }
            _ => None,
        };
        change_frame(&ChangeParts {
            op,
            resource: topic.resource_json(),
            id: parts.id.get(),
            data: data.as_deref(),
            old: old.as_deref(),
            changed: changed.as_deref(),
            seq: parts.seq,
            ts: parts.ts,
        })
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
            ("events", "create,delete,truncate"),
            ("price", "gt.10"),
        ]))
        .unwrap();
        assert!(p.snapshot);
        assert_eq!(p.since, Some(41));
        assert_eq!(p.select, Some(vec!["id".into(), "name".into()]));
        assert_eq!(
            p.events,
            Some(vec![
                EventType::Change(Op::Create),
                EventType::Change(Op::Delete),
                EventType::Truncate
            ])
        );
        assert_eq!(p.filters.len(), 1);
        assert_eq!(
            Params::from_pairs(&pairs(&[("select", "*")]))
                .unwrap()
                .select,
            None
        );
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
