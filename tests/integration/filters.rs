//! Filters: SQL (initial rows) and Rust (live events) agree; filtered copies stay exact.

use std::collections::BTreeSet;

use pgrelay::filter::{self, Filter, Kind};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::support::TestDb;

const PROPERTY_TABLE: &str = "
    create collation ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
    create table p(
    id serial primary key, n int, x numeric, f float8, s text, v varchar(20),
    t timestamptz, ts timestamp, d date, b boolean, u uuid, c char(4), tm time,
    ci text collate ci)";

/// Values per column: rows and filters draw from the same pools, so equalities happen.
fn pool(column: &str) -> &'static [&'static str] {
    match column {
        "n" => &["-5", "0", "3", "7", "2147483647", "-2147483648"],
        "x" => &[
            "1.5",
            "1.50",
            "-0",
            "0",
            "1e3",
            "1000",
            "NaN",
            "Infinity",
            "-Infinity",
            "12345678901234567890.1",
        ],
        "f" => &["0.1", "1e300", "-1e-300", "NaN", "Infinity", "3", "-0.5"],
        "s" | "v" | "c" | "ci" => &[
            "a", "B", "it's", "\"q\"", "é", "É", "日本", "a%b", "", "zz", "ab", "Ab", "a_b", "a,b",
            "(x)",
        ],
        "t" => &[
            "2026-01-01T00:00:00Z",
            "2026-01-01 05:00:00+05",
            "2025-12-31T23:59:59.999999+00",
            "infinity",
            "-infinity",
            "2026-06-01 12:00:00-07",
            // Local mean time offsets (+00:19:32 in Amsterdam), BC, the far future.
            "1800-01-01 00:00:00+00",
            "1800-01-01 00:19:32+00",
            "0044-03-15 12:00:00+00 BC",
            "294276-12-31 23:59:59+00",
            "2026-01-01 00:00:00.123456+00",
        ],
        "ts" => &[
            "2026-01-01 00:00:00",
            "2026-01-01T00:00:00.5",
            "1999-12-31 23:59:59",
            "infinity",
            "0001-01-01 00:00:00 BC",
            "0001-01-01 00:00:00",
            "294276-12-31 23:59:59",
            "2000-01-01 24:00:00",
        ],
        "d" => &[
            "2026-01-01",
            "2025-06-30",
            "infinity",
            "2000-02-29",
            "0044-03-15 BC",
            "4713-01-01 BC",
            "5874897-12-31",
            "0001-01-01",
        ],
        "tm" => &[
            "24:00:00",
            "00:00:00",
            "23:59:59.999999",
            "12:00:00.5",
            "12:00:00",
        ],
        "b" => &["true", "false"],
        "u" => &[
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12",
            "00000000-0000-0000-0000-000000000000",
        ],
        _ => &[],
    }
}

const LIKE_PATTERNS: &[&str] = &["*a*", "a%", "_b", "%\\%%", "É*", "*本", "A*", "*", "a\\_b"];

fn list_item(value: &str) -> String {
    if value.contains([',', '"', '(', ')', '\\']) || value.is_empty() {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        value.to_owned()
    }
}

