//! Live events: format, order, exactly once, large rows and statements, isolation by table.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::support::{Relay, TestDb};

const ITEMS: &str = "create table items(id serial primary key, name text, price numeric)";

fn strip_volatile(mut v: Value) -> Value {
    let obj = v.as_object_mut().expect("event is an object");
    let seq = obj.remove("seq").expect("event has seq");
    assert!(
        seq.as_i64().is_some_and(|s| s > 0),
        "seq is a positive integer: {seq}"
    );
    let ts = obj.remove("ts").expect("event has ts");
    let ts = ts.as_str().expect("ts is a string");
    assert!(
        ts.len() >= 20 && ts.as_bytes()[10] == b'T',
        "ts is ISO 8601: {ts}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_type_from_plain_sql_arrives_in_the_design_format() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;

    db.exec("insert into items(name, price) values ('apple', 10.5)")
        .await;
    db.exec("update items set name = 'orange', price = 12.0 where id = 1")
        .await;
    db.exec("delete from items where id = 1").await;

    let events = ws.events(3).await;
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs increase: {seqs:?}"
    );
    let events: Vec<Value> = events.into_iter().map(strip_volatile).collect();
    assert_eq!(
        events[0],
        json!({"type": "create", "resource": "items", "id": 1,
               "data": {"id": 1, "name": "apple", "price": 10.5}})
    );
    assert_eq!(
        events[1],
        json!({"type": "update", "resource": "items", "id": 1,
               "data": {"id": 1, "name": "orange", "price": 12.0},
               "old": {"id": 1, "name": "apple", "price": 10.5},
               "changed": ["name", "price"]})
    );
    assert_eq!(
        events[2],
        json!({"type": "delete", "resource": "items", "id": 1,
               "old": {"id": 1, "name": "orange", "price": 12.0}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_schemas_and_types_render_as_postgres_does() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create schema shop;
             create table shop.lines(order_id int, line int, sku text, at timestamptz,
                                     big numeric, tags text[], meta jsonb, ok boolean,
                                     primary key (order_id, line))",
            &["shop.lines"],
        )
        .await;
    let relay = Relay::start(&db, &["shop.lines"]).await;
    let mut ws = relay.ws("/ws/shop.lines").await;
    db.exec(
        "insert into shop.lines values (7, 2, 'a\"b', '2026-01-02 03:04:05.5+00',
                                        12345678901234567890.123, '{x,y}', '{\"k\": [1]}', true)",
    )
    .await;
    let e = strip_volatile(ws.next_json().await);
    assert_eq!(e["resource"], "shop.lines");
    assert_eq!(e["id"], json!({"order_id": 7, "line": 2}));
    let data = &e["data"];
    assert_eq!(data["sku"], "a\"b");
    assert_eq!(data["at"], "2026-01-02T03:04:05.5+00:00");
    // numeric keeps every digit: serialized as PostgreSQL's to_jsonb renders it.
    assert_eq!(data["big"].to_string(), "12345678901234567890.123");
    assert_eq!(data["tags"], json!(["x", "y"]));
    assert_eq!(data["meta"], json!({"k": [1]}));
    assert_eq!(data["ok"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20000_row_statement_arrives_whole_in_seq_order() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("insert into items(name, price) select 'n' || g, g from generate_series(1, 20000) g")
        .await;
    let events = ws.events(20_000).await;
    let mut last = 0;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["type"], "create");
        assert_eq!(e["data"]["name"], format!("n{}", i + 1));
        let seq = e["seq"].as_i64().unwrap();
        assert!(seq > last, "seq order");
        last = seq;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_9k_100k_and_2mb_commit_and_arrive_whole() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table docs(id int primary key, body text)",
            &["docs"],
        )
        .await;
    let relay = Relay::start(&db, &["docs"]).await;
    let mut ws = relay.ws("/ws/docs").await;
    let sizes = [9_000usize, 100_000, 2_000_000];
    let client = db.client().await;
    for (i, size) in sizes.iter().enumerate() {
        let body: String = (0..*size)
            .map(|j| char::from(b'a' + (j % 26) as u8))
            .collect();
        client
            .execute("insert into docs values ($1, $2)", &[&(i as i32), &body])
            .await
            .expect("a large row commits");
        client
            .execute(
                "update docs set body = body || 'x' where id = $1",
                &[&(i as i32)],
            )
            .await
            .expect("a large update commits");
    }
    for (i, size) in sizes.iter().enumerate() {
        let created = ws.next_json().await;
        assert_eq!(created["type"], "create");
        assert_eq!(created["id"], i);
        assert_eq!(created["data"]["body"].as_str().unwrap().len(), *size);
        let updated = ws.next_json().await;
        assert_eq!(updated["type"], "update");
        assert_eq!(updated["data"]["body"].as_str().unwrap().len(), size + 1);
        assert_eq!(updated["old"]["body"].as_str().unwrap().len(), *size);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_sends_nothing() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec(
        "begin; insert into items(name) values ('ghost'); update items set name = 'x'; rollback",
    )
    .await;
    db.exec(
        "begin; insert into items(name) values ('half'); savepoint s;
         insert into items(name) values ('undone'); rollback to s; commit",
    )
    .await;
    db.exec("insert into items(name) values ('sentinel')").await;
    let first = ws.next_json().await;
    assert_eq!(first["data"]["name"], "half");
    let second = ws.next_json().await;
    assert_eq!(
        second["data"]["name"], "sentinel",
        "nothing rolled back was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_writers_of_500_transactions_arrive_exactly_once() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = db.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..500 {
                client
                    .execute(
                        "insert into items(name) values ($1)",
                        &[&format!("w{w}-{i}")],
                    )
                    .await
                    .expect("insert");
            }
        }));
    }
    let events = ws.events(2000).await;
    for w in writers {
        w.await.unwrap();
    }
    let names: HashSet<String> = events
        .iter()
        .map(|e| e["data"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 2000, "no duplicates and none missing");
    // Each writer's own transactions arrive in its commit order.
    for w in 0..4 {
        let mine: Vec<usize> = events
            .iter()
            .filter_map(|e| {
                let n = e["data"]["name"].as_str().unwrap();
                n.strip_prefix(&format!("w{w}-"))
                    .map(|i| i.parse().unwrap())
            })
            .collect();
        assert_eq!(mine, (0..500).collect::<Vec<_>>());
    }
    // Nothing extra follows.
    db.exec("insert into items(name) values ('sentinel')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "sentinel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_table_never_reach_another_tables_route() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table a(id int primary key); create table b(id int primary key);
             create table c(id int primary key)",
            &["a", "b", "c"],
        )
        .await;
    // `c` has capture installed but is not exposed by this relay.
    let relay = Relay::start(&db, &["a", "b"]).await;
    let mut wa = relay.ws("/ws/a").await;
    let mut wb = relay.ws("/ws/b").await;
    db.exec("insert into a values (1); insert into c values (3); insert into b values (2); insert into a values (4)").await;
    let ea = wa.events(2).await;
    assert_eq!(
        (ea[0]["id"].as_i64(), ea[1]["id"].as_i64()),
        (Some(1), Some(4))
    );
    assert!(ea.iter().all(|e| e["resource"] == "a"));
    let eb = wb.next_json().await;
    assert_eq!(
        (eb["resource"].as_str(), eb["id"].as_i64()),
        (Some("b"), Some(2))
    );
    db.exec("insert into b values (5)").await;
    assert_eq!(
        wb.next_json().await["id"],
        5,
        "b received nothing of a or c"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_notify_payload_is_counted_and_skipped() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("select pg_notify('pgrelay', 'not json'); select pg_notify('pgrelay', '{\"k\":\"p\",\"xid\":\"1\",\"from\":9,\"to\":1,\"n\":1}')").await;
    db.exec("insert into items(name) values ('after')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "after");
    let (status, body) = crate::support::http_get(relay.addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("pgrelay_bad_payloads_total 2"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_update_is_a_delete_then_a_create_and_a_no_op_update_is_an_update() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("insert into items(name) select 'n' || g from generate_series(1, 3) g")
        .await;
    assert!(ws.events(3).await.iter().all(|e| e["type"] == "create"));
    // Keys 1, 2, 3 become 11, 12, 13. Row by row, in the order the statement changed them
    // (with a key that is not DEFERRABLE, every step of that order is a valid table): each
    // is a delete of the old key then a create of the new one.
    db.exec("update items set id = id + 10").await;
    db.exec("update items set name = name where id = 11").await;
    let events = ws.events(7).await;
    for (pair, id) in events[..6].chunks(2).zip(1..) {
        assert_eq!(pair[0]["type"], "delete");
        assert_eq!(pair[0]["id"], id);
        assert_eq!(pair[0]["old"]["name"], format!("n{id}"));
        assert!(pair[0].get("data").is_none());
        assert_eq!(pair[1]["type"], "create");
        assert_eq!(pair[1]["id"], id + 10);
        assert_eq!(pair[1]["data"]["name"], format!("n{id}"));
        assert!(pair[1].get("old").is_none());
    }
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(events[6]["type"], "update");
    assert_eq!(events[6]["changed"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bulk_statements_with_interleaved_seqs_arrive_exactly_once() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = db.client().await;
        writers.push(tokio::spawn(async move {
            for s in 0..25 {
                // Each statement is one pointer notification; the 4 writers' statements run
                // at the same time, so their seq ranges interleave.
                client
                    .execute(
                        "insert into items(name) select $1 || '-' || g from generate_series(1, 40) g",
                        &[&format!("w{w}-s{s}")],
                    )
                    .await
                    .expect("bulk insert");
            }
        }));
    }
    let events = ws.events(4000).await;
    for w in writers {
        w.await.unwrap();
    }
    let names: Vec<String> = events
        .iter()
        .map(|e| e["data"]["name"].as_str().unwrap().to_owned())
        .collect();
    let unique: HashSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), 4000, "each row exactly once");
    // A statement's rows arrive together and in order.
    for chunk in names.chunks(40) {
        let statement = chunk[0].rsplit_once('-').unwrap().0;
        let expected: Vec<String> = (1..=40).map(|g| format!("{statement}-{g}")).collect();
        assert_eq!(chunk, expected.as_slice());
    }
    // Whether the ranges interleaved is up to the scheduler (they do here); report it.
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    let interleaved = seqs.chunks(40).any(|c| c[39] - c[0] != 39);
    eprintln!("bulk statements interleaved their seqs: {interleaved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_writers_of_different_tables_never_fail_because_of_capture() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table a(id serial primary key, n int); create table b(id serial primary key, n int)",
            &["a", "b"],
        )
        .await;
    let one = db.client().await;
    let two = db.client().await;
    for round in 0..30 {
        // Interleaved: each transaction writes twice, the other one in between.
        one.batch_execute("begin isolation level serializable")
            .await
            .unwrap();
        two.batch_execute("begin isolation level serializable")
            .await
            .unwrap();
        one.execute("insert into a(n) values ($1)", &[&round])
            .await
            .unwrap();
        two.execute("insert into b(n) values ($1)", &[&round])
            .await
            .unwrap();
        one.execute("insert into a(n) values ($1)", &[&round])
            .await
            .unwrap();
        two.execute("insert into b(n) values ($1)", &[&round])
            .await
            .unwrap();
        one.batch_execute("commit")
            .await
            .expect("capture made a serializable writer fail");
        two.batch_execute("commit")
            .await
            .expect("capture made a serializable writer fail");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_named_like_the_triggers_aliases_are_captured_whole() {
    // t, n, o, r, i, k, c, p, keys, single are names the capture SQL uses internally.
    let db = TestDb::new()
        .await
        .with_tables(
            "create table odd(t int, n int, o int, r int, i int, k int, c int, p int,
                              keys int, single int, primary key (t, k))",
            &["odd"],
        )
        .await;
    let relay = Relay::start(&db, &["odd"]).await;
    let mut ws = relay.ws("/ws/odd").await;
    db.exec("insert into odd values (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)")
        .await;
    db.exec("update odd set n = 20").await;
    db.exec("delete from odd").await;
    let events = ws.events(3).await;
    let row = json!({"t": 1, "n": 2, "o": 3, "r": 4, "i": 5, "k": 6, "c": 7, "p": 8, "keys": 9, "single": 10});
    assert_eq!(events[0]["data"], row);
    assert_eq!(events[0]["id"], json!({"t": 1, "k": 6}));
    assert_eq!(events[1]["old"], row);
    assert_eq!(events[1]["data"]["n"], 20);
    assert_eq!(events[2]["type"], "delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_rows_pruned_before_a_relay_read_them_reset_its_subscribers_not_silently() {
    use std::time::Duration;
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    // Connections of our own, opened before the relay is cut off from the database.
    let writer = db.client().await;
    // (Named so that terminating the relay's connections leaves it alone.)
    let url = format!("{} application_name=test_pool", db.url);
    let pool = pgrelay::sql::pool(&url, 1, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
    drop(pool.get().await.unwrap());
    let admin = crate::support::connect(&crate::support::admin_url()).await;
    let quoted = format!("\"{}\"", db.name);
    admin
        .batch_execute(&format!(
            "alter database {quoted} with allow_connections false"
        ))
        .await
        .unwrap();
    crate::support::terminate_relay_connections(&db).await;
    crate::support::wait_for_metrics(relay.addr, &["pgrelay_capture_listening 0"]).await;
    // Rows are written while the relay is away for longer than retention waits for a relay
    // (faked: its last report is made old), and retention prunes them.
    writer
        .batch_execute(
            "insert into items(name) select 'n' || g from generate_series(1, 10) g;
             update pgrelay.relays set seen_at = now() - interval '10 minutes'",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let retention = pgrelay::retention::Retention {
        max_age: Some(Duration::from_millis(1)),
        max_rows: None,
        interval: Duration::from_secs(60),
    };
    let token = tokio_util::sync::CancellationToken::new();
    let pruned = pgrelay::retention::prune(&pool, &retention, &token)
        .await
        .unwrap();
    assert!(pruned >= 1, "the statement's log row was pruned");
    admin
        .batch_execute(&format!(
            "alter database {quoted} with allow_connections true"
        ))
        .await
        .unwrap();
    relay.wait_ready().await;
    // The subscriber is told its copy has a hole, in stream order, then the stream goes on.
    assert_eq!(
        ws.next_json().await,
        json!({"type": "reset", "resource": "items", "reason": "events_missing"})
    );
    db.exec("insert into items(name) values ('after')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_is_an_event_in_stream_order_for_every_subscriber_that_wants_it() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut plain = relay.ws("/ws/items").await;
    let mut filtered = relay.ws("/ws/items?name=eq.b&select=name").await;
    let mut creates_only = relay.ws("/ws/items?events=create").await;
    let mut truncates = relay.ws("/ws/items?events=truncate,delete").await;
    db.exec("insert into items(name) values ('a'), ('b'); truncate items; insert into items(name) values ('c')")
        .await;
    let events = plain.events(4).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["create", "create", "truncate", "create"]);
    let truncate = &events[2];
    assert_eq!(
        truncate,
        &json!({"type": "truncate", "resource": "items", "seq": truncate["seq"], "ts": truncate["ts"]})
    );
    assert!(truncate["seq"].as_i64().unwrap() > events[1]["seq"].as_i64().unwrap());
    assert!(truncate["ts"].as_str().unwrap().ends_with("+00:00"));
    // A filtered subscriber's copy is emptied too.
    assert_eq!(
        filtered.next_json().await["data"],
        json!({"id": 2, "name": "b"})
    );
    assert_eq!(filtered.next_json().await["type"], "truncate");
    // `events=` lists it like the other types.
    let creates: Vec<Value> = creates_only.events(3).await;
    assert!(creates.iter().all(|e| e["type"] == "create"));
    assert_eq!(truncates.next_json().await["type"], "truncate");
    db.exec("delete from items").await;
    assert_eq!(truncates.next_json().await["type"], "delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_reads_of_one_row_tables_are_never_jit_compiled() {
    // `enable_seqscan = off` prices these scans at 10^10: with JIT on, each was compiled
    // (85-130 ms, once a second in the progress report; BENCHMARKS.md 0d).
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let client = db.client().await;
    client
        .batch_execute(pgrelay::capture::SESSION_SETTINGS)
        .await
        .unwrap();
    for query in [
        "select xid::text from pgrelay.pruned",
        "select case when is_called then last_value else 0 end from pgrelay.changes_seq",
    ] {
        let plan = client
            .query_one(&format!("explain (analyze, format json) {query}"), &[])
            .await
            .unwrap()
            .get::<_, serde_json::Value>(0)
            .to_string();
        assert!(!plan.contains("JIT"), "{query}: {plan}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_reads_only_new_rows_however_long_the_log_is() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    // 20,000 single-row statements: 20,000 log rows; and one transaction of 40 chunks, so
    // that the statistics see an xid matching many rows.
    db.exec(
        "do $$ begin for i in 1..20000 loop insert into items(name) values ('x'); end loop; end $$",
    )
    .await;
    db.exec("insert into items(name) select 'y' from generate_series(1, 40000); analyze pgrelay.changes")
        .await;
    let client = db.client().await;
    // With the capture connection's settings.
    client
        .batch_execute(pgrelay::capture::SESSION_SETTINGS)
        .await
        .unwrap();
    let relid: u32 = client
        .query_one("select 'items'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    // As a poll runs once it has read all that: candidates are two transactions the last
    // snapshot saw in progress (committed since) and everything from now on.
    let mut xip = Vec::new();
    for _ in 0..2 {
        let xid: String = client
            .query_one("select pg_current_xact_id()::text", &[])
            .await
            .unwrap()
            .get(0);
        xip.push(xid);
    }
    let xmax: String = client
        .query_one("select pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .unwrap()
        .get(0);
    // The poll as capture runs it: prepared once, then executed (the plan EXPLAIN EXECUTE
    // shows is the one the session's plan mode gives a prepared statement: capture's is a
    // generic plan, chosen without the parameters). Run more often than PostgreSQL's five
    // custom plans, so that this holds whichever plan mode the settings choose. The values
    // are digits this test drew, so they go into the EXECUTE as literals.
    client
        .batch_execute(&format!(
            "prepare poll(text[], text, oid[], int8) as {}",
            pgrelay::capture::poll::small_poll()
        ))
        .await
        .unwrap();
    let execute = format!(
        "explain (analyze, format json) execute poll('{{{}}}', '{xmax}', '{{{relid},0}}', 64)",
        xip.join(",")
    );
    let mut plan = String::new();
    for _ in 0..8 {
        plan = client
            .query_one(&execute, &[])
            .await
            .unwrap()
            .get::<_, serde_json::Value>(0)
            .to_string();
    }
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(!plan.contains("Gather"), "{plan}");
    let walked: u64 = plan
        .split("\"Rows Removed by Filter\":")
        .skip(1)
        .map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(
        walked < 100,
        "the poll walked the log ({walked} rows): {plan}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_subscribers_get_events_together_each_exactly_as_sent_alone() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut single = relay.ws("/ws/items").await;
    let mut batched = relay.ws("/ws/items?batch=true").await;
    let mut by_message = relay.ws("/ws").await;
    by_message
        .send_json(
            json!({"type": "subscribe", "resource": "items", "batch": true, "price": "gte.1000"}),
        )
        .await;
    assert_eq!(by_message.next_json().await["type"], "subscribed");
    db.exec("insert into items(name, price) select 'n' || g, g from generate_series(1, 2500) g; truncate items")
        .await;
    let alone: Vec<Value> = single.events(2501).await;
    // The same events, in the same order, in frames of at most 1,000.
    let mut together = Vec::new();
    let mut frames = 0;
    while together.len() < alone.len() {
        let frame = batched.next_json().await;
        assert_eq!(frame["type"], "batch", "{frame}");
        assert_eq!(frame["resource"], "items");
        let events = frame["events"].as_array().unwrap();
        assert!(!events.is_empty() && events.len() <= 1000);
        together.extend(events.iter().cloned());
        frames += 1;
    }
    assert_eq!(together, alone);
    assert!(frames >= 3, "{frames} frames");
    // Filters apply to batches as to single events.
    let mut filtered = Vec::new();
    while filtered.len() < 1502 {
        let frame = by_message.next_json().await;
        assert_eq!(frame["type"], "batch", "{frame}");
        filtered.extend(frame["events"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(filtered.first().unwrap()["id"], 1000);
    assert_eq!(filtered.last().unwrap()["type"], "truncate");
}
