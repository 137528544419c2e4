//! REST API: CRUD, errors, limits, hostile input, composite keys, and a database that is down.

mod postgrest;

use std::time::{Duration, Instant};

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Value, json};

use crate::support::{
    Relay, Response, STEP, TestDb, admin_url, connect, http, http_raw, http_with, within,
};

const SCHEMA: &str = "
    create table items(
        id serial primary key,
        name text not null,
        price numeric check (price >= 0),
        tags text[],
        meta jsonb,
        created_at timestamptz not null default now());
    create table orders(id int primary key, customer text);
    create table lines(
        order_id int references orders(id),
        line_no int,
        qty int not null default 1,
        primary key (order_id, line_no));";

async fn setup() -> (TestDb, Relay) {
    let db = TestDb::new()
        .await
        .with_tables(SCHEMA, &["items", "orders", "lines"])
        .await;
    let relay = Relay::start(&db, &["items", "orders", "lines"]).await;
    (db, relay)
}

fn enc(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

async fn count(db: &TestDb, table: &str) -> i64 {
    db.client()
        .await
        .query_one(&format!("select count(*) from {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// An error in PostgREST's shape (`code`, `message`, `details`, `hint`), leaking no SQL.
#[track_caller]
pub fn assert_error(response: &Response, status: u16, code: &str) {
    assert_eq!(
        (response.status, response.json["code"].as_str()),
        (status, Some(code)),
        "{}",
        response.text
    );
    let object = response.json.as_object().expect("an error object");
    for field in ["code", "message", "details", "hint"] {
        assert!(object.contains_key(field), "no {field}: {}", response.text);
    }
    let message = response.json["message"].as_str().unwrap_or("");
    assert!(!message.is_empty(), "error without a message");
    for text in ["message", "details", "hint"] {
        let text = response.json[text].as_str().unwrap_or("");
        for internal in [
            "to_jsonb",
            "to_json(",
            "insert into",
            "returning",
            "jsonb_populate",
            "$1",
        ] {
            assert!(!text.contains(internal), "the error leaks SQL: {text}");
        }
    }
}

/// POST returning what was stored, as postgrest-js's `insert().select()` asks
/// (`Prefer: return=representation`); an object body comes back as one object
/// (`.single()`), an array as an array.
#[track_caller]
fn post(
    addr: std::net::SocketAddr,
    path: &str,
    body: &Value,
) -> impl Future<Output = Response> + use<> {
    let accept = if body.is_object() {
        "application/vnd.pgrst.object+json"
    } else {
        "application/json"
    };
    http_with(
        addr,
        "POST",
        path,
        &[("Prefer", "return=representation"), ("Accept", accept)],
        Some(body),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_round_trip_returns_the_stored_rows() {
    let (_db, relay) = setup().await;
    let a = relay.addr;

    let created = post(a, "/api/items", &json!({"name": "apple", "price": 10.5})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let row = created.json;
    let id = row["id"].as_i64().expect("serial id filled");
    assert_eq!(row["name"], "apple");
    assert_eq!(row["price"], json!(10.5));
    assert!(row["created_at"].is_string(), "default filled: {row}");

    let read = http(a, "GET", &format!("/api/items/{id}"), None).await;
    assert_eq!((read.status, &read.json), (200, &row));

    let patched = http(
        a,
        "PATCH",
        &format!("/api/items/{id}"),
        Some(&json!({"price": 12})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(patched.json["name"], "apple", "PATCH leaves other columns");
    assert_eq!(patched.json["price"], json!(12));

    let put = http(
        a,
        "PUT",
        &format!("/api/items/{id}"),
        Some(&json!({"name": "pear", "tags": ["x"]})),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(put.json["id"], json!(id), "PUT keeps the key");
    assert_eq!(put.json["name"], "pear");
    assert_eq!(
        put.json["price"],
        Value::Null,
        "PUT resets what it leaves out"
    );
    assert_eq!(put.json["tags"], json!(["x"]));
    assert!(put.json["created_at"].is_string(), "column default applied");

    let deleted = http(a, "DELETE", &format!("/api/items/{id}"), None).await;
    assert_eq!((deleted.status, &deleted.json), (200, &put.json));
    assert_error(
        &http(a, "GET", &format!("/api/items/{id}"), None).await,
        404,
        "PGRST116",
    );
    assert_error(
        &http(a, "DELETE", &format!("/api/items/{id}"), None).await,
        404,
        "PGRST116",
    );
    assert_error(
        &http(
            a,
            "PATCH",
            &format!("/api/items/{id}"),
            Some(&json!({"price": 1})),
        )
        .await,
        404,
        "PGRST116",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_writes_reach_websocket_subscribers() {
    let (_db, relay) = setup().await;
    let a = relay.addr;
    let mut ws = relay.ws("/ws/items").await;

    let created = post(a, "/api/items", &json!({"name": "fig", "price": 3})).await;
    assert_eq!(created.status, 201);
    let id = created.json["id"].as_i64().unwrap();
    let patched = http(
        a,
        "PATCH",
        &format!("/api/items/{id}"),
        Some(&json!({"price": 4})),
    )
    .await;
    let deleted = http(a, "DELETE", &format!("/api/items/{id}"), None).await;
    assert_eq!((patched.status, deleted.status), (200, 200));

    let events = ws.events(3).await;
    assert_eq!(events[0]["type"], "create");
    assert_eq!(events[0]["data"], created.json);
    assert_eq!(events[1]["type"], "update");
    assert_eq!(events[1]["data"], patched.json);
    assert_eq!(events[1]["changed"], json!(["price"]));
    assert_eq!(events[2]["type"], "delete");
    assert_eq!(events[2]["old"], deleted.json);
    assert!(events.iter().all(|e| e["id"] == json!(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_insert_is_one_transaction() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    let mut ws = relay.ws("/ws/items").await;

    let rows =
        json!([{"name": "a", "price": 1}, {"name": "b", "price": 2}, {"name": "c", "price": 3}]);
    let created = post(a, "/api/items", &rows).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let stored = created.json.as_array().unwrap();
    let names: Vec<&str> = stored.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["a", "b", "c"],
        "stored rows come back in body order"
    );
    assert!(stored.iter().all(|r| r["id"].is_i64()));
    let events = ws.events(3).await;
    assert!(events.iter().all(|e| e["type"] == "create"));

    // Rows naming different columns: each gets its own defaults.
    let mixed =
        json!([{"name": "d"}, {"name": "e", "price": 5, "meta": {"k": [1, 2]}}, {"name": "f"}]);
    let created = post(a, "/api/items", &mixed).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.json[1]["meta"], json!({"k": [1, 2]}));
    assert_eq!(created.json[2]["price"], Value::Null);
    assert_eq!(count(&db, "items").await, 6);

    // One bad row: nothing of the batch is stored.
    for bad in [
        json!([{"name": "g"}, {"name": null}, {"name": "h"}]),
        json!([{"name": "g", "price": 1}, {"name": "h", "price": -1}]),
        json!([{"name": "g"}, {"name": "h", "price": "lots"}]),
    ] {
        let response = post(a, "/api/items", &bad).await;
        assert!(response.status == 400, "{bad}: {}", response.text);
    }
    let response = post(
        a,
        "/api/items",
        &json!([{"name": "g"}, {"name": "h", "price": "lots"}]),
    )
    .await;
    assert_error(&response, 400, "22P02");
    let details = response.json["details"].as_str().unwrap();
    assert!(
        details.contains("Row 1") && details.contains("price"),
        "{details}"
    );
    assert_eq!(count(&db, "items").await, 6);

    let empty = post(a, "/api/items", &json!([])).await;
    assert_eq!((empty.status, &empty.json), (201, &json!([])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_order_and_page() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    db.exec(
        "insert into items(name, price) select 'item ' || n, n % 50 from generate_series(1, 1200) n",
    )
    .await;

    // No implicit limit, as PostgREST without db-max-rows.
    let page = http(a, "GET", "/api/items", None).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.json.as_array().unwrap().len(),
        1200,
        "no default limit"
    );
    assert_eq!(page.header("content-range").as_deref(), Some("0-1199/*"));
    let most = http(a, "GET", "/api/items?limit=1000", None).await;
    assert_eq!(most.json.as_array().unwrap().len(), 1000);

    let response = http(
        a,
        "GET",
        "/api/items?price=gte.48&order=price.desc,id.desc&limit=3&offset=1&select=id,price",
        None,
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text);
    // price 49: ids 1199, 1149, …; price 48: ids 1198, …
    assert_eq!(
        response.json,
        json!([{"id": 1149, "price": 49}, {"id": 1099, "price": 49}, {"id": 1049, "price": 49}])
    );
    let all_high = http(a, "GET", "/api/items?price=gte.48&limit=1000", None).await;
    assert_eq!(all_high.json.as_array().unwrap().len(), 48);
    let ids: Vec<i64> = all_high
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "default order is the key"
    );

    let listed = http(
        a,
        "GET",
        "/api/items?name=in.(item%201,item%202)&price=lt.2&order=name",
        None,
    )
    .await;
    assert_eq!(listed.json.as_array().unwrap().len(), 1, "{}", listed.text);
    assert_eq!(listed.json[0]["name"], "item 1");
    // " 11" starts the names of items 11, 110-119 and 1100-1199.
    let liked = http(a, "GET", "/api/items?name=like.*%2011*&limit=1000", None).await;
    assert_eq!(liked.json.as_array().unwrap().len(), 1 + 10 + 100);

    assert_error(
        &http(a, "GET", "/api/items?order=nope.desc", None).await,
        400,
        "42703",
    );
    assert_error(
        &http(a, "GET", "/api/items?nope=eq.1", None).await,
        400,
        "42703",
    );
    assert_error(
        &http(a, "GET", "/api/items?select=id,nope", None).await,
        400,
        "42703",
    );
    assert_error(
        &http(a, "GET", "/api/items?price=gt.abc", None).await,
        400,
        "22P02",
    );
    assert_error(
        &http(a, "GET", "/api/items?price=between.1", None).await,
        400,
        "PGRST100",
    );
    assert_error(
        &http(a, "GET", "/api/items?order=price.sideways", None).await,
        400,
        "PGRST100",
    );
    assert_error(
        &http(a, "GET", "/api/items?limit=-1", None).await,
        400,
        "PGRST100",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    let first = post(a, "/api/items", &json!({"id": 1, "name": "one"})).await;
    assert_eq!(first.status, 201);

    let raw = |method: &str, path: &str, body: &str| {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        within(STEP, http_raw(a, head, body.as_bytes().to_vec()))
    };
    let bad_json = raw("POST", "/api/items", "{\"name\": ").await.unwrap();
    assert_error(&bad_json, 400, "PGRST102");
    let not_object = raw("POST", "/api/items", "42").await.unwrap();
    assert_error(&not_object, 400, "PGRST102");

    let unknown = post(a, "/api/items", &json!({"name": "x", "colour": "red"})).await;
    assert_error(&unknown, 400, "PGRST204");
    assert!(unknown.json["message"].as_str().unwrap().contains("colour"));

    assert_error(&http(a, "GET", "/api/nope", None).await, 404, "PGRST205");
    assert_error(&post(a, "/api/nope", &json!({})).await, 404, "PGRST205");
    assert_error(&http(a, "GET", "/api/nope/1", None).await, 404, "PGRST205");

    let wrong_type = post(a, "/api/items", &json!({"name": "x", "price": "ten"})).await;
    assert_error(&wrong_type, 400, "22P02");
    let message = wrong_type.json["message"].as_str().unwrap();
    let details = wrong_type.json["details"].as_str().unwrap();
    assert!(
        details.contains("price") && message.contains("numeric"),
        "{message} / {details}"
    );
    assert_error(&http(a, "GET", "/api/items/abc", None).await, 400, "22P02");

    let duplicate = post(a, "/api/items", &json!({"id": 1, "name": "again"})).await;
    assert_error(&duplicate, 409, "23505");
    assert!(
        duplicate.json["message"]
            .as_str()
            .unwrap()
            .contains("items_pkey")
    );

    let not_null = post(a, "/api/items", &json!({"price": 1})).await;
    assert_error(&not_null, 400, "23502");
    assert!(
        not_null.json["message"]
            .as_str()
            .unwrap()
            .contains("\"name\"")
    );
    let patch_null = http(a, "PATCH", "/api/items/1", Some(&json!({"name": null}))).await;
    assert_error(&patch_null, 400, "23502");

    let check = post(a, "/api/items", &json!({"name": "x", "price": -1})).await;
    assert_error(&check, 400, "23514");
    assert!(
        check.json["message"]
            .as_str()
            .unwrap()
            .contains("items_price_check")
    );

    // A delete without a filter would empty the table: refused, as pg-safeupdate does.
    let unfiltered = http(a, "DELETE", "/api/items", None).await;
    assert_error(&unfiltered, 400, "21000");
    assert!(
        unfiltered.json["hint"]
            .as_str()
            .unwrap()
            .contains("--rest-allow-unfiltered-writes")
    );
    assert_error(
        &post(a, "/api/items/1", &json!({})).await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &http(a, "PATCH", "/api/items/1", Some(&json!({}))).await,
        400,
        "PGRST102",
    );
    assert_error(
        &http(a, "PATCH", "/api/items/1", Some(&json!([{}]))).await,
        400,
        "PGRST102",
    );

    assert_eq!(count(&db, "items").await, 1);
    let one = http(a, "GET", "/api/items/1", None).await;
    assert_eq!(one.json["name"], "one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_and_nothing_is_stored() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    // 30 MB of valid rows: stored, if the limit did not hold.
    let row = json!({"name": "x".repeat(1000)}).to_string();
    let mut body = String::from("[");
    while body.len() < 30 * 1024 * 1024 {
        body.push_str(&row);
        body.push(',');
    }
    body.push_str(&row);
    body.push(']');
    let body = body.into_bytes();

    let started = Instant::now();
    let head = format!(
        "POST /api/items HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    let response = within(STEP, http_raw(a, head, body.clone())).await.unwrap();
    assert_error(&response, 413, "PGRST102");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Without a length (chunked), the limit holds while reading.
    let mut chunked = Vec::new();
    for part in body[..3 * 1024 * 1024].chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = format!(
        "POST /api/items HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    );
    let response = within(STEP, http_raw(a, head, chunked)).await.unwrap();
    assert_error(&response, 413, "PGRST102");

    assert_eq!(count(&db, "items").await, 0);
    // A body under the limit, chunked, is fine.
    let small = br#"{"name":"small"}"#;
    let head = format!(
        "POST /api/items HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    );
    let mut chunked = format!("{:x}\r\n", small.len()).into_bytes();
    chunked.extend_from_slice(small);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let response = within(STEP, http_raw(a, head, chunked)).await.unwrap();
    assert_eq!(response.status, 201, "{}", response.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_are_stored_and_matched_exactly() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    let values = [
        "it's",
        "\"quoted\"",
        "x'; drop table items; --",
        "a;b;c",
        "日本語 ✓ é",
        "back\\slash",
        "comma, (paren)",
        "*star*",
        "100%_",
    ];
    for value in values {
        let created = post(
            a,
            "/api/items",
            &json!({"name": value, "meta": {"v": value}}),
        )
        .await;
        assert_eq!(created.status, 201, "{value}: {}", created.text);
        assert_eq!(created.json["name"], value);
        assert_eq!(created.json["meta"]["v"], value);
    }
    for value in values {
        let listed = http(
            a,
            "GET",
            &format!("/api/items?name=eq.{}", enc(value)),
            None,
        )
        .await;
        assert_eq!(listed.status, 200, "{value}: {}", listed.text);
        let rows = listed.json.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{value}: {}", listed.text);
        assert_eq!(rows[0]["name"], value);
    }
    let stored: Vec<String> = db
        .client()
        .await
        .query("select name from items order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, values);

    // Text keys with commas, slashes and unicode, addressed percent-encoded.
    db.exec("create table tags(name text primary key, n int)")
        .await;
    let mut client = db.client().await;
    pgrelay::sql::install(
        &mut client,
        &[pgrelay::TableName::parse("tags").unwrap()],
        "notify",
    )
    .await
    .unwrap();
    drop(relay);
    let relay = Relay::start(&db, &["items", "tags"]).await;
    let key = "a,b/c ü'\"";
    let created = post(relay.addr, "/api/tags", &json!({"name": key, "n": 1})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let read = http(relay.addr, "GET", &format!("/api/tags/{}", enc(key)), None).await;
    assert_eq!(
        (read.status, &read.json["name"]),
        (200, &json!(key)),
        "{}",
        read.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused_and_the_table_survives() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    let created = post(a, "/api/items", &json!({"name": "keep me"})).await;
    assert_eq!(created.status, 201);

    let attempts = [
        (
            "GET",
            "/api/items%22%3Bdrop%20table%20items--".to_owned(),
            None,
            404,
        ),
        (
            "GET",
            "/api/public.items%22%3Bdrop%20table%20items--/1".to_owned(),
            None,
            404,
        ),
        (
            "GET",
            format!("/api/{}", enc("items\"; drop table items; --")),
            None,
            404,
        ),
        ("GET", "/api/items?select=id%22".to_owned(), None, 400),
        (
            "GET",
            format!("/api/items?select={}", enc("id\"; drop table items; --")),
            None,
            400,
        ),
        (
            "GET",
            format!(
                "/api/items?order={}",
                enc("id\"; drop table items; --.desc")
            ),
            None,
            400,
        ),
        (
            "GET",
            format!("/api/items?{}=eq.1", enc("id\" = 1 or true; --")),
            None,
            400,
        ),
        (
            "GET",
            format!("/api/items/{}", enc("1; drop table items")),
            None,
            400,
        ),
        (
            "DELETE",
            format!("/api/items/{}", enc("1 or 1=1")),
            None,
            400,
        ),
        (
            "POST",
            "/api/items".to_owned(),
            Some(json!({"name\"; drop table items; --": "x", "name": "y"})),
            400,
        ),
        (
            "PATCH",
            "/api/items/1".to_owned(),
            Some(json!({"name\" = 'x'; drop table items; --": "x"})),
            400,
        ),
    ];
    for (method, path, body, status) in attempts {
        let response = http(a, method, &path, body.as_ref()).await;
        assert_eq!(
            response.status, status,
            "{method} {path}: {}",
            response.text
        );
        assert!(response.json["code"].is_string(), "{}", response.text);
    }
    assert_eq!(count(&db, "items").await, 1);
    let still = http(a, "GET", "/api/items", None).await;
    assert_eq!(still.json[0]["name"], "keep me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_are_addressed_by_comma_joined_values() {
    let (_db, relay) = setup().await;
    let a = relay.addr;
    let order = post(a, "/api/orders", &json!({"id": 7, "customer": "ann"})).await;
    assert_eq!(order.status, 201);
    let lines = post(
        a,
        "/api/lines",
        &json!([{"order_id": 7, "line_no": 1}, {"order_id": 7, "line_no": 2, "qty": 5}]),
    )
    .await;
    assert_eq!(lines.status, 201, "{}", lines.text);
    assert_eq!(lines.json[0]["qty"], json!(1), "default filled");

    let line = http(a, "GET", "/api/lines/7,2", None).await;
    assert_eq!(
        (line.status, &line.json),
        (200, &json!({"order_id": 7, "line_no": 2, "qty": 5}))
    );
    let patched = http(a, "PATCH", "/api/lines/7,2", Some(&json!({"qty": 6}))).await;
    assert_eq!(patched.json["qty"], json!(6));
    let deleted = http(a, "DELETE", "/api/lines/7,1", None).await;
    assert_eq!(deleted.status, 200);
    assert_error(
        &http(a, "GET", "/api/lines/7,1", None).await,
        404,
        "PGRST116",
    );
    let short = http(a, "GET", "/api/lines/7", None).await;
    assert_error(&short, 400, "PGRST100");
    assert!(
        short.json["message"]
            .as_str()
            .unwrap()
            .contains("{order_id},{line_no}")
    );

    let orphan = post(a, "/api/lines", &json!({"order_id": 8, "line_no": 1})).await;
    assert_error(&orphan, 409, "23503");
    let referenced = http(a, "DELETE", "/api/orders/7", None).await;
    assert_error(&referenced, 409, "23503");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_after_start_is_found() {
    let (db, relay) = setup().await;
    let a = relay.addr;
    db.exec("alter table items add column colour text").await;
    let created = post(a, "/api/items", &json!({"name": "x", "colour": "red"})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.json["colour"], "red");
    let listed = http(a, "GET", "/api/items?colour=eq.red&select=colour", None).await;
    assert_eq!(listed.json, json!([{"colour": "red"}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_down_gives_503_quickly() {
    let db = TestDb::new().await.with_tables(SCHEMA, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.pool_connect_timeout = Duration::from_secs(2);
        c.pool_wait_timeout = Duration::from_secs(2);
    })
    .await;
    let a = relay.addr;
    assert_eq!(http(a, "GET", "/api/items", None).await.status, 200);

    let admin = connect(&admin_url()).await;
    admin
        .batch_execute(&format!(
            "alter database {} with allow_connections false",
            db.name
        ))
        .await
        .unwrap();
    admin
        .query(
            "select pg_terminate_backend(pid) from pg_stat_activity
              where datname = $1 and application_name = 'pgrelay'",
            &[&db.name],
        )
        .await
        .unwrap();

    for (method, path, body) in [
        ("GET", "/api/items", None),
        ("GET", "/api/items/1", None),
        ("POST", "/api/items", Some(json!({"name": "x"}))),
    ] {
        let started = Instant::now();
        let response = http(a, method, path, body.as_ref()).await;
        // No connection (PGRST000), or one terminated under the request (its SQLSTATE).
        let code = response.json["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            ["PGRST000", "57P01"].contains(&code.as_str()) || code.starts_with("08"),
            "{}",
            response.text
        );
        assert_error(&response, 503, &code);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{method} {path} took {:?}",
            started.elapsed()
        );
    }

    admin
        .batch_execute(&format!(
            "alter database {} with allow_connections true",
            db.name
        ))
        .await
        .unwrap();
    within(STEP, async {
        while http(a, "GET", "/api/items", None).await.status != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn char_keys_and_a_column_named_t_are_handled_exactly() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table countries(code char(2) primary key, name text);
             create table events(id int primary key, t timestamptz);
             create table \"Order Items\"(id int primary key)",
            &["countries", "events", "Order Items"],
        )
        .await;
    db.exec(
        "insert into countries values ('U', 'one letter'), ('US', 'two letters');
         insert into events values (1, '2026-01-01T00:00:00Z')",
    )
    .await;
    let relay = Relay::start(&db, &["countries", "events", "Order Items"]).await;
    let a = relay.addr;

    // A char(2) key is compared as char(2), not cut to its first letter.
    let deleted = http(a, "DELETE", "/api/countries/US", None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.json["name"], "two letters");
    let left = http(a, "GET", "/api/countries?code=eq.U", None).await;
    assert_eq!(left.json, json!([{"code": "U ", "name": "one letter"}]));

    // A column named like the table alias does not replace the row.
    let event = http(a, "GET", "/api/events/1", None).await;
    assert_eq!(event.json["id"], 1, "{}", event.text);
    let mut ws = relay.ws("/ws/events?snapshot=true").await;
    assert_eq!(ws.initial_rows().await[0]["id"], 1);

    // A table name that needs percent-encoding in the path.
    let mut ws = relay.ws("/ws/Order%20Items").await;
    db.exec("insert into \"Order Items\" values (5)").await;
    assert_eq!(ws.next_json().await["resource"], "Order Items");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_star_is_every_column_as_postgrest_clients_send_it() {
    let (db, relay) = setup().await;
    db.exec("insert into items(name, price) values ('apple', 2)")
        .await;
    let all = http(relay.addr, "GET", "/api/items", None).await;
    let star = http(relay.addr, "GET", "/api/items?select=*", None).await;
    assert_eq!(star.status, 200, "{}", star.body());
    assert_eq!(star.json, all.json);
    assert_eq!(star.json[0]["name"], "apple");
    let one = http(relay.addr, "GET", "/api/items/1?select=*", None).await;
    assert_eq!(one.json["price"], 2);
    // Mixed with columns it is still a column name, and there is none called "*".
    // Mixed with columns, `*` is every column and the others are shown again (PostgREST).
    let mixed = http(relay.addr, "GET", "/api/items?select=*,label:name", None).await;
    assert_eq!(mixed.json[0]["label"], "apple", "{}", mixed.text);
    assert_eq!(mixed.json[0]["price"], 2);
}