/// A random condition on `column` as (operator with modifiers, value text as written).
fn random_condition(rng: &mut StdRng, column: &str, kind: Kind) -> (String, String) {
    let values = pool(column);
    let mut ops = vec![
        "eq",
        "neq",
        "in",
        "is.null",
        "is.not_null",
        "isdistinct",
        "eq(any)",
    ];
    match kind {
        Kind::Bool => ops.extend(["is.true", "is.false", "is.unknown"]),
        Kind::Text => ops.extend([
            "lt",
            "lte",
            "gt",
            "gte",
            "like",
            "ilike",
            "like(any)",
            "ilike(all)",
            "gt(all)",
        ]),
        _ => ops.extend(["lt", "lte", "gt", "gte", "lte(any)", "gt(all)"]),
    }
    let op = *ops.choose(rng).unwrap();
    let negated = if rng.random_bool(0.25) { "not." } else { "" };
    let list = |rng: &mut StdRng, items: &mut dyn FnMut(&mut StdRng) -> String| {
        let n = rng.random_range(0..4);
        (0..n).map(|_| items(rng)).collect::<Vec<_>>().join(",")
    };
    let (op, value) = match op {
        "in" => {
            let items = list(rng, &mut |rng| list_item(values.choose(rng).unwrap()));
            ("in".to_owned(), format!("({items})"))
        }
        op @ ("is.null" | "is.not_null" | "is.true" | "is.false" | "is.unknown") => {
            let (is, value) = op.split_once('.').unwrap();
            (is.to_owned(), value.to_owned())
        }
        op @ ("like" | "ilike") => (
            op.to_owned(),
            (*LIKE_PATTERNS.choose(rng).unwrap()).to_owned(),
        ),
        op @ ("like(any)" | "ilike(all)") => {
            let items = list(rng, &mut |rng| {
                list_item(LIKE_PATTERNS.choose(rng).unwrap())
            });
            (op.to_owned(), format!("{{{items}}}"))
        }
        op if op.ends_with(')') => {
            let items = list(rng, &mut |rng| list_item(values.choose(rng).unwrap()));
            (op.to_owned(), format!("{{{items}}}"))
        }
        op => (op.to_owned(), (*values.choose(rng).unwrap()).to_owned()),
    };
    (format!("{negated}{op}"), value)
}

/// A value inside a logic tree: quoted when it holds what would end it.
fn tree_value(op: &str, value: &str) -> String {
    if op.ends_with("in") || op.ends_with(')') || op.ends_with("is") {
        return value.to_owned();
    }
    if value.is_empty() || value.contains([',', '(', ')', '"', '\\', '{']) {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        value.to_owned()
    }
}

/// A random item of a logic tree: a condition, or (above `depth` 0) a nested group.
fn random_item(rng: &mut StdRng, columns: &[pgrelay::filter::Column], depth: u32) -> String {
    if depth > 0 && rng.random_bool(0.3) {
        let head = *["and", "or", "not.and", "not.or"].choose(rng).unwrap();
        let n = rng.random_range(1..=3);
        let items: Vec<String> = (0..n)
            .map(|_| random_item(rng, columns, depth - 1))
            .collect();
        return format!("{head}({})", items.join(","));
    }
    let column = loop {
        let c = columns.choose(rng).unwrap();
        if c.name != "id" {
            break c;
        }
    };
    let (op, value) = random_condition(rng, &column.name, column.kind);
    format!("{}.{op}.{}", column.name, tree_value(&op, &value))
}

