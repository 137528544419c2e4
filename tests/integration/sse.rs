//! Server-Sent Events at `/sse/{table}`, read as an `EventSource` reads them: over a real
//! socket, the chunked body decoded and parsed field by field (`id`, `data`, `retry`,
//! comments), the last event id kept across events as a browser keeps it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::panic::Location;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Relay, STEP, TestDb, http_with, wait_for_metrics, within};

const ITEMS: &str = "create table items(id serial primary key, name text, price numeric)";

/// One dispatched event.
#[derive(Debug, Clone)]
struct Event {
    /// The `id` field, if this event had one (`Some("")` clears the last event id).
    id: Option<String>,
    /// The data lines, joined with `\n` as a browser joins them.
    data: String,
    json: Value,
}

/// What comes next on a stream.
#[derive(Debug)]
enum Item {
    Event(Event),
    Comment(String),
    /// The body ended (its last chunk, or the connection closed).
    End,
}

/// An event-stream client over one HTTP/1.1 connection.
struct Sse {
    stream: TcpStream,
    status: u16,
    head: String,
    /// Bytes read and not yet de-chunked.
    raw: Vec<u8>,
    /// Body bytes not yet parsed into lines.
    body: Vec<u8>,
    /// The terminal chunk came (or the connection closed).
    ended: bool,
    /// The event being read: its id field and data lines.
    id_field: Option<String>,
    data: Vec<String>,
    /// The last event id, as `EventSource` keeps it (sent as `Last-Event-ID` on reconnect).
    last_id: String,
    /// The `retry` field, when one came.
    retry: Option<u64>,
}

