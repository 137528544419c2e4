//! Initial data and the gap-free, duplicate-free handoff to the live stream.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Relay, TestDb, Ws, within};

const ITEMS: &str = "create table items(id serial primary key, name text, price numeric)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_sends_initial_rows_then_live_events() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items(name, price) values ('a', 1), ('b', 2)")
        .await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    ws.send_json(json!({"type": "subscribe"})).await;
    let rows = ws.initial_rows().await;
    assert_eq!(
        rows,
        vec![
            json!({"id": 1, "name": "a", "price": 1}),
            json!({"id": 2, "name": "b", "price": 2})
        ]
    );
    db.exec("insert into items(name, price) values ('c', 3)")
        .await;
    let e = ws.next_json().await;
    assert_eq!(
        (e["type"].as_str(), e["id"].as_i64()),
        (Some("create"), Some(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_true_sends_initial_rows_in_several_messages() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items(name) select 'n' || g from generate_series(1, 2500) g")
        .await;
    let relay = Relay::start_with(&db, &["items"], |c| c.snapshot_batch_rows = 1000).await;
    let mut ws = relay.ws("/ws/items?snapshot=true").await;
    let mut messages = Vec::new();
    loop {
        let m = ws.next_json().await;
        assert_eq!(m["type"], "initial");
        assert_eq!(m["resource"], "items");
        let done = m["done"] == true;
        messages.push(m);
        if done {
            break;
        }
    }
    let sizes: Vec<usize> = messages
        .iter()
        .map(|m| m["data"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [1000, 1000, 500]);
    assert!(messages[..2].iter().all(|m| m["done"] == false));
    let ids: Vec<i64> = messages
        .iter()
        .flat_map(|m| {
            m["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(ids, (1..=2500).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_table_sends_one_done_message() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items?snapshot=true").await;
    let initial = ws.next_json().await;
    assert!(
        initial["seq"].is_i64(),
        "initial data carries a position: {initial}"
    );
    assert_eq!(
        initial,
        json!({"type": "initial", "resource": "items", "data": [], "done": true,
               "seq": initial["seq"]})
    );
}

/// A client's copy of the table: initial rows, then events applied strictly.
struct Copy {
    rows: BTreeMap<i64, Value>,
    initial_started: bool,
    initial_done: bool,
}

impl Copy {
    fn apply(&mut self, m: &Value) {
        let id = || m["id"].as_i64().expect("integer id");
        match m["type"].as_str().unwrap() {
            "initial" => {
                assert!(!self.initial_done, "initial data after it was done");
                self.initial_started = true;
                for row in m["data"].as_array().unwrap() {
                    let id = row["id"].as_i64().unwrap();
                    assert!(
                        self.rows.insert(id, row.clone()).is_none(),
                        "row {id} twice in initial data"
                    );
                }
                self.initial_done = m["done"] == true;
            }
            // Events before the initial data are superseded by it.
            _ if !self.initial_started => {}
            "create" => {
                assert!(self.initial_done, "event before initial data finished");
                assert!(
                    self.rows.insert(id(), m["data"].clone()).is_none(),
                    "duplicate create {m}"
                );
            }
            "update" => {
                assert!(
                    self.rows.contains_key(&id()),
                    "update of a row not held: {m}"
                );
                self.rows.insert(id(), m["data"].clone());
            }
            "delete" => {
                assert!(
                    self.rows.remove(&id()).is_some(),
                    "delete of a row not held: {m}"
                );
            }
            "truncate" => {
                assert!(self.initial_done, "event before initial data finished");
                self.rows.clear();
            }
            other => panic!("unexpected message type {other}: {m}"),
        }
    }
}

async fn table_rows(db: &TestDb) -> BTreeMap<i64, Value> {
    let client = db.client().await;
    client
        .query("select id, to_jsonb(t) from items t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (i64::from(r.get::<_, i32>(0)), r.get::<_, Value>(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_staggered_subscribers_end_holding_exactly_the_tables_rows() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items(name, price) select 'seed' || g, g from generate_series(1, 200) g")
        .await;
    let relay = Relay::start(&db, &["items"]).await;

    // The writer inserts, updates and deletes in small transactions while clients join.
    let writer_client = db.client().await;
    let writer = tokio::spawn(async move {
        for i in 0..600i32 {
            let sql = match i % 3 {
                0 => "insert into items(name, price) values ('w', $1::int)",
                1 => {
                    "update items set price = price + 1, name = 'u' where id = (select max(id) - ($1::int % 7) from items)"
                }
                _ => "delete from items where id = (select min(id) + ($1::int % 5) from items)",
            };
            writer_client
                .execute(sql, &[&i])
                .await
                .expect("writer statement");
            if i % 50 == 0 {
                writer_client
                    .execute("insert into items(name, price) select 'bulk', g from generate_series(1, 40) g", &[])
                    .await
                    .expect("bulk insert");
            }
            // A truncate is handed over like any other change (alone, and with rows after it
            // in the same transaction).
            if i % 200 == 120 {
                writer_client
                    .batch_execute("truncate items")
                    .await
                    .expect("truncate");
            }
            if i % 200 == 170 {
                writer_client
                    .batch_execute("begin; truncate items; insert into items(name, price) select 'after', g from generate_series(1, 30) g; commit")
                    .await
                    .expect("truncate and insert");
            }
        }
    });

    let mut clients: Vec<(Ws, Copy)> = Vec::new();
    for k in 0..16 {
        let mut ws = relay.ws("/ws/items").await;
        ws.send_json(json!({"type": "subscribe"})).await;
        clients.push((
            ws,
            Copy {
                rows: BTreeMap::new(),
                initial_started: false,
                initial_done: false,
            },
        ));
        // Stagger the joins across the writer's run.
        let wait = Duration::from_millis(40 + 10 * k);
        let deadline = tokio::time::Instant::now() + wait;
        for (ws, copy) in clients.iter_mut() {
            while let Ok(frame) = tokio::time::timeout_at(deadline, ws.next_json()).await {
                copy.apply(&frame);
            }
        }
    }
    within(Duration::from_secs(60), writer).await.unwrap();
    db.exec("insert into items(name, price) values ('sentinel', -1)")
        .await;
    let expected = table_rows(&db).await;
    for (ws, copy) in clients.iter_mut() {
        loop {
            let m = ws.next_json().await;
            copy.apply(&m);
            if m["type"] == "create" && m["data"]["name"] == "sentinel" {
                break;
            }
        }
        assert_eq!(
            copy.rows, expected,
            "a client's copy differs from the table"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_while_the_relay_drains_a_big_insert_has_each_row_once() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;

    // Hold capture back deterministically: a session queues for an exclusive lock on the log
    // behind the writer, so it gets the lock the moment the writer commits, before capture
    // can read the 20,000 rows the notification points to.
    let locker = crate::support::commit_with_capture_held_back(
        &db,
        "insert into items(name) select 'n' || g from generate_series(1, 20000) g",
    )
    .await;

    let mut ws = relay.ws("/ws/items?snapshot=true").await;
    let rows = ws.initial_rows().await;
    assert_eq!(rows.len(), 20_000);
    let (_, metrics) = crate::support::http_get(relay.addr, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("pgrelay_events_captured_total 0"),
        "capture was held back: {metrics}"
    );

    locker.batch_execute("commit").await.unwrap();
    db.exec("insert into items(name) values ('sentinel')").await;
    let next = ws.next_json().await;
    assert_eq!(
        (next["type"].as_str(), next["data"]["name"].as_str()),
        (Some("create"), Some("sentinel")),
        "no change event for rows already in the initial data"
    );
    let (_, metrics) = crate::support::http_get(relay.addr, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("pgrelay_events_captured_total 20001"),
        "{metrics}"
    );
}
