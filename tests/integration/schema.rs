//! Schema changes never fail a write and never go unnoticed (issue 9, item 3).

use serde_json::json;

use crate::support::{Relay, TestDb, http, wait_for_metrics};

const ITEMS: &str = "create table items(id int primary key, name text, price numeric);
                     create table other(id int primary key)";

fn fast_schema_checks(c: &mut pgrelay::Config) {
    c.schema_interval = std::time::Duration::from_millis(100);
}

/// A relay that checks the schema often and installs capture on tables that come back.
async fn reinstalling_relay(db: &TestDb, tables: &[&str]) -> Relay {
    Relay::start_with(db, tables, |c| {
        fast_schema_checks(c);
        c.install = true;
    })
    .await
}

/// Waits until the relay serves `path` again (a table re-created under its name is picked
/// up at the next schema check).
async fn served_again(relay: &Relay, path: &str) {
    crate::support::within(crate::support::STEP, async {
        while http(relay.addr, "GET", path, None).await.status != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_the_key_column_fails_no_write_and_ends_only_subscriptions_that_name_it() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], fast_schema_checks).await;
    let mut plain = relay.ws("/ws/items").await;
    let mut filtered = relay.ws("/ws/items?id=gt.0").await;
    let mut on_ws = relay.ws("/ws").await;
    on_ws
        .send_json(json!({"type": "subscribe", "resource": "items", "select": "name,id"}))
        .await;
    assert_eq!(on_ws.next_json().await["type"], "subscribed");
    db.exec("insert into items values (1, 'a', 1)").await;
    assert_eq!(plain.next_json().await["id"], 1);
    assert_eq!(filtered.next_json().await["id"], 1);
    assert_eq!(on_ws.next_json().await["id"], 1);

    db.exec("alter table items rename column id to item_id")
        .await;
    // Writes go on, with the key as it is now.
    db.exec(
        "insert into items values (2, 'b', 2);
         update items set name = 'bb' where item_id = 2;
         update items set item_id = 3 where item_id = 2;
         delete from items where item_id = 1",
    )
    .await;
    // The rename itself resets the copies (their rows lack the new name) whenever the schema
    // check notices it: among the events, in stream order.
    let mut events = Vec::new();
    let mut resets = 0;
    while events.len() < 5 || resets == 0 {
        let message = plain.next_json().await;
        if message["type"] == "reset" {
            assert_eq!(message["reason"], "table_changed");
            resets += 1;
        } else {
            events.push(message);
        }
    }
    let summary: Vec<(String, i64)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("create".into(), 2),
            ("update".into(), 2),
            ("delete".into(), 2),
            ("create".into(), 3),
            ("delete".into(), 1)
        ]
    );
    assert_eq!(
        events[0]["data"],
        json!({"item_id": 2, "name": "b", "price": 2})
    );
    // A subscription whose filter or select names the old column ends, saying why.
    let ended = filtered.next_json().await;
    assert_eq!(ended["type"], "error");
    assert_eq!(ended["code"], "subscription_ended");
    assert!(
        ended["message"].as_str().unwrap().contains("\"id\""),
        "{ended}"
    );
    assert_eq!(filtered.expect_close().await, Some(4400));
    // (The projected subscription may get the writes first: the schema check notices the
    // rename within its interval; the writes themselves never waited for it.)
    let ended = loop {
        let message = on_ws.next_json().await;
        if message["type"] == "error" {
            break message;
        }
        assert!(
            message["data"].get("item_id").is_none(),
            "projected: {message}"
        );
    };
    assert_eq!(ended["code"], "subscription_ended");
    assert_eq!(ended["resource"], "items");
    // The /ws socket stays open.
    on_ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(on_ws.next_json().await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_table_resets_its_subscribers_and_a_recreated_one_is_picked_up() {
    let db = TestDb::new()
        .await
        .with_tables(ITEMS, &["items", "other"])
        .await;
    let relay = reinstalling_relay(&db, &["items", "other"]).await;
    let mut ws = relay.ws("/ws/items").await;
    let mut other = relay.ws("/ws/other").await;
    db.exec("alter table items rename to goods").await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "reset", "resource": "items", "reason": "table_renamed"})
    );
    // The name no longer resolves; the other table streams on.
    assert_eq!(
        http(relay.addr, "GET", "/api/items", None).await.status,
        404
    );
    db.exec("insert into other values (1)").await;
    assert_eq!(other.next_json().await["id"], 1);
    // Re-created under the old name: picked up (capture installed, since --install).
    db.exec("create table items(id int primary key, name text)")
        .await;
    served_again(&relay, "/api/items").await;
    let mut fresh = relay.ws("/ws/items?snapshot=true").await;
    assert!(fresh.initial_rows().await.is_empty());
    db.exec("insert into items values (5, 'new')").await;
    assert_eq!(
        fresh.next_json().await["data"],
        json!({"id": 5, "name": "new"})
    );
    // The old socket follows the resource too, after its reset, and another: the new table
    // lacks `price`, so the copy it held differs from this table's rows.
    assert_eq!(
        ws.next_json().await,
        json!({"type": "reset", "resource": "items", "reason": "table_changed"})
    );
    assert_eq!(ws.next_json().await["id"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_recreated_without_a_column_ends_the_subscriptions_that_followed_it_naming_it() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = reinstalling_relay(&db, &["items"]).await;
    let mut plain = relay.ws("/ws/items").await;
    let mut filtered = relay.ws("/ws/items?price=gt.0").await;
    let mut projected = relay.ws("/ws/items?select=id,price").await;
    db.exec("drop table items").await;
    for reset in [plain.next_json().await, filtered.next_json().await] {
        assert_eq!(reset["reason"], "table_dropped", "{reset}");
    }
    assert_eq!(projected.next_json().await["reason"], "table_dropped");
    // Back under the same name, with `price` gone and a new column.
    db.exec("create table items(id int primary key, name text, note text)")
        .await;
    served_again(&relay, "/api/items").await;
    db.exec("insert into items values (1, 'a', 'n')").await;
    // Subscriptions that name `price` end, saying why, instead of filtering or projecting
    // rows that no longer have it.
    let ended = filtered.next_json().await;
    assert_eq!(ended["code"], "subscription_ended", "{ended}");
    assert!(
        ended["message"].as_str().unwrap().contains("\"price\""),
        "{ended}"
    );
    assert_eq!(filtered.expect_close().await, Some(4400));
    let ended = projected.next_json().await;
    assert_eq!(ended["code"], "subscription_ended", "{ended}");
    assert_eq!(projected.expect_close().await, Some(4400));
    // The others start over (their copies hold rows of the table that went), then stream.
    assert_eq!(
        plain.next_json().await,
        json!({"type": "reset", "resource": "items", "reason": "table_changed"})
    );
    assert_eq!(
        plain.next_json().await["data"],
        json!({"id": 1, "name": "a", "note": "n"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_resets_its_subscribers_and_capture_goes_on_for_the_rest() {
    let db = TestDb::new()
        .await
        .with_tables(ITEMS, &["items", "other"])
        .await;
    let relay = Relay::start_with(&db, &["items", "other"], fast_schema_checks).await;
    let mut ws = relay.ws("/ws/items").await;
    let mut other = relay.ws("/ws/other").await;
    db.exec("insert into items values (1, 'a', 1); drop table items")
        .await;
    assert_eq!(ws.next_json().await["type"], "create");
    assert_eq!(
        ws.next_json().await,
        json!({"type": "reset", "resource": "items", "reason": "table_dropped"})
    );
    // Asking for fresh data about a table that is gone: an error and a 4004 close.
    ws.send_json(json!({"type": "subscribe"})).await;
    let error = ws.next_json().await;
    assert_eq!(error["code"], "not_found");
    assert_eq!(ws.expect_close().await, Some(4004));
    db.exec("insert into other values (1)").await;
    assert_eq!(other.next_json().await["id"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_or_disabled_capture_triggers_reset_subscribers_and_install_puts_them_back() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = reinstalling_relay(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("drop trigger pgrelay_capture_insert on items")
        .await;
    // The write succeeds; it is not captured, so subscribers are told their copy is stale…
    db.exec("insert into items values (1, 'lost', 1)").await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "reset", "resource": "items", "reason": "table_changed"})
    );
    // …and capture is back (reinstalled), so writes stream again.
    wait_for(
        &db,
        "select count(*) = 1 from pg_trigger where tgname = 'pgrelay_capture_insert'",
        &[],
    )
    .await;
    db.exec("insert into items values (2, 'seen', 2)").await;
    assert_eq!(ws.next_json().await["id"], 2);
    // Disabled triggers count as removed.
    db.exec("alter table items disable trigger pgrelay_capture_update")
        .await;
    assert_eq!(ws.next_json().await["reason"], "table_changed");
    // So do triggers set to fire in the wrong sessions: a statement trigger that fires only
    // under replication (ordinary writes lost), or the replication trigger set to fire
    // always (every write sent twice). Each is put back as installed.
    for (toggle, restored) in [
        (
            "alter table items enable replica trigger pgrelay_capture_insert",
            "pgrelay_capture_insert:O",
        ),
        (
            "alter table items enable always trigger pgrelay_capture_replica",
            "pgrelay_capture_replica:R",
        ),
    ] {
        wait_installed(&db, "items").await;
        db.exec(toggle).await;
        assert_eq!(ws.next_json().await["reason"], "table_changed", "{toggle}");
        wait_for_trigger_state(&db, restored).await;
    }
    wait_installed(&db, "items").await;
    db.exec("insert into items values (3, 'once', 3)").await;
    let once = ws.next_json().await;
    assert_eq!(once["id"], 3, "{once}");
    db.exec("insert into items values (4, 'next', 4)").await;
    assert_eq!(ws.next_json().await["id"], 4, "nothing sent twice");
}

/// Waits until the boolean query `sql` (on `db`) answers true.
async fn wait_for(
    db: &crate::support::TestDb,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) {
    let client = db.client().await;
    crate::support::within(crate::support::STEP, async {
        while !client
            .query_one(sql, params)
            .await
            .unwrap()
            .get::<_, bool>(0)
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Waits until every capture trigger of `table` is in its installed state.
async fn wait_installed(db: &crate::support::TestDb, table: &str) {
    wait_for(
        db,
        "select count(*) = 6 and bool_and(tgenabled = case when tgname ~ '_(insert|update|delete)$' then 'O'
                                                when tgname ~ '_replica$' then 'R' else 'A' end)
           from pg_trigger where tgrelid = $1::text::regclass and tgname like 'pgrelay%'",
        &[&table],
    )
    .await;
}

/// Waits until a trigger of `items` is in state `name:tgenabled`.
async fn wait_for_trigger_state(db: &crate::support::TestDb, state: &str) {
    wait_for(
        db,
        "select count(*) = 1 from pg_trigger where tgname || ':' || tgenabled::text = $1",
        &[&state],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_added_dropped_and_retyped_while_streaming() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], fast_schema_checks).await;
    let mut plain = relay.ws("/ws/items").await;
    let mut by_price = relay.ws("/ws/items?price=gt.0").await;
    let mut name_only = relay.ws("/ws/items?select=name").await;
    let table_changed = json!({"type": "reset", "resource": "items", "reason": "table_changed"});
    // A column added: rows it did not rewrite now differ from every copy (a key more), so
    // every subscriber starts over; rows written after it carry the column.
    db.exec("alter table items add column colour text").await;
    for ws in [&mut plain, &mut by_price, &mut name_only] {
        assert_eq!(ws.next_json().await, table_changed);
    }
    db.exec("insert into items values (1, 'a', 1, 'red')").await;
    assert_eq!(
        plain.next_json().await["data"],
        json!({"id": 1, "name": "a", "price": 1, "colour": "red"})
    );
    assert_eq!(by_price.next_json().await["id"], 1);
    // A projection keeps the key.
    assert_eq!(
        name_only.next_json().await["data"],
        json!({"id": 1, "name": "a"})
    );

    // Retyped: the subscription filtering on it ends (its filter no longer means what it
    // did); the others start over.
    db.exec("alter table items alter column price type text")
        .await;
    let ended = by_price.next_json().await;
    assert_eq!(ended["code"], "subscription_ended", "{ended}");
    assert_eq!(by_price.expect_close().await, Some(4400));
    assert_eq!(plain.next_json().await, table_changed);
    assert_eq!(name_only.next_json().await, table_changed);
    // Dropped: the subscription selecting it ends.
    db.exec("alter table items drop column name").await;
    assert_eq!(name_only.next_json().await["code"], "subscription_ended");
    assert_eq!(plain.next_json().await, table_changed);
    db.exec("insert into items values (2, 'x', 'blue')").await;
    assert_eq!(
        plain.next_json().await["data"],
        json!({"id": 2, "price": "x", "colour": "blue"})
    );
    // REST sees the table as it is now.
    let rows = http(relay.addr, "GET", "/api/items?colour=eq.blue", None).await;
    assert_eq!(
        rows.json,
        json!([{"id": 2, "price": "x", "colour": "blue"}])
    );
    wait_for_metrics(relay.addr, &["pgrelay_capture_listening 1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_exposed_tables_that_swap_names_both_stream_under_their_new_names() {
    let db = TestDb::new()
        .await
        .with_tables(ITEMS, &["items", "other"])
        .await;
    let relay = Relay::start_with(&db, &["items", "other"], fast_schema_checks).await;
    let mut items = relay.ws("/ws/items").await;
    let mut other = relay.ws("/ws/other").await;
    db.exec(
        "begin;
         alter table items rename to swapping;
         alter table other rename to items;
         alter table swapping rename to other;
         commit",
    )
    .await;
    assert_eq!(items.next_json().await["reason"], "table_renamed");
    assert_eq!(other.next_json().await["reason"], "table_renamed");
    // Both names resolve again, each to the table that now has it (`other` is checked last).
    served_again(&relay, "/api/other").await;
    let mut items = relay.ws("/ws/items").await;
    let mut other = relay.ws("/ws/other").await;
    db.exec("insert into items values (7); insert into other values (8, 'b', 2)")
        .await;
    assert_eq!(items.next_json().await["data"], json!({"id": 7}));
    assert_eq!(
        other.next_json().await["data"],
        json!({"id": 8, "name": "b", "price": 2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_recreated_with_another_primary_key_resets_the_subscriptions_that_followed_it() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = reinstalling_relay(&db, &["items"]).await;
    let mut plain = relay.ws("/ws/items").await;
    let mut on_ws = relay.ws("/ws").await;
    on_ws
        .send_json(json!({"type": "subscribe", "resource": "items", "select": "price"}))
        .await;
    assert_eq!(on_ws.next_json().await["key"], json!(["id"]));
    db.exec("drop table items").await;
    assert_eq!(plain.next_json().await["reason"], "table_dropped");
    assert_eq!(on_ws.next_json().await["reason"], "table_dropped");
    // The same columns, keyed by another: events' `id` is another value, and the projection
    // kept for `select` holds the old key's column, not the new one.
    db.exec("create table items(id int, name text primary key, price numeric)")
        .await;
    served_again(&relay, "/api/items").await;
    db.exec("insert into items values (1, 'a', 2)").await;
    // As for a key changed in place: the copies start over before the new table's events.
    for ws in [&mut plain, &mut on_ws] {
        assert_eq!(
            ws.next_json().await,
            json!({"type": "reset", "resource": "items", "reason": "table_changed"})
        );
        assert_eq!(ws.next_json().await["id"], "a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_again_right_after_a_primary_key_change_gets_the_new_key() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    db.exec("insert into items values (1, 'a', 2)").await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws").await;
    let subscribe =
        json!({"type": "subscribe", "resource": "items", "select": "price", "snapshot": true});
    ws.send_json(subscribe.clone()).await;
    assert_eq!(ws.next_json().await["key"], json!(["id"]));
    assert_eq!(ws.initial_rows().await, [json!({"id": 1, "price": 2})]);

    db.exec("alter table items drop constraint items_pkey, add primary key (name)")
        .await;
    assert_eq!(ws.next_json().await["reason"], "table_changed");
    // At once: the relay serves the table as it is before it says it changed.
    ws.send_json(subscribe).await;
    assert_eq!(ws.next_json().await["key"], json!(["name"]));
    assert_eq!(ws.initial_rows().await, [json!({"name": "a", "price": 2})]);
}