impl Sse {
    /// GET `path` with `headers`, on a plain socket.
    async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let stream = within(STEP, TcpStream::connect(addr)).await.unwrap();
        Sse::request(stream, addr, path, headers).await
    }

    /// GET `path` on a socket with a tiny receive buffer (a client that reads only when the
    /// test makes it can then hold back very little).
    async fn open_small(addr: SocketAddr, path: &str) -> Sse {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = within(STEP, socket.connect(addr)).await.unwrap();
        Sse::request(stream, addr, path, &[]).await
    }

    async fn request(
        mut stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Sse {
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        );
        within(STEP, stream.write_all(request.as_bytes()))
            .await
            .unwrap();
        let mut sse = Sse {
            stream,
            status: 0,
            head: String::new(),
            raw: Vec::new(),
            body: Vec::new(),
            ended: false,
            id_field: None,
            data: Vec::new(),
            last_id: String::new(),
            retry: None,
        };
        within(STEP, async {
            loop {
                if let Some(end) = sse.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    sse.head = String::from_utf8_lossy(&sse.raw[..end]).into_owned();
                    sse.raw.drain(..end + 4);
                    break;
                }
                assert!(
                    sse.fill().await,
                    "connection closed before the response head"
                );
            }
        })
        .await;
        sse.status = sse
            .head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap();
        sse
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// Reads more bytes; false once the peer closed.
    async fn fill(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
        }
    }

    /// Moves whole chunks from `raw` to `body`.
    fn dechunk(&mut self) {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size_hex = size_text.split(';').next().unwrap().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            assert_eq!(&self.raw[start + size..start + size + 2], b"\r\n");
            self.raw.drain(..start + size + 2);
        }
    }

    /// Parses one complete line of the body, if there is one; returns an item it completes.
    fn parse_line(&mut self) -> Option<Option<Item>> {
        let end = self.body.iter().position(|b| *b == b'\n')?;
        let line: Vec<u8> = self.body.drain(..=end).collect();
        let line = String::from_utf8(line[..end].to_vec()).expect("the stream is UTF-8");
        if line.is_empty() {
            if self.data.is_empty() {
                self.id_field = None;
                return Some(None);
            }
            let data = std::mem::take(&mut self.data).join("\n");
            let id = self.id_field.take();
            if let Some(id) = &id {
                self.last_id = id.clone();
            }
            let json = serde_json::from_str(&data).expect("each event's data is JSON");
            return Some(Some(Item::Event(Event { id, data, json })));
        }
        if let Some(comment) = line.strip_prefix(':') {
            return Some(Some(Item::Comment(comment.trim_start().to_owned())));
        }
        let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => self.data.push(value.to_owned()),
            "id" => self.id_field = Some(value.to_owned()),
            "retry" => self.retry = value.parse().ok(),
            other => panic!("unexpected field {other:?}"),
        }
        Some(None)
    }

    /// The next event, comment or end of the body.
    async fn next(&mut self) -> Item {
        loop {
            while let Some(item) = self.parse_line() {
                if let Some(item) = item {
                    return item;
                }
            }
            if self.ended {
                return Item::End;
            }
            self.dechunk();
            if self.ended || !self.body.is_empty() {
                continue;
            }
            if !self.fill().await {
                self.ended = true;
            }
        }
    }

    /// The next event (comments skipped); fails at the end of the stream or after [`STEP`].
    #[track_caller]
    fn event(&mut self) -> impl Future<Output = Event> + '_ {
        let caller = Location::caller();
        async move {
            within(STEP, async {
                loop {
                    match self.next().await {
                        Item::Event(e) => return e,
                        Item::Comment(_) => continue,
                        Item::End => panic!("the stream ended at {caller}"),
                    }
                }
            })
            .await
        }
    }

    /// The next `n` events.
    async fn events(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            out.push(self.event().await);
        }
        out
    }

    /// Reads `initial` events until `done`; returns their rows and the last one.
    async fn initial_rows(&mut self) -> (Vec<Value>, Event) {
        let mut rows = Vec::new();
        loop {
            let e = self.event().await;
            assert_eq!(
                e.json["type"], "initial",
                "expected initial data, got {e:?}"
            );
            rows.extend(e.json["data"].as_array().unwrap().iter().cloned());
            if e.json["done"] == true {
                return (rows, e);
            }
            assert_eq!(
                e.id, None,
                "only the last initial message is a place to resume"
            );
        }
    }

    /// Reads events until the body ends; fails after [`STEP`].
    #[track_caller]
    fn rest(&mut self) -> impl Future<Output = Vec<Event>> + '_ {
        within(STEP, async {
            let mut out = Vec::new();
            loop {
                match self.next().await {
                    Item::Event(e) => out.push(e),
                    Item::Comment(_) => continue,
                    Item::End => return out,
                }
            }
        })
    }
}

fn seq(e: &Event) -> i64 {
    e.json["seq"].as_i64().expect("seq")
}

