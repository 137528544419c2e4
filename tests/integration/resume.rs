//! Resume with `since` (DESIGN.md guarantee 4): replay what the relay holds, or say `reset`.

use serde_json::{Value, json};

use crate::support::{Relay, TestDb};

const ITEMS: &str = "create table items(id serial primary key, name text)";

async fn insert_numbered(db: &TestDb, from: i32, to: i32) {
    let client = db.client().await;
    for i in from..to {
        client
            .execute("insert into items(name) values ($1)", &[&i.to_string()])
            .await
            .unwrap();
    }
}

fn seq(e: &Value) -> i64 {
    e["seq"].as_i64().expect("seq")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resumes_with_since_gets_exactly_what_it_missed() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    insert_numbered(&db, 0, 50).await;
    let seen = ws.events(50).await;
    let last = seq(&seen[49]);
    drop(ws);

    insert_numbered(&db, 50, 150).await;
    let mut ws = relay.ws(&format!("/ws/items?since={last}")).await;
    let replay = new_events(&mut ws, &seen, 100).await;
    let names: Vec<String> = replay
        .iter()
        .map(|e| e["data"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, (50..150).map(|i| i.to_string()).collect::<Vec<_>>());
    db.exec("insert into items(name) values ('live')").await;
    assert_eq!(
        ws.next_json().await["data"]["name"],
        "live",
        "then live, nothing repeated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_since_gets_a_reset_and_with_snapshot_a_fresh_copy() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut watcher = relay.ws("/ws/items").await;
    insert_numbered(&db, 0, 3).await;
    watcher.events(3).await; // the relay has handled them

    let mut ws = relay.ws("/ws/items?since=999999").await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "reset", "resource": "items", "reason": "history_unavailable"})
    );
    db.exec("insert into items(name) values ('live')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "live");

    let mut ws = relay.ws("/ws/items?since=999999&snapshot=true").await;
    assert_eq!(ws.next_json().await["type"], "reset");
    assert_eq!(ws.initial_rows().await.len(), 4);

    // The same through a subscribe message on an open connection.
    ws.send_json(json!({"type": "subscribe", "since": 123456}))
        .await;
    assert_eq!(ws.next_json().await["type"], "reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_in_a_subscribe_message_replays_from_that_event() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    insert_numbered(&db, 0, 5).await;
    let seen = ws.events(5).await;
    ws.send_json(json!({"type": "subscribe", "since": seq(&seen[1])}))
        .await;
    let again = new_events(&mut ws, &seen[..2], 3).await;
    assert_eq!(
        again,
        seen[2..].to_vec(),
        "replayed in delivery order, identical frames"
    );
}

/// Reads a replay until it has `n` events the client had not seen: a replay may repeat events
/// of the batch the `since` event was published in (at-least-once; clients dedupe by seq).
async fn new_events(ws: &mut crate::support::Ws, seen: &[Value], n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = ws.next_json().await;
        if !seen.contains(&e) {
            out.push(e);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_was_listening_gives_the_same_replay() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let a = Relay::start(&db, &["items"]).await;
    let b = Relay::start(&db, &["items"]).await;
    let mut on_a = a.ws("/ws/items").await;
    let mut on_b = b.ws("/ws/items").await;
    insert_numbered(&db, 0, 10).await;
    let seen = on_a.events(10).await;
    on_b.events(10).await; // b has handled them too
    drop(on_a);
    insert_numbered(&db, 10, 30).await;
    on_b.events(20).await;
    let mut resumed = b.ws(&format!("/ws/items?since={}", seq(&seen[9]))).await;
    let replay = new_events(&mut resumed, &seen, 20).await;
    let names: Vec<&str> = replay
        .iter()
        .map(|e| e["data"]["name"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (10..30).map(|i| i.to_string()).collect();
    assert_eq!(names, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_relay_restart_a_resume_is_reset_never_silently_skipped() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    insert_numbered(&db, 0, 3).await;
    let seen = ws.events(3).await;
    relay.stop().await.unwrap();
    assert_eq!(ws.expect_close().await, Some(1001));

    insert_numbered(&db, 3, 6).await; // written while no relay runs
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay
        .ws(&format!("/ws/items?since={}&snapshot=true", seq(&seen[2])))
        .await;
    assert_eq!(ws.next_json().await["type"], "reset");
    assert_eq!(
        ws.initial_rows().await.len(),
        6,
        "the fresh copy has what was missed"
    );
}