/// A random query pair: a condition, or a logic tree (`or=(…)`, `not.and=(…)`).
fn random_pair(rng: &mut StdRng, columns: &[pgrelay::filter::Column]) -> (String, String) {
    if rng.random_bool(0.4) {
        let key = *["and", "or", "not.and", "not.or"].choose(rng).unwrap();
        let n = rng.random_range(1..=3);
        let items: Vec<String> = (0..n).map(|_| random_item(rng, columns, 2)).collect();
        return (key.to_owned(), format!("({})", items.join(",")));
    }
    let column = loop {
        let c = columns.choose(rng).unwrap();
        if c.name != "id" {
            break c;
        }
    };
    let (op, value) = random_condition(rng, &column.name, column.kind);
    (column.name.clone(), format!("{op}.{value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_rust_agree_on_random_filters_over_random_rows() {
    let seed: u64 = std::env::var("PGRELAY_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("property seed {seed} (set PGRELAY_PROPERTY_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let db = TestDb::new().await;
    db.exec(PROPERTY_TABLE).await;
    let client = db.client().await;
    let names = [
        "n", "x", "f", "s", "v", "t", "ts", "d", "b", "u", "c", "tm", "ci",
    ];
    let insert = "insert into p(n, x, f, s, v, t, ts, d, b, u, c, tm, ci) values
        ($1::text::int, $2::text::numeric, $3::text::float8, $4, $5, $6::text::timestamptz,
         $7::text::timestamp, $8::text::date, $9::text::boolean, $10::text::uuid,
         $11::text::char(4), $12::text::time, $13)";
    for _ in 0..300 {
        let values: Vec<Option<String>> = names
            .iter()
            .map(|c| {
                (!rng.random_bool(0.15)).then(|| (*pool(c).choose(&mut rng).unwrap()).to_owned())
            })
            .collect();
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        client.execute(insert, &params).await.unwrap();
    }
    // Rows as events carry them (rendered by the capture trigger's pinned settings, UTC), and
    // as a session in a zone with local-mean-time offsets (+00:19:32) renders them: the relay
    // compares both exactly.
    let render = |zone: &'static str| {
        let client = &client;
        async move {
            client
                .batch_execute(&format!("set timezone = '{zone}'"))
                .await
                .unwrap();
            let rows: Vec<(i32, String)> = client
                .query("select id, to_json(p)::text from p", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            client.batch_execute("reset timezone").await.unwrap();
            rows
        }
    };
    let mut rows = render("UTC").await;
    rows.extend(render("Europe/Amsterdam").await);
    assert!(
        rows.iter().any(|(_, r)| r.contains("+00:19:32")),
        "the Amsterdam rendering has local-mean-time offsets"
    );

    let table = pgrelay::TableName::parse("p").unwrap();
    let info = pgrelay::sql::describe_columns(&client, &table)
        .await
        .unwrap();
    let mut checked = 0;
    let mut trees = 0;
    for _ in 0..600 {
        let count = rng.random_range(1..=3);
        let mut raw = Vec::new();
        let mut text = Vec::new();
        for _ in 0..count {
            let (key, value) = random_pair(&mut rng, &info);
            text.push(format!("{key}={value}"));
            trees += usize::from(filter::is_logic_key(&key));
            raw.push(
                filter::parse_pair(&key, &value)
                    .unwrap_or_else(|e| panic!("seed {seed}: {key}={value}: {e}")),
            );
        }
        let filter: Filter = match filter::compile(&client, &info, raw).await {
            Ok(f) => f,
            Err(filter::FilterError::BadValue { .. }) => continue,
            Err(e) => panic!("{text:?}: {e}"),
        };
        assert!(
            filter.check_live().is_ok(),
            "seed {seed}: {text:?} is evaluated live"
        );
        let mut params = Vec::new();
        let sql = format!("select id from p where {}", filter.to_sql(&mut params));
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let in_sql: BTreeSet<i32> = client
            .query(&sql, &refs)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        // Every rendering of a row must agree with SQL.
        let differ: Vec<&String> = rows
            .iter()
            .filter(|(id, row)| in_sql.contains(id) != filter.matches_text(row))
            .map(|(_, r)| r)
            .take(3)
            .collect();
        if !differ.is_empty() {
            panic!("seed {seed}: filter {text:?} disagrees (sql: {sql}); rows: {differ:?}");
        }
        checked += 1;
    }
    assert!(checked > 300, "only {checked} filters were valid");
    assert!(trees > 100, "only {trees} logic trees were drawn");
}

mod live {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::support::{Relay, TestDb, Ws, http_get, within};

    const ITEMS: &str =
        "create table items(id serial primary key, name text, price numeric, tag text)";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn updates_that_cross_a_filter_arrive_as_create_and_delete() {
        let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
        db.exec("insert into items(id, name, price) values (1, 'cheap', 5), (2, 'dear', 20), (3, 'mid', 15), (4, 'low', 1)").await;
        let relay = Relay::start(&db, &["items"]).await;
        let mut ws = relay.ws("/ws/items?price=gt.10").await;
        db.exec("update items set price = 30 where id = 1").await; // moves in
        db.exec("update items set price = 5 where id = 2").await; // moves out
        db.exec("update items set price = 25 where id = 3").await; // stays in
        db.exec("update items set price = 2 where id = 4").await; // stays out: nothing
        db.exec("insert into items(id, name, price) values (5, 'new', 11), (6, 'no', 3)")
            .await;
        db.exec("delete from items where id in (5, 6)").await;
        let events = ws.events(5).await;
        let got: Vec<(String, i64)> = events
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_owned(),
                    e["id"].as_i64().unwrap(),
                )
            })
            .collect();
        let expected = [
            ("create", 1),
            ("delete", 2),
            ("update", 3),
            ("create", 5),
            ("delete", 5),
        ];
        assert_eq!(got, expected.map(|(t, i)| (t.to_owned(), i)));
        assert_eq!(events[0]["data"]["price"], 30);
        assert!(
            events[0].get("old").is_none(),
            "a create carries no old row"
        );
        assert_eq!(
            events[1]["old"]["price"], 20,
            "a delete carries the row as the client held it"
        );
        assert!(events[1].get("data").is_none());
        assert_eq!(events[2]["changed"], json!(["price"]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logic_trees_mean_the_same_rows_in_the_snapshot_and_the_live_stream() {
        let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
        db.exec(
            "insert into items(id, name, price, tag) values
               (1, 'a', 5, 'x'), (2, 'b', 20, 'w'), (3, 'c', null, 'y'), (4, 'd', 1, 'z'),
               (7, 'g', 30, null)",
        )
        .await;
        let relay = Relay::start(&db, &["items"]).await;
        // price > 10, or (tag = y and not name = d), and never tag = z; NULLs as in SQL.
        let query = "or=(price.gt.10,and(tag.eq.y,name.not.eq.d))&not.or=(tag.eq.z)&snapshot=true";
        let mut ws = relay.ws(&format!("/ws/items?{query}")).await;
        let mut ids: Vec<i64> = ws
            .initial_rows()
            .await
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        ids.sort_unstable();
        // Row 7: not (NULL = 'z') is unknown, so it is not sent, as SQL does not select it.
        assert_eq!(ids, [2, 3], "row 2 by price, row 3 by the and group");
        db.exec("update items set price = 50 where id = 1").await; // in
        db.exec("update items set tag = 'z' where id = 2").await; // out: the not.or group
        db.exec("update items set tag = null where id = 3").await; // out: tag is null
        db.exec("insert into items(id, name, price, tag) values (5, 'e', null, 'y')")
            .await; // in
        db.exec("insert into items(id, name, price, tag) values (6, 'd', null, 'y')")
            .await; // out: name = d
        let events = ws.events(4).await;
        let got: Vec<(String, i64)> = events
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_owned(),
                    e["id"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [("create", 1), ("delete", 2), ("delete", 3), ("create", 5)]
                .map(|(t, i)| (t.to_owned(), i))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_change_reaches_a_filtered_projected_copy_as_a_delete_and_a_create_by_key() {
        let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
        db.exec("insert into items(id, name, price) values (1, 'x', 1), (2, 'y', 2), (3, 'x', 3)")
            .await;
        let relay = Relay::start(&db, &["items"]).await;
        let mut ws = relay
            .ws("/ws/items?name=eq.x&select=price&snapshot=true")
            .await;
        // Initial rows carry the key whatever `select` asks for.
        assert_eq!(
            ws.initial_rows().await,
            [json!({"id": 1, "price": 1}), json!({"id": 3, "price": 3})]
        );
        db.exec("update items set id = 10 where id = 1").await; // in the filter: moves key
        db.exec("update items set id = 20 where id = 2").await; // outside it: nothing
        db.exec("update items set id = 30, name = 'y' where id = 3")
            .await; // leaves it
        db.exec("delete from items where id = 10").await;
        let events = ws.events(4).await;
        assert_eq!(
            events
                .iter()
                .map(|e| (e["type"].as_str().unwrap(), e["id"].as_i64().unwrap()))
                .collect::<Vec<_>>(),
            [("delete", 1), ("create", 10), ("delete", 3), ("delete", 10)]
        );
        assert_eq!(events[0]["old"], json!({"id": 1, "price": 1}));
        assert_eq!(events[1]["data"], json!({"id": 10, "price": 1}));
        assert_eq!(events[2]["old"], json!({"id": 3, "price": 3}));
        // Nothing for key 20, which this copy never held.
        db.exec("insert into items(id, name, price) values (99, 'x', 9)")
            .await;
        assert_eq!(ws.next_json().await["id"], 99);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn select_and_events_shape_what_is_sent() {
        let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
        let relay = Relay::start(&db, &["items"]).await;
        let mut ws = relay
            .ws("/ws/items?select=id,name&events=create,delete")
            .await;
        let mut full = relay.ws("/ws/items").await;
        db.exec("insert into items(name, price, tag) values ('a', 1, 't')")
            .await;
        db.exec("update items set name = 'b'").await;
        db.exec("delete from items").await;
        let events = ws.events(2).await;
        assert_eq!(events[0]["type"], "create");
        assert_eq!(events[0]["data"], json!({"id": 1, "name": "a"}));
        assert_eq!(events[0]["id"], 1);
        assert_eq!(events[1]["type"], "delete");
        assert_eq!(events[1]["old"], json!({"id": 1, "name": "b"}));
        assert_eq!(
            full.events(3).await[1]["data"]["price"],
            1,
            "other subscribers get whole rows"
        );

        // The initial data is projected too, and keeps the key (as events do).
        db.exec("insert into items(name, price) values ('c', 2)")
            .await;
        let mut ws = relay.ws("/ws/items?select=name&snapshot=true").await;
        assert_eq!(ws.initial_rows().await, [json!({"id": 2, "name": "c"})]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_filters_are_rejected_before_the_upgrade_and_by_message() {
        let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
        let relay = Relay::start(&db, &["items"]).await;
        for (query, needle) in [
            ("price=gt.abc", "abc"),
            ("nope=eq.1", "nope"),
            ("price=like.1*", "like"),
            // A pattern PostgreSQL would refuse when it runs (a dangling escape).
            ("name=like.a%5C", "escape character"),
            ("price=between.1", "unknown operator"),
            ("select=id,nope", "nope"),
            ("events=upsert", "upsert"),
            // Operators Rust cannot evaluate exactly as PostgreSQL are refused, not guessed.
            ("name=match.%5Ea", "cannot be evaluated on live events"),
            ("name=fts.cat", "cannot be evaluated on live events"),
            (
                "or=(price.gt.1,name.imatch.x)",
                "cannot be evaluated on live events",
            ),
            ("or=(price.gt.1", "or="),
        ] {
            let (status, body) = http_get(relay.addr, &format!("/ws/items?{query}"))
                .await
                .unwrap();
            assert_eq!(status, 400, "{query}: {body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["code"], "bad_request");
            assert!(
                body["message"].as_str().unwrap().contains(needle),
                "{query}: {body}"
            );
        }

        let mut ws = relay.ws("/ws").await;
        for (message, needle) in [
            (
                json!({"type": "subscribe", "resource": "items", "price": "gt.abc"}),
                "abc",
            ),
            (
                json!({"type": "subscribe", "resource": "items", "nope": "eq.1"}),
                "nope",
            ),
            (
                json!({"type": "subscribe", "resource": "items", "name": "ilike.*\\", "snapshot": true}),
                "escape character",
            ),
            (json!({"type": "subscribe", "resource": "ghosts"}), "ghosts"),
            (json!({"type": "subscribe"}), "resource"),
            (
                json!({"type": "unsubscribe", "resource": "items"}),
                "Not subscribed",
            ),
        ] {
            ws.send_json(message.clone()).await;
            let reply = ws.next_json().await;
            assert_eq!(reply["type"], "error", "{message} -> {reply}");
            assert!(
                reply["message"].as_str().unwrap().contains(needle),
                "{message} -> {reply}"
            );
        }
        ws.send_json(json!({"type": "ping"})).await;
        assert_eq!(
            ws.next_json().await,
            json!({"type": "pong"}),
            "the socket stays open"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_socket_streams_two_tables_each_with_its_filter_then_unsubscribes_one() {
        let db = TestDb::new()
            .await
            .with_tables(
                "create table items(id serial primary key, name text, price numeric);
                 create table orders(id serial primary key, status text)",
                &["items", "orders"],
            )
            .await;
        let relay = Relay::start(&db, &["items", "orders"]).await;
        let mut ws = relay.ws("/ws").await;
        ws.send_json(json!({"type": "subscribe", "resource": "items", "price": "gte.10"}))
            .await;
        assert_eq!(
            ws.next_json().await,
            json!({"type": "subscribed", "resource": "items", "key": ["id"]})
        );
        ws.send_json(json!({"type": "subscribe", "resource": "orders", "status": "eq.open", "snapshot": true})).await;
        assert_eq!(
            ws.next_json().await,
            json!({"type": "subscribed", "resource": "orders", "key": ["id"]})
        );
        assert_eq!(ws.initial_rows().await, Vec::<Value>::new());

        db.exec("insert into items(name, price) values ('cheap', 1), ('dear', 10)")
            .await;
        db.exec("insert into orders(status) values ('closed'), ('open')")
            .await;
        let mut got: Vec<(String, i64)> = ws
            .events(2)
            .await
            .iter()
            .map(|e| {
                (
                    e["resource"].as_str().unwrap().to_owned(),
                    e["id"].as_i64().unwrap(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, vec![("items".to_owned(), 2), ("orders".to_owned(), 2)]);

        ws.send_json(json!({"type": "unsubscribe", "resource": "items"}))
            .await;
        assert_eq!(
            ws.next_json().await,
            json!({"type": "unsubscribed", "resource": "items"})
        );
        db.exec("insert into items(name, price) values ('dear too', 99)")
            .await;
        db.exec("insert into orders(status) values ('open')").await;
        let e = ws.next_json().await;
        assert_eq!(
            (e["resource"].as_str(), e["id"].as_i64()),
            (Some("orders"), Some(3)),
            "items is gone"
        );
    }

    /// A client's filtered copy: initial rows, then events applied strictly.
    #[derive(Default)]
    struct Copy {
        rows: BTreeMap<i64, Value>,
        started: bool,
        done: bool,
    }

    impl Copy {
        fn apply(&mut self, m: &Value) {
            let id = || m["id"].as_i64().unwrap();
            match m["type"].as_str().unwrap() {
                "initial" => {
                    self.started = true;
                    for row in m["data"].as_array().unwrap() {
                        let id = row["id"].as_i64().unwrap();
                        assert!(
                            self.rows.insert(id, row.clone()).is_none(),
                            "row {id} twice"
                        );
                    }
                    self.done = m["done"] == true;
                }
                _ if !self.started => {}
                "create" => assert!(
                    self.rows.insert(id(), m["data"].clone()).is_none(),
                    "duplicate create {m}"
                ),
                "update" => assert!(
                    self.rows.insert(id(), m["data"].clone()).is_some(),
                    "update of a row not held {m}"
                ),
                "delete" => assert!(
                    self.rows.remove(&id()).is_some(),
                    "delete of a row not held {m}"
                ),
                other => panic!("unexpected {other}: {m}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn staggered_filtered_subscribers_end_holding_exactly_the_matching_rows() {
        let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
        db.exec("insert into items(name, price, tag) select 'seed', g % 100, case when g % 3 = 0 then null else 't' || (g % 4) end from generate_series(1, 200) g").await;
        let relay = Relay::start(&db, &["items"]).await;
        let filters = [
            ("price=gt.50", "price > 50"),
            ("price=lte.20", "price <= 20"),
            ("tag=is.null", "tag is null"),
            ("tag=in.(t1,t3)", "tag in ('t1', 't3')"),
            ("price=gte.30&price=lt.70", "price >= 30 and price < 70"),
            ("tag=like.t*&price=neq.10", "tag like 't%' and price <> 10"),
            ("name=eq.w", "name = 'w'"),
            ("price=gt.1000", "price > 1000"),
        ];
        let writer_client = db.client().await;
        let writer = tokio::spawn(async move {
            for i in 0..600i32 {
                let sql = match i % 4 {
                    0 => {
                        "insert into items(name, price, tag) values ('w', $1::int % 100, 't' || ($1::int % 5))"
                    }
                    1 => {
                        "update items set price = (price + 37 + $1::int) % 100 where id = (select max(id) - ($1::int % 9) from items)"
                    }
                    2 => {
                        "update items set tag = case when tag is null then 't1' else null end, price = price + 1 where id = (select min(id) + ($1::int % 11) from items)"
                    }
                    _ => "delete from items where id = (select min(id) + ($1::int % 7) from items)",
                };
                writer_client
                    .execute(sql, &[&i])
                    .await
                    .expect("writer statement");
            }
        });
        let mut clients: Vec<(Ws, Copy, &str)> = Vec::new();
        for (k, (query, predicate)) in filters.iter().enumerate() {
            let mut ws = relay.ws(&format!("/ws/items?{query}")).await;
            ws.send_json(json!({"type": "subscribe"})).await;
            clients.push((ws, Copy::default(), predicate));
            let deadline = tokio::time::Instant::now() + Duration::from_millis(50 + 20 * k as u64);
            for (ws, copy, _) in clients.iter_mut() {
                while let Ok(frame) = tokio::time::timeout_at(deadline, ws.next_json()).await {
                    copy.apply(&frame);
                }
            }
        }
        within(Duration::from_secs(60), writer).await.unwrap();
        // One sentinel row per filter, each passing its own filter: a client that has seen
        // its sentinel's create has seen everything committed before it.
        db.exec(
            "insert into items(id, name, price, tag) values
               (100000, 's', 999, 't9'), (100001, 's', -1, 't9'), (100002, 's', 500, null),
               (100003, 's', 500, 't1'), (100004, 's', 50, 't9'), (100005, 's', 11, 'tz'),
               (100006, 'w', 500, 't9'), (100007, 's', 5000, 't9')",
        )
        .await;
        let client = db.client().await;
        for (k, (ws, copy, predicate)) in clients.iter_mut().enumerate() {
            let sentinel = 100_000 + k as i64;
            loop {
                let frame = ws.next_json().await;
                copy.apply(&frame);
                if frame["type"] == "create" && frame["id"] == sentinel {
                    break;
                }
            }
            let expected: BTreeMap<i64, Value> = client
                .query(
                    &format!("select id, to_jsonb(t) from items t where {predicate}"),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (i64::from(r.get::<_, i32>(0)), r.get::<_, Value>(1)))
                // Sentinels after ours in the same statement may not have been read yet.
                .filter(|(id, _)| *id <= sentinel)
                .collect();
            assert!(copy.done, "{predicate}: initial data finished");
            let ids: std::collections::BTreeSet<&i64> =
                copy.rows.keys().chain(expected.keys()).collect();
            let differ: Vec<(i64, Option<&Value>, Option<&Value>)> = ids
                .into_iter()
                .filter(|id| copy.rows.get(id) != expected.get(id))
                .map(|id| (*id, copy.rows.get(id), expected.get(id)))
                .collect();
            assert!(
                differ.is_empty(),
                "{predicate}: the client's copy differs (id, client, table): {differ:?}"
            );
        }
    }
}
