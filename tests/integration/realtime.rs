//! `/realtime/v1/websocket`, Supabase Realtime's protocol, on the wire: the exact messages
//! realtime-js reads (its own tests, with supabase-js itself, are in `clients/supabase/`).

use serde_json::{Value, json};

use crate::support::{Relay, TestDb, Ws};

const ITEMS: &str = "create table items(id int primary key, name text, price numeric, tags text[])";

/// Joins `topic` with `bindings` (vsn 2.0.0, join ref "1") and returns the join reply.
async fn join(ws: &mut Ws, topic: &str, bindings: Value) -> Value {
    let payload = json!({"config": {"postgres_changes": bindings}, "access_token": "anon"});
    ws.send_json(json!(["1", "1", topic, "phx_join", payload]))
        .await;
    ws.next_json().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_is_answered_with_the_bindings_ids_then_changes_come_in_supabase_shape() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay
        .ws("/realtime/v1/websocket?apikey=anon&vsn=2.0.0")
        .await;
    ws.send_json(json!([null, "0", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!([null, "0", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );

    let binding =
        json!({"event": "*", "schema": "public", "table": "items", "filter": "price=gt.1"});
    let reply = join(&mut ws, "realtime:t", json!([binding])).await;
    let id = reply[4]["response"]["postgres_changes"][0]["id"].clone();
    assert!(id.is_u64(), "{reply}");
    let mut echoed = binding.clone();
    echoed["id"] = id.clone();
    assert_eq!(
        reply,
        json!(["1", "1", "realtime:t", "phx_reply",
               {"status": "ok", "response": {"postgres_changes": [echoed]}}])
    );
    assert_eq!(
        ws.next_json().await,
        json!(["1", null, "realtime:t", "system", {
            "extension": "postgres_changes", "status": "ok",
            "message": "Subscribed to PostgreSQL", "channel": "t"}])
    );

    db.exec("insert into items values (1, 'cheap', 1, null)")
        .await;
    db.exec("insert into items values (2, 'dear', 5, '{a,b}')")
        .await;
    db.exec("update items set price = 0 where id = 2").await;
    let columns = json!([
        {"name": "id", "type": "int4"}, {"name": "name", "type": "text"},
        {"name": "price", "type": "numeric"}, {"name": "tags", "type": "_text"},
    ]);
    let row = json!({"id": 2, "name": "dear", "price": 5, "tags": ["a", "b"]});
    for (kind, record, old_record) in [
        ("INSERT", Some(row.clone()), None),
        // Moved out of the filter: a DELETE of the row as it was.
        ("DELETE", None, Some(row.clone())),
    ] {
        let message = ws.next_json().await;
        assert_eq!(
            message.as_array().map(|m| m[..4].to_vec()),
            Some(vec![
                json!("1"),
                Value::Null,
                json!("realtime:t"),
                json!("postgres_changes")
            ])
        );
        let payload = &message[4];
        assert_eq!(payload["ids"], json!([id]));
        let data = &payload["data"];
        assert_eq!(data["schema"], "public");
        assert_eq!(data["table"], "items");
        assert_eq!(data["type"], kind);
        assert_eq!(data["columns"], columns);
        assert_eq!(data["errors"], Value::Null);
        assert!(data["commit_timestamp"].is_string(), "{data}");
        assert_eq!(data.get("record").cloned(), record, "{data}");
        assert_eq!(data.get("old_record").cloned(), old_record, "{data}");
    }

    ws.send_json(json!(["1", "2", "realtime:t", "phx_leave", {}]))
        .await;
    assert_eq!(
        ws.next_json().await,
        json!(["1", "2", "realtime:t", "phx_reply", {"status": "ok", "response": {}}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsn_1_speaks_objects_and_refuses_an_unknown_table_with_a_reason() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay
        .ws("/realtime/v1/websocket?apikey=anon&vsn=1.0.0")
        .await;
    let bindings = json!([{"event": "*", "schema": "public", "table": "nope"}]);
    ws.send_json(
        json!({"topic": "realtime:x", "event": "phx_join", "ref": "3", "join_ref": "3",
                        "payload": {"config": {"postgres_changes": bindings}}}),
    )
    .await;
    let reply = ws.next_json().await;
    assert_eq!(reply["topic"], "realtime:x");
    assert_eq!(reply["event"], "phx_reply");
    assert_eq!(reply["ref"], "3");
    assert_eq!(reply["join_ref"], "3");
    assert_eq!(reply["payload"]["status"], "error");
    let reason = reply["payload"]["response"]["reason"].as_str().unwrap();
    assert!(reason.contains("not exposed"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_table_changes_gets_phx_error_so_that_realtime_js_joins_again() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay
        .ws("/realtime/v1/websocket?apikey=anon&vsn=2.0.0")
        .await;
    let binding = json!({"event": "*", "schema": "public", "table": "items"});
    let reply = join(&mut ws, "realtime:t", json!([binding])).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(ws.next_json().await[3], "system");
    db.exec("alter table items add column colour text").await;
    assert_eq!(
        ws.next_json().await,
        json!(["1", "1", "realtime:t", "phx_error", {}])
    );
    // Joined again, it streams the table as it is now.
    let reply = join(&mut ws, "realtime:t", json!([binding])).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(ws.next_json().await[3], "system");
    db.exec("insert into items values (1, 'a', 1, null, 'red')")
        .await;
    let message = ws.next_json().await;
    assert_eq!(message[3], "postgres_changes", "{message}");
    assert_eq!(message[4]["data"]["record"]["colour"], "red");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_without_a_table_streams_every_exposed_table_of_its_schema() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create schema shop;
             create table shop.orders(id int primary key, status text);
             create table shop.refunds(id int primary key, amount int);
             create table items(id int primary key, name text);",
            &["shop.orders", "shop.refunds", "items"],
        )
        .await;
    let relay = Relay::start(&db, &["shop.orders", "shop.refunds", "items"]).await;
    let mut ws = relay
        .ws("/realtime/v1/websocket?apikey=anon&vsn=2.0.0")
        .await;
    let reply = join(
        &mut ws,
        "realtime:shop",
        json!([{"event": "*", "schema": "shop"}]),
    )
    .await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(ws.next_json().await[3], "system");
    db.exec("insert into items values (1, 'not in shop')").await;
    db.exec("insert into shop.orders values (1, 'open')").await;
    db.exec("insert into shop.refunds values (1, 5)").await;
    let mut tables = Vec::new();
    for _ in 0..2 {
        let message = ws.next_json().await;
        assert_eq!(message[3], "postgres_changes", "{message}");
        assert_eq!(message[4]["data"]["schema"], "shop");
        tables.push(message[4]["data"]["table"].as_str().unwrap().to_owned());
    }
    tables.sort();
    assert_eq!(tables, ["orders", "refunds"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_is_refused_and_a_join_past_the_subscription_limit_gets_a_reason() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| c.limits.max_subscriptions = 2).await;
    let mut ws = relay
        .ws("/realtime/v1/websocket?apikey=anon&vsn=2.0.0")
        .await;
    let one = json!({"event": "*", "schema": "public", "table": "items"});
    let reply = join(&mut ws, "realtime:a", json!([one])).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    assert_eq!(ws.next_json().await[3], "system");
    ws.send_json(json!(["1", "2", "realtime:a", "broadcast", {"event": "x", "payload": {}}]))
        .await;
    let refused = ws.next_json().await;
    assert_eq!(refused[3], "phx_reply", "{refused}");
    assert_eq!(refused[4]["status"], "error", "{refused}");
    assert!(
        refused[4]["response"]["reason"]
            .as_str()
            .unwrap()
            .contains("Broadcast and Presence are not offered"),
        "{refused}"
    );
    // Two more bindings would make three subscriptions on this socket: refused whole.
    let reply = join(&mut ws, "realtime:b", json!([one, one])).await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
    assert!(
        reply[4]["response"]["reason"]
            .as_str()
            .unwrap()
            .contains("at most 2"),
        "{reply}"
    );
    // Counted before any binding is looked at (looking may ask the database): three
    // bindings of an unknown table are refused for their number, not their table.
    let nope = json!({"event": "*", "schema": "public", "table": "nope"});
    let reply = join(&mut ws, "realtime:c", json!([nope, nope, nope])).await;
    assert!(
        reply[4]["response"]["reason"]
            .as_str()
            .unwrap()
            .contains("at most 2"),
        "{reply}"
    );
    // The first channel is still served.
    db.exec("insert into items values (1, 'still', 1, null)")
        .await;
    let message = ws.next_json().await;
    assert_eq!(message[2], "realtime:a", "{message}");
    assert_eq!(message[4]["data"]["type"], "INSERT", "{message}");
}

const SECRET: &str = "realtime-wire-test-secret-realtime-wire";

fn member(category: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"role": "member", "category": category, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_that_grants_other_rows_closes_the_channel_and_one_that_grants_the_same_keeps_it()
 {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table items(id int primary key, category text)",
            &["items"],
        )
        .await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        crate::support::with_policies(
            c,
            r#"
            [[policy]]
            tables = ["items"]
            roles = ["member"]
            read = true
            filter = "category=eq.{claims.category}"
            "#,
            SECRET,
        );
    })
    .await;
    let token = member("a");
    let mut ws = relay
        .ws(&format!("/realtime/v1/websocket?apikey={token}&vsn=2.0.0"))
        .await;
    let binding = json!([{"event": "*", "schema": "public", "table": "items"}]);
    let payload = json!({"config": {"postgres_changes": binding}, "access_token": token});
    ws.send_json(json!(["1", "1", "realtime:m", "phx_join", payload]))
        .await;
    assert_eq!(ws.next_json().await[4]["status"], "ok");
    assert_eq!(ws.next_json().await[3], "system");

    // Another token for the same rows: the channel goes on.
    ws.send_json(json!(["1", "2", "realtime:m", "access_token", {"access_token": member("a")}]))
        .await;
    db.exec("insert into items values (1, 'b'), (2, 'a')").await;
    let message = ws.next_json().await;
    assert_eq!(message[4]["data"]["record"]["id"], 2, "{message}");

    // A token for other rows: the channel is told why and closed.
    ws.send_json(json!(["1", "3", "realtime:m", "access_token", {"access_token": member("b")}]))
        .await;
    let system = ws.next_json().await;
    assert_eq!(system[3], "system", "{system}");
    assert_eq!(system[4]["status"], "error", "{system}");
    assert!(
        system[4]["message"]
            .as_str()
            .unwrap()
            .contains("grants different access"),
        "{system}"
    );
    assert_eq!(ws.next_json().await[3], "phx_close");
    db.exec("insert into items values (3, 'a')").await;
    ws.send_json(json!([null, "4", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(
        ws.next_json().await[3],
        "phx_reply",
        "nothing more for the closed channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_without_bindings_count_against_the_limit_so_a_socket_cannot_grow_without_bound() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| c.limits.max_subscriptions = 2).await;
    let mut ws = relay
        .ws("/realtime/v1/websocket?apikey=anon&vsn=2.0.0")
        .await;
    // Each join of a new topic is held by the socket, bindings or not (its topic may be as
    // long as a client frame): past the limit, a join is refused.
    for n in 0..2 {
        let reply = join(&mut ws, &format!("realtime:{n}"), json!([])).await;
        assert_eq!(reply[4]["status"], "ok", "{reply}");
    }
    let reply = join(&mut ws, "realtime:2", json!([])).await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
    assert!(
        reply[4]["response"]["reason"]
            .as_str()
            .unwrap()
            .contains("at most 2"),
        "{reply}"
    );
    // Joining a topic it holds again replaces that channel; leaving one frees its place.
    let reply = join(&mut ws, "realtime:1", json!([])).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    ws.send_json(json!(["1", "2", "realtime:0", "phx_leave", {}]))
        .await;
    assert_eq!(ws.next_json().await[4]["status"], "ok");
    let reply = join(&mut ws, "realtime:2", json!([])).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_restricted_channel_never_sees_hidden_columns_or_other_rows() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table items(id int primary key, category text, secret text)",
            &["items"],
        )
        .await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        crate::support::with_policies(
            c,
            r#"
            [[policy]]
            tables = ["items"]
            roles = ["member"]
            read = true
            filter = "category=eq.{claims.category}"
            columns = ["id", "category"]
            "#,
            SECRET,
        );
    })
    .await;
    let token = member("a");
    let mut ws = relay
        .ws(&format!("/realtime/v1/websocket?apikey={token}&vsn=2.0.0"))
        .await;
    // A filter on a hidden column is refused.
    let hidden =
        json!([{"event": "*", "schema": "public", "table": "items", "filter": "secret=eq.x"}]);
    let payload = json!({"config": {"postgres_changes": hidden}, "access_token": token});
    ws.send_json(json!(["1", "1", "realtime:h", "phx_join", payload]))
        .await;
    assert_eq!(ws.next_json().await[4]["status"], "error");

    let binding = json!([{"event": "*", "schema": "public", "table": "items"}]);
    let payload = json!({"config": {"postgres_changes": binding}, "access_token": token});
    ws.send_json(json!(["2", "2", "realtime:m", "phx_join", payload]))
        .await;
    assert_eq!(ws.next_json().await[4]["status"], "ok");
    assert_eq!(ws.next_json().await[3], "system");
    db.exec("insert into items values (1, 'b', 's1'), (2, 'a', 's2')")
        .await;
    db.exec("update items set secret = 's3' where id = 2").await;
    db.exec("update items set category = 'b', secret = 's4' where id = 2")
        .await;
    db.exec("update items set category = 'a' where id = 1")
        .await;
    db.exec("delete from items where id = 1").await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let message = ws.next_json().await;
        assert_eq!(message[3], "postgres_changes", "{message}");
        let text = message.to_string();
        assert!(
            !text.contains("secret") && !["s1", "s2", "s3", "s4"].iter().any(|s| text.contains(s)),
            "{text}"
        );
        let data = &message[4]["data"];
        assert_eq!(
            data["columns"],
            json!([{"name": "id", "type": "int4"}, {"name": "category", "type": "text"}])
        );
        seen.push((
            data["type"].clone(),
            data["record"].clone(),
            data["old_record"].clone(),
        ));
    }
    assert_eq!(
        seen[0],
        (
            json!("INSERT"),
            json!({"id": 2, "category": "a"}),
            Value::Null
        )
    );
    assert_eq!(seen[1].0, "UPDATE");
    // Out of the caller's rows: the key only.
    assert_eq!(seen[2], (json!("DELETE"), Value::Null, json!({"id": 2})));
    assert_eq!(
        seen[3],
        (
            json!("INSERT"),
            json!({"id": 1, "category": "a"}),
            Value::Null
        )
    );
    assert_eq!(
        seen[4],
        (
            json!("DELETE"),
            Value::Null,
            json!({"id": 1, "category": "a"})
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_schema_binding_is_counted_against_the_limit_as_it_expands_before_more_lookups() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create schema shop;
             create table shop.a(id int primary key);
             create table shop.b(id int primary key);
             create table shop.c(id int primary key);",
            &["shop.a", "shop.b", "shop.c"],
        )
        .await;
    let relay = Relay::start_with(&db, &["shop.a", "shop.b", "shop.c"], |c| {
        c.limits.max_subscriptions = 2;
    })
    .await;
    let mut ws = relay
        .ws("/realtime/v1/websocket?apikey=anon&vsn=2.0.0")
        .await;
    // Two bindings, but the first alone is three subscriptions: refused for their number
    // before the second (or the rest of the first) is looked up.
    let bindings = json!([
        {"event": "*", "schema": "shop"},
        {"event": "*", "schema": "public", "table": "nope"},
    ]);
    let reply = join(&mut ws, "realtime:s", bindings).await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
    assert!(
        reply[4]["response"]["reason"]
            .as_str()
            .unwrap()
            .contains("at most 2"),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_authenticates_is_closed_after_the_auth_timeout_however_it_heartbeats()
{
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.auth.jwt = Some(crate::support::hmac_jwt(SECRET));
        c.auth.auth_timeout = std::time::Duration::from_millis(500);
    })
    .await;
    // Without a token, or with one that is not valid, and never a channel: the socket would
    // hold one of the relay's connections for as long as it heartbeats.
    for path in [
        "/realtime/v1/websocket?vsn=2.0.0",
        "/realtime/v1/websocket?apikey=garbage&vsn=2.0.0",
    ] {
        let mut ws = relay.ws(path).await;
        let started = std::time::Instant::now();
        let closed = crate::support::within(std::time::Duration::from_secs(10), async {
            let mut n = 0;
            loop {
                n += 1;
                ws.send_json(json!([null, n.to_string(), "phoenix", "heartbeat", {}]))
                    .await;
                match ws.next_frame().await {
                    crate::support::Frame::Closed(frame) => {
                        return frame.map(|f| u16::from(f.code));
                    }
                    crate::support::Frame::Json(_) => {}
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        assert_eq!(closed, Some(4001), "{path}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    // A valid token in the socket's apikey keeps it open without a channel.
    let mut ws = relay
        .ws(&format!(
            "/realtime/v1/websocket?apikey={}&vsn=2.0.0",
            member("a")
        ))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    ws.send_json(json!([null, "1", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(ws.next_json().await[3], "phx_reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_that_is_not_an_object_is_refused_not_read_as_a_whole_schema() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay
        .ws("/realtime/v1/websocket?apikey=anon&vsn=2.0.0")
        .await;
    for bad in [json!(null), json!(5), json!("items"), json!([])] {
        let reply = join(&mut ws, "realtime:x", json!([bad])).await;
        assert_eq!(reply[4]["status"], "error", "{bad}: {reply}");
        assert!(
            reply[4]["response"]["reason"]
                .as_str()
                .unwrap()
                .contains("must be an object"),
            "{reply}"
        );
    }
    // Nothing was subscribed: a change reaches no channel.
    db.exec("insert into items values (1, 'a', 1, null)").await;
    ws.send_json(json!([null, "9", "phoenix", "heartbeat", {}]))
        .await;
    assert_eq!(ws.next_json().await[3], "phx_reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_client_that_stops_reading_is_closed_as_a_slow_consumer() {
    use futures_util::SinkExt;
    let db = TestDb::new()
        .await
        .with_tables(
            "create table docs(id serial primary key, body text)",
            &["docs"],
        )
        .await;
    let relay = Relay::start_with(&db, &["docs"], |c| {
        c.queue_bytes = 256 * 1024;
    })
    .await;
    let mut stalled =
        crate::support::stalled_client(relay.addr, "/realtime/v1/websocket?apikey=anon&vsn=2.0.0")
            .await;
    // Two channels on the table (each binding its own cursor), then no reads at all.
    for topic in ["realtime:a", "realtime:b"] {
        let payload = json!({"config": {"postgres_changes": [
            {"event": "*", "schema": "public", "table": "docs"}]}});
        let join = json!(["1", "1", topic, "phx_join", payload]).to_string();
        stalled
            .send(tokio_tungstenite::tungstenite::Message::text(join))
            .await
            .unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let writer = db.client().await;
    crate::support::within(std::time::Duration::from_secs(60), async {
        for _ in 0..10 {
            writer
                .batch_execute(
                    "insert into docs(body) select repeat('x', 2000) from generate_series(1, 1000)",
                )
                .await
                .unwrap();
        }
    })
    .await;
    crate::support::wait_for_metrics(
        relay.addr,
        &["pgrelay_slow_consumers_total 1", "pgrelay_ws_connections 0"],
    )
    .await;
    drop(stalled);
}

/// Reads the channel's messages until `done` holds for the collected `(event, payload)`
/// pairs; returns them all.
async fn collect_until(
    ws: &mut Ws,
    done: impl Fn(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    while !done(&seen) {
        let message = ws.next_json().await;
        let event = message[3].as_str().unwrap_or_default().to_owned();
        seen.push((event, message[4].clone()));
    }
    seen
}

/// `(type, id)` of each `postgres_changes` message, in order.
fn changes(seen: &[(String, Value)]) -> Vec<(String, i64)> {
    seen.iter()
        .filter(|(event, _)| event == "postgres_changes")
        .map(|(_, p)| {
            let data = &p["data"];
            let row = if data["type"] == "DELETE" {
                &data["old_record"]
            } else {
                &data["record"]
            };
            (
                data["type"].as_str().unwrap_or_default().to_owned(),
                row["id"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

/// The position of the last `Position` message, if one came after the last change.
fn last_position(seen: &[(String, Value)]) -> Option<String> {
    let (event, payload) = seen.last()?;
    (event == "system" && payload["message"] == "Position")
        .then(|| payload["position"].as_str().map(str::to_owned))
        .flatten()
}

/// The socket path of vsn 2.0.0 with the anon key.
const V2: &str = "/realtime/v1/websocket?apikey=anon&vsn=2.0.0";

/// A database with `items`, a relay serving it, and a binding of all its changes that keeps
/// positions (`since: null`).
async fn keeping_positions() -> (TestDb, Relay, Value) {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let binding = json!({"event": "*", "schema": "public", "table": "items", "since": null});
    (db, relay, binding)
}

/// Joins `realtime:t` with `binding` (no position yet: not resumed), inserts row 1 into
/// `items`, and returns the socket and the position sent after its INSERT.
async fn first_position(db: &TestDb, relay: &Relay, binding: &Value) -> (Ws, String) {
    let mut ws = relay.ws(V2).await;
    assert_eq!(joined(&mut ws, "realtime:t", binding).await, json!(false));
    db.exec("insert into items values (1, 'a', 1, null)").await;
    let seen = collect_until(&mut ws, |s| {
        changes(s) == [("INSERT".into(), 1)] && last_position(s).is_some()
    })
    .await;
    let position = last_position(&seen).expect("a position after the insert");
    (ws, position)
}

/// The join's `system` "Subscribed to PostgreSQL" message's `resumed`.
async fn joined(ws: &mut Ws, topic: &str, binding: &Value) -> Value {
    let reply = join(ws, topic, json!([binding])).await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let system = ws.next_json().await;
    assert_eq!(system[4]["message"], "Subscribed to PostgreSQL", "{system}");
    system[4]["resumed"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_bindings_carry_since_resumes_from_its_position_after_a_dropped_socket() {
    let (db, relay, mut binding) = keeping_positions().await;
    let path = V2;

    // Without a position yet: not resumed (the client reads its rows), and positions come
    // after the events they cover.
    let (ws, position) = first_position(&db, &relay, &binding).await;
    drop(ws);

    // Written while the client is away (it keeps its position in the binding).
    db.exec("insert into items values (2, 'b', 2, null)").await;
    db.exec("update items set name = 'a2' where id = 1").await;
    db.exec("delete from items where id = 2").await;
    binding["since"] = json!(position);
    let mut ws = relay.ws(path).await;
    assert_eq!(joined(&mut ws, "realtime:t", &binding).await, json!(true));
    let seen = collect_until(&mut ws, |s| {
        changes(s).ends_with(&[("DELETE".into(), 2)]) && last_position(s).is_some()
    })
    .await;
    // On the relay that sent the position: exactly what the client missed, once.
    assert_eq!(
        changes(&seen),
        [
            ("INSERT".to_owned(), 2),
            ("UPDATE".into(), 1),
            ("DELETE".into(), 2)
        ]
    );
    let position = last_position(&seen).expect("a newer position");
    drop(ws);

    // Its seq alone (what any relay understands) resumes at least once: the transaction
    // that holds it may come again, nothing before it.
    db.exec("insert into items values (5, 'e', 5, null)").await;
    let seq = position.split('/').next().expect("a seq").to_owned();
    binding["since"] = json!(seq);
    let mut ws = relay.ws(path).await;
    assert_eq!(joined(&mut ws, "realtime:t", &binding).await, json!(true));
    let seen = collect_until(&mut ws, |s| changes(s).ends_with(&[("INSERT".into(), 5)])).await;
    let got = changes(&seen);
    assert!(
        got == [("INSERT".into(), 5)] || got == [("DELETE".into(), 2), ("INSERT".into(), 5)],
        "{got:?}"
    );

    // The position is numeric text; one the relay cannot vouch for is not resumed, and the
    // client is given a position to keep from then on.
    binding["since"] = json!("-1");
    let mut other = relay.ws(path).await;
    assert_eq!(
        joined(&mut other, "realtime:u", &binding).await,
        json!(false)
    );
    let next = other.next_json().await;
    assert_eq!(next[4]["message"], "Position", "{next}");
    // A relay started later cannot vouch for what came before it either.
    let second = Relay::start(&db, &["items"]).await;
    binding["since"] = json!(position);
    let mut ws = second.ws(path).await;
    assert_eq!(joined(&mut ws, "realtime:t", &binding).await, json!(false));
    assert_eq!(ws.next_json().await[4]["message"], "Position");

    binding["since"] = json!("soon");
    let reply = join(&mut ws, "realtime:v", json!([binding])).await;
    assert_eq!(reply[4]["status"], "error", "{reply}");
    let reason = reply[4]["response"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("since"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_across_a_table_change_starts_afresh_instead_of_failing_again() {
    let (db, relay, mut binding) = keeping_positions().await;
    let path = V2;
    let (ws, position) = first_position(&db, &relay, &binding).await;
    binding["since"] = json!(position);
    drop(ws);

    // While the client is away the table changes: its stream holds a reset. Resuming into
    // it would end the channel again (phx_error, re-join, …) forever: it is not resumed.
    let mut probe = relay.ws("/ws/items").await;
    db.exec("alter table items add column colour text").await;
    db.exec("insert into items values (2, 'b', 2, null, 'red')")
        .await;
    // Wait until the relay has seen the change (its watcher looks every so often), so that
    // the resume meets it.
    loop {
        let event = probe.next_json().await;
        if event["type"] == "reset" {
            break;
        }
    }
    let mut ws = relay.ws(path).await;
    assert_eq!(joined(&mut ws, "realtime:t", &binding).await, json!(false));
    db.exec("insert into items values (4, 'd', 4, null, 'red')")
        .await;
    let seen = collect_until(&mut ws, |s| changes(s).contains(&("INSERT".into(), 4))).await;
    assert_eq!(changes(&seen), [("INSERT".into(), 4)]);
    assert!(seen.iter().all(|(e, _)| e != "phx_error"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_comes_after_the_last_change_even_when_its_batch_ends_after_the_write() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table items(id int primary key, name text, price numeric, tags text[]);
             create table other(id int primary key);",
            &["items", "other"],
        )
        .await;
    let relay = Relay::start(&db, &["items", "other"]).await;
    let path = "/realtime/v1/websocket?apikey=anon&vsn=2.0.0";
    let mut binding = json!({"event": "*", "schema": "public", "table": "items", "since": null});
    let mut ws = relay.ws(path).await;
    assert_eq!(joined(&mut ws, "realtime:t", &binding).await, json!(false));
    db.exec("insert into items values (1, 'a', 1, null)").await;
    collect_until(&mut ws, |s| {
        changes(s) == [("INSERT".into(), 1)] && last_position(s).is_some()
    })
    .await;
    // One transaction: the items row first, then many statements on another table. Capture
    // publishes it window by window (a large transaction), so the client is sent the items
    // row long before the batch ends; nothing of items follows.
    db.exec(
        "begin;
         insert into items values (2, 'b', 2, null);
         do $$ begin for i in 1..400 loop insert into other values (i); end loop; end $$;
         commit;",
    )
    .await;
    // Once the batch ends, the client has everything up to it: it must be told (else it
    // keeps an older position, and a resume sends it the row again).
    let seen = collect_until(&mut ws, |s| {
        changes(s) == [("INSERT".into(), 2)] && last_position(s).is_some()
    })
    .await;
    binding["since"] = json!(last_position(&seen));
    drop(ws);
    db.exec("insert into items values (3, 'c', 3, null)").await;
    let mut ws = relay.ws(path).await;
    assert_eq!(joined(&mut ws, "realtime:t", &binding).await, json!(true));
    let seen = collect_until(&mut ws, |s| changes(s).contains(&("INSERT".into(), 3))).await;
    assert_eq!(changes(&seen), [("INSERT".into(), 3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_schema_resume_after_one_of_its_tables_was_dropped_is_not_resumed() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create schema shop;
             create table shop.orders(id int primary key, status text);
             create table shop.refunds(id int primary key, amount int);",
            &["shop.orders", "shop.refunds"],
        )
        .await;
    let relay = Relay::start(&db, &["shop.orders", "shop.refunds"]).await;
    let path = "/realtime/v1/websocket?apikey=anon&vsn=2.0.0";
    let mut binding = json!({"event": "*", "schema": "shop", "since": null});
    let mut ws = relay.ws(path).await;
    assert_eq!(
        joined(&mut ws, "realtime:shop", &binding).await,
        json!(false)
    );
    db.exec("insert into shop.refunds values (1, 5)").await;
    let seen = collect_until(&mut ws, |s| {
        changes(s) == [("INSERT".into(), 1)] && last_position(s).is_some()
    })
    .await;
    binding["since"] = json!(last_position(&seen));
    drop(ws);

    // While the client is away a refund is written, then its table is dropped: a client that
    // stayed would have got the row, then phx_error. One that resumes must not be told its
    // channel resumed (it would keep a copy of a table it never hears of again).
    let mut probe = relay.ws("/ws/shop.refunds").await;
    db.exec("insert into shop.refunds values (2, 7)").await;
    db.exec("drop table shop.refunds").await;
    loop {
        let event = probe.next_json().await;
        if event["type"] == "reset" {
            break;
        }
    }
    let mut ws = relay.ws(path).await;
    assert_eq!(
        joined(&mut ws, "realtime:shop", &binding).await,
        json!(false)
    );
}