async fn insert_named(db: &TestDb, names: std::ops::Range<i32>) {
    let client = db.client().await;
    for i in names {
        client
            .execute("insert into items(name) values ($1)", &[&i.to_string()])
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stream_as_events_with_the_websocket_text_and_their_seq_as_id() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    let mut sse = Sse::open(relay.addr, "/sse/items", &[]).await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(sse.header("cache-control").as_deref(), Some("no-cache"));

    db.exec("insert into items(name, price) values ('apple', 10.5)")
        .await;
    db.exec("update items set name = 'orange', price = 12.0 where id = 1")
        .await;
    db.exec("delete from items where id = 1").await;

    let events = sse.events(3).await;
    let retry = sse.retry.expect("a retry field comes first");
    assert!((2000..=4000).contains(&retry), "retry {retry}");
    let types: Vec<&str> = events
        .iter()
        .map(|e| e.json["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["create", "update", "delete"]);
    for e in &events {
        assert_eq!(e.data, ws.next_text().await, "the WebSocket's text, as is");
        assert_eq!(e.id, Some(seq(e).to_string()), "the id is the seq");
    }
    assert!(seq(&events[0]) < seq(&events[1]) && seq(&events[1]) < seq(&events[2]));
    assert_eq!(sse.last_id, seq(&events[2]).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_true_hands_over_from_the_initial_rows_to_later_changes_exactly_once() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    insert_named(&db, 0..50).await;
    // A writer goes on while the stream opens and its snapshot is taken.
    let url = db.url.clone();
    let writer = tokio::spawn(async move {
        let client = crate::support::connect(&url).await;
        for i in 50..300 {
            client
                .execute("insert into items(name) values ($1)", &[&i.to_string()])
                .await
                .unwrap();
        }
    });
    let mut sse = Sse::open(relay.addr, "/sse/items?snapshot=true", &[]).await;
    let (rows, done) = sse.initial_rows().await;
    let position = done.json["seq"]
        .as_i64()
        .expect("initial data carries its position");
    assert_eq!(done.id, Some(position.to_string()));
    within(STEP, writer).await.unwrap();

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        *seen
            .entry(row["name"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    while seen.len() < 300 {
        let e = sse.event().await;
        assert_eq!(e.json["type"], "create", "{e:?}");
        assert_eq!(e.id, Some(seq(&e).to_string()));
        *seen
            .entry(e.json["data"]["name"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows sent twice: {twice:?}");
    assert!(
        rows.len() >= 50,
        "the rows written before the stream opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_and_events_shape_the_stream_as_they_shape_a_websocket() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let query = "price=gt.10&or=(name.like.a*,name.eq.zed)&select=id,name&events=create,delete";
    let mut ws = relay.ws(&format!("/ws/items?{query}")).await;
    let mut sse = Sse::open(relay.addr, &format!("/sse/items?{query}"), &[]).await;

    db.exec("insert into items(name, price) values ('apple', 5)")
        .await; // under the price
    db.exec("insert into items(name, price) values ('banana', 50)")
        .await; // not the name
    db.exec("insert into items(name, price) values ('avocado', 20)")
        .await; // in: create
    db.exec("update items set price = 30 where name = 'avocado'")
        .await; // an update: not asked for
    db.exec("update items set price = 1 where name = 'avocado'")
        .await; // moves out: delete

    let events = sse.events(2).await;
    assert_eq!(events[0].json["type"], "create");
    assert_eq!(
        events[0].json["data"],
        json!({"id": 3, "name": "avocado"}),
        "projected"
    );
    assert_eq!(events[1].json["type"], "delete");
    assert_eq!(events[1].json["old"], json!({"id": 3, "name": "avocado"}));
    for e in &events {
        assert_eq!(e.data, ws.next_text().await);
    }
    db.exec("insert into items(name, price) values ('zed', 11)")
        .await;
    assert_eq!(sse.event().await.json["data"]["name"], "zed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_right_after_that_event_and_wins_over_since() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut sse = Sse::open(relay.addr, "/sse/items", &[]).await;
    insert_named(&db, 0..5).await;
    let seen = sse.events(5).await;
    let resume_from = seen[2].id.clone().expect("events have ids");
    drop(sse);

    insert_named(&db, 5..8).await; // while disconnected
    // A `since` in the URL (which would reset) loses to the header a reconnect sends.
    let mut sse = Sse::open(
        relay.addr,
        "/sse/items?since=999999999",
        &[("Last-Event-ID", &resume_from)],
    )
    .await;
    assert_eq!(sse.status, 200);
    let after: i64 = resume_from.parse().unwrap();
    let mut replay = Vec::new();
    while replay.len() < 5 {
        let e = sse.event().await;
        assert_eq!(e.json["type"], "create", "no reset: {e:?}");
        // At least once: events of the batch `resume_from` came in may come again.
        if seq(&e) > after {
            replay.push(e);
        }
    }
    let names: Vec<&str> = replay
        .iter()
        .map(|e| e.json["data"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["3", "4", "5", "6", "7"]);
    assert_eq!(replay[0].data, seen[3].data, "the very text first sent");
    assert_eq!(replay[1].data, seen[4].data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_old_last_event_id_gets_a_reset_and_the_stream_goes_on() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    insert_named(&db, 0..3).await; // logged before the relay listened
    let old = "1";
    let relay = Relay::start(&db, &["items"]).await;

    let mut sse = Sse::open(relay.addr, "/sse/items", &[("Last-Event-ID", old)]).await;
    let reset = sse.event().await;
    assert_eq!(
        reset.json,
        json!({"type": "reset", "resource": "items", "reason": "history_unavailable"})
    );
    assert_eq!(reset.id, None);
    insert_named(&db, 3..4).await;
    let live = sse.event().await;
    assert_eq!(live.json["data"]["name"], "3", "the stream stays open");

    // With snapshot=true, fresh rows follow the reset, and their position becomes the id.
    let mut sse = Sse::open(
        relay.addr,
        "/sse/items?snapshot=true",
        &[("Last-Event-ID", old)],
    )
    .await;
    assert_eq!(sse.event().await.json["type"], "reset");
    let (rows, done) = sse.initial_rows().await;
    assert_eq!(rows.len(), 4);
    assert_eq!(
        done.id,
        Some(done.json["seq"].as_i64().unwrap().to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_during_a_snapshot_stream_is_followed_by_fresh_rows_on_the_same_stream() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    insert_named(&db, 0..2).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut sse = Sse::open(relay.addr, "/sse/items?snapshot=true", &[]).await;
    let (rows, _) = sse.initial_rows().await;
    assert_eq!(rows.len(), 2);

    db.exec("alter table items add column note text").await;
    let reset = sse.event().await;
    assert_eq!(reset.json["type"], "reset", "{reset:?}");
    assert_eq!(reset.json["reason"], "table_changed");
    let (rows, _) = sse.initial_rows().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.get("note").is_some()), "{rows:?}");

    insert_named(&db, 2..3).await;
    assert_eq!(sse.event().await.json["data"]["name"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_rows_after_a_primary_key_change_carry_the_new_key_beside_the_selected_columns() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    insert_named(&db, 0..2).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut sse = Sse::open(relay.addr, "/sse/items?select=price&snapshot=true", &[]).await;
    let (rows, _) = sse.initial_rows().await;
    assert_eq!(
        rows[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["id", "price"]
    );

    db.exec("alter table items drop constraint items_pkey, add primary key (name)")
        .await;
    let reset = sse.event().await;
    assert_eq!(reset.json["reason"], "table_changed", "{reset:?}");
    // A projection keeps the key, so that later events (keyed by name now) match the rows.
    let (rows, _) = sse.initial_rows().await;
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.as_object().unwrap().keys().eq(["name", "price"])),
        "{rows:?}"
    );
    insert_named(&db, 2..3).await;
    let live = sse.event().await;
    assert_eq!(live.json["id"], "2", "{live:?}");
    assert_eq!(
        live.json["data"],
        serde_json::json!({"name": "2", "price": null})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_column_dropped_with_a_key_change_ends_the_stream_as_subscription_ended() {
    // One migration drops the column the filter names and changes the key: the stream ends
    // because of the column (it cannot start over), and is not told to start over first
    // (its fresh rows would be checked against a table without the column, a `bad_request`
    // whose reconnect replays the change).
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    insert_named(&db, 0..2).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut sse = Sse::open(relay.addr, "/sse/items?price=is.null&snapshot=true", &[]).await;
    let (rows, _) = sse.initial_rows().await;
    assert_eq!(rows.len(), 2);

    db.exec(
        "alter table items drop constraint items_pkey, drop column price, add primary key (name)",
    )
    .await;
    let ended = sse.event().await;
    assert_eq!(ended.json["type"], "error", "{ended:?}");
    assert_eq!(ended.json["code"], "subscription_ended", "{ended:?}");
    assert_eq!(ended.id.as_deref(), Some(""), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_http_statuses_with_a_json_error_body() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    /// Path, request headers, status, code.
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        u16,
        &'static str,
    );
    let cases: &[Case] = &[
        ("/sse/nosuch", &[], 404, "not_found"),
        ("/sse/items?price=gt.abc", &[], 400, "bad_request"),
        ("/sse/items?colour=eq.red", &[], 400, "bad_request"),
        ("/sse/items?select=id,colour", &[], 400, "bad_request"),
        ("/sse/items?since=x", &[], 400, "bad_request"),
        ("/sse/items", &[("Last-Event-ID", "x")], 400, "bad_request"),
    ];
    for (path, headers, status, code) in cases {
        let response = http_with(relay.addr, "GET", path, headers, None).await;
        assert_eq!(response.status, *status, "{path}: {}", response.text);
        assert_eq!(response.json["code"], *code, "{path}: {}", response.text);
        assert!(response.json["message"].is_string());
    }
}

const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

fn token(tenant: i64, ttl: u64) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + ttl;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "member", "tenant_id": tenant, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A relay serving `docs` to members: their tenant's rows, only `tenant_id` (and the key).
async fn members_relay(db: &TestDb) -> Relay {
    Relay::start_with(db, &["docs"], |c| {
        crate::support::with_policies(
            c,
            r#"
            [[policy]]
            tables = ["docs"]
            roles = ["member"]
            read = true
            filter = "tenant_id=eq.{claims.tenant_id}"
            columns = ["tenant_id"]
            "#,
            SECRET,
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_needs_a_token_takes_it_from_access_token_applies_its_policy_and_ends_at_exp() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table docs (id int primary key, tenant_id int not null, secret text)",
            &["docs"],
        )
        .await;
    let relay = members_relay(&db).await;

    let refused = http_with(relay.addr, "GET", "/sse/docs", &[], None).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json["code"], "unauthorized");
    let message = refused.json["message"].as_str().unwrap();
    assert!(message.contains("access_token"), "{message}");
    let bad = http_with(relay.addr, "GET", "/sse/docs?access_token=nope", &[], None).await;
    assert_eq!(bad.status, 401);

    let path = format!("/sse/docs?access_token={}", token(1, 600));
    let mut sse = Sse::open(relay.addr, &path, &[]).await;
    assert_eq!(sse.status, 200);
    db.exec("insert into docs values (1, 2, 's'), (2, 1, 's')")
        .await;
    let e = sse.event().await;
    assert_eq!(
        e.json["data"],
        json!({"id": 2, "tenant_id": 1}),
        "only the tenant's rows, without the hidden column"
    );

    // A header works too; at exp the stream ends, saying why.
    let bearer = format!("Bearer {}", token(1, 2));
    let mut sse = Sse::open(relay.addr, "/sse/docs", &[("Authorization", &bearer)]).await;
    assert_eq!(sse.status, 200);
    let started = std::time::Instant::now();
    let rest = sse.rest().await;
    let last = rest.last().expect("a message says why the stream ended");
    assert_eq!(last.json["code"], "token_expired", "{last:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_limited_stream_sees_the_new_key_in_its_fresh_rows_after_a_key_change() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table docs (id int primary key, tenant_id int not null, code text not null)",
            &["docs"],
        )
        .await;
    db.exec("insert into docs values (1, 1, 'a'), (2, 2, 'b')")
        .await;
    let relay = members_relay(&db).await;
    let path = format!("/sse/docs?snapshot=true&access_token={}", token(1, 600));
    let mut sse = Sse::open(relay.addr, &path, &[]).await;
    let (rows, _) = sse.initial_rows().await;
    assert_eq!(rows, [json!({"id": 1, "tenant_id": 1})]);

    db.exec("alter table docs drop constraint docs_pkey, add primary key (code)")
        .await;
    assert_eq!(sse.event().await.json["reason"], "table_changed");
    // The policy lets its readers see the key, whichever columns it is: now `code`.
    let (rows, _) = sse.initial_rows().await;
    assert_eq!(rows, [json!({"tenant_id": 1, "code": "a"})]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_gets_a_ping_comment_every_ping_interval() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.ping_interval = Duration::from_millis(200);
    })
    .await;
    let mut sse = Sse::open(relay.addr, "/sse/items", &[]).await;
    let started = std::time::Instant::now();
    let mut pings = 0;
    while pings < 3 {
        match within(STEP, sse.next()).await {
            Item::Comment(text) => {
                assert_eq!(text, "ping");
                pings += 1;
            }
            other => panic!("expected a comment, got {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_ended_as_a_slow_consumer_and_resumes_with_last_event_id() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table docs(id serial primary key, body text)",
            &["docs"],
        )
        .await;
    let relay = Relay::start_with(&db, &["docs"], |c| {
        c.ping_interval = Duration::from_millis(500);
        c.ping_timeout = Duration::from_secs(1);
    })
    .await;
    let mut stalled = Sse::open_small(relay.addr, "/sse/docs").await;
    assert_eq!(stalled.status, 200);
    // 12 MB of events: far more than the socket buffers and the body's queue hold.
    db.exec("insert into docs(body) select repeat('x', 12000) from generate_series(1, 1000)")
        .await;
    wait_for_metrics(relay.addr, &["pgrelay_slow_consumers_total 1"]).await;

    // What was on its way still arrives, then why the stream ended, then its end.
    let mut got = stalled.rest().await;
    let last = got.pop().expect("a message says why the stream ended");
    assert_eq!(last.json["type"], "error", "{last:?}");
    assert_eq!(last.json["code"], "slow_consumer", "{last:?}");
    assert!(got.len() < 1000, "ended before it had everything");
    let mut ids: std::collections::BTreeSet<i64> =
        got.iter().map(|e| e.json["id"].as_i64().unwrap()).collect();

    // The reconnect an EventSource makes gets the rest.
    let last_id = stalled.last_id.clone();
    assert!(!last_id.is_empty());
    let mut resumed = Sse::open(relay.addr, "/sse/docs", &[("Last-Event-ID", &last_id)]).await;
    while ids.len() < 1000 {
        let e = resumed.event().await;
        assert_eq!(e.json["type"], "create", "{}", e.json["type"]);
        ids.insert(e.json["id"].as_i64().unwrap());
    }
    assert_eq!(ids, (1..=1000).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_source_from_an_allowed_origin_gets_cors_and_others_are_refused() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.origins.allowed = vec!["https://app.example".into()];
    })
    .await;
    let sse = Sse::open(
        relay.addr,
        "/sse/items",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let refused = http_with(
        relay.addr,
        "GET",
        "/sse/items",
        &[("Origin", "https://evil.example")],
        None,
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json["code"], "origin_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_stream_with_a_message_saying_so() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut sse = Sse::open(relay.addr, "/sse/items", &[]).await;
    assert_eq!(sse.status, 200);
    relay
        .stop()
        .await
        .expect("shutdown is not held up by the stream");
    let rest = sse.rest().await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].json["code"], "shutting_down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_is_gone_is_ended_at_once_not_at_the_next_ping() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.ping_interval = Duration::from_secs(600);
        c.ping_timeout = Duration::from_secs(1800);
    })
    .await;
    // A client that opens streams and hangs up at once must not leave a subscription behind
    // each time (connection limits count only the connections that are still open).
    for _ in 0..3 {
        let sse = Sse::open(relay.addr, "/sse/items", &[]).await;
        assert_eq!(sse.status, 200);
        drop(sse);
    }
    wait_for_metrics(relay.addr, &["pgrelay_subscriptions{table=\"items\"} 0\n"]).await;
}
