//! A client's copy of a table, kept the way the README tells clients to: initial rows, then
//! events applied by key; `truncate` empties it, `reset` says it is stale.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::support::{TestDb, Ws};

/// What applying a message asks of the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep reading.
    Continue,
    /// The copy is stale: subscribe again with initial data.
    Resubscribe(String),
}

/// Rows by key (the key's JSON text).
#[derive(Debug, Default, Clone)]
pub struct Copy {
    /// Key columns, to key initial rows.
    pub keys: Vec<String>,
    pub rows: BTreeMap<String, Value>,
    /// The position to resume from: the seq of the last event received (or of the initial
    /// data).
    pub seq: Option<i64>,
    /// True between `initial` messages of one snapshot.
    in_initial: bool,
}

/// The key of a row as the relay sends it in `id`: the bare value, or an object.
pub fn key_of(keys: &[String], row: &Value) -> String {
    if keys.len() == 1 {
        row[&keys[0]].to_string()
    } else {
        let object: serde_json::Map<String, Value> =
            keys.iter().map(|k| (k.clone(), row[k].clone())).collect();
        Value::Object(object).to_string()
    }
}

impl Copy {
    pub fn new(keys: &[&str]) -> Self {
        Copy {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            ..Copy::default()
        }
    }

    /// Applies one server message.
    pub fn apply(&mut self, message: &Value) -> Next {
        let kind = message["type"].as_str().unwrap_or_default();
        if kind != "initial" {
            self.in_initial = false;
        }
        // A resume may repeat events this copy has: they are applied again, in order (a
        // replay is a suffix of the stream: every repeated event is followed by all later
        // changes of its row), so the copy ends exact. Skipping repeats by seq would not.
        if let Some(seq) = message["seq"].as_i64()
            && matches!(kind, "create" | "update" | "delete" | "truncate")
        {
            self.seq = Some(seq);
        }
        match kind {
            "initial" => {
                if !self.in_initial {
                    // Events received before initial data are superseded by it.
                    self.rows.clear();
                    self.in_initial = true;
                }
                for row in message["data"].as_array().expect("initial rows") {
                    self.rows.insert(key_of(&self.keys, row), row.clone());
                }
                if message["done"] == true {
                    self.in_initial = false;
                    self.seq = message["seq"].as_i64();
                }
            }
            "create" | "update" => {
                self.rows
                    .insert(message["id"].to_string(), message["data"].clone());
            }
            "delete" => {
                self.rows.remove(&message["id"].to_string());
            }
            "truncate" => self.rows.clear(),
            "reset" => {
                return Next::Resubscribe(message["reason"].as_str().unwrap_or("").to_owned());
            }
            "subscribed" | "pong" => {}
            // (Initial data that could not be read, during a database restart: the socket
            // closes next, and the client reconnects.)
            "error" if message["code"] == "internal" => {}
            // The subscribe that followed a reset could not reach the database (it restarts):
            // asked to try again, the client subscribes again.
            "error" if message["code"] == "unavailable" => {
                return Next::Resubscribe("unavailable".to_owned());
            }
            other => panic!("unexpected message {other}: {message}"),
        }
        Next::Continue
    }
}

/// The table's rows as the relay renders them, by key.
pub async fn table_rows(db: &TestDb, table: &str, keys: &[&str]) -> BTreeMap<String, Value> {
    let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    db.client()
        .await
        .query(&format!("select to_json(t.*)::text from {table} t"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let row: Value = serde_json::from_str(r.get::<_, &str>(0)).unwrap();
            (key_of(&keys, &row), row)
        })
        .collect()
}

/// Reads and applies messages until the copy equals `expected` (fails after the step limit).
pub async fn read_until_equal(ws: &mut Ws, copy: &mut Copy, expected: &BTreeMap<String, Value>) {
    while &copy.rows != expected {
        let message = ws.next_json().await;
        if let Next::Resubscribe(reason) = copy.apply(&message) {
            panic!("unexpected reset ({reason}) while catching up");
        }
    }
}
