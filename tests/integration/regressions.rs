//! Regressions a review found (capture SQL, reinstall, REST): each test reproduces one
//! finding, fixed since.

use std::time::{Duration, Instant};

use pgrelay::Config;
use serde_json::json;

use crate::support::{Relay, TestDb, http_as, install_mode};

/// Was: A bulk UPDATE is logged one event per log row: `sum(bigint) over w` is
/// numeric, so `bytes / 1048576` is a fraction and every row gets its own `chunk`.
/// (INSERT and DELETE sum int4 into bigint and chunk by 1000 as intended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_update_is_chunked_by_1000_like_inserts_and_deletes() {
    let db = TestDb::new().await;
    db.exec("create table t (id int primary key, v text)").await;
    install_mode(&db, &["t"], "poll").await;
    let client = db.client().await;
    client
        .batch_execute(
            "insert into t select g, 'x' from generate_series(1, 2500) g;
             update t set v = 'y';
             delete from t;",
        )
        .await
        .unwrap();
    let rows = client
        .query(
            "select body->0->>1 as op, count(*)::int8, sum(n)::int8 from pgrelay.changes group by 1 order by 1",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("c".into(), 3, 2500),
            ("d".into(), 3, 2500),
            ("u".into(), 3, 2500)
        ],
        "log rows per op (op, log rows, events)"
    );
}

/// Was: Upgrading a log whose body is pglz (every earlier version) runs
/// `alter table pgrelay.changes alter column body set compression lz4`, which waits behind
/// any open writer and queues every other writer behind it; since the capture functions run
/// with `lock_timeout = 0`, a writer's own lock_timeout cannot bound that wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinstalling_over_an_earlier_log_does_not_block_writers() {
    let db = TestDb::new().await;
    db.exec("create table t (id int primary key, v text)").await;
    install_mode(&db, &["t"], "poll").await;
    // The log as an earlier version created it.
    db.exec("alter table pgrelay.changes alter column body set compression pglz")
        .await;
    // A writer with a transaction open (a long migration, a batch job).
    let long = db.client().await;
    long.batch_execute("begin; insert into t values (1, 'long')")
        .await
        .unwrap();
    // The upgrade: install.sql again.
    let installer = db.client().await;
    let install =
        tokio::spawn(async move { installer.batch_execute(pgrelay::sql::INSTALL_SQL).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Another writer, with a short lock_timeout of its own.
    let other = db.client().await;
    other
        .batch_execute("set lock_timeout = '200ms'")
        .await
        .unwrap();
    let started = Instant::now();
    let write = tokio::time::timeout(
        Duration::from_secs(3),
        other.execute("insert into t values (2, 'other')", &[]),
    )
    .await;
    let waited = started.elapsed();
    long.batch_execute("commit").await.unwrap();
    let _ = install.await;
    assert!(
        matches!(write, Ok(Ok(1))),
        "a writer waited {waited:?} behind the reinstall (result: {write:?})"
    );
}

const DOCS: &str = "create table docs (id int primary key, tenant_id int not null, \
                    title text check (length(title) < 20), secret text)";

const POLICIES: &str = r#"
[[policy]]
tables = ["docs"]
roles = ["member"]
read = true
insert = true
update = true
delete = true
filter = "tenant_id=eq.{claims.tenant_id}"
columns = ["id", "tenant_id", "title"]
"#;

const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

fn member_token(tenant: i64) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "member", "tenant_id": tenant, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn docs_relay(db: &TestDb) -> Relay {
    Relay::start_with(db, &["docs"], |c: &mut Config| {
        crate::support::with_policies(c, POLICIES, SECRET);
    })
    .await
}

/// Was: A column the caller's policy hides comes back in an error's `details`:
/// PostgreSQL's "Failing row contains (…)" lists every column of the row (it hides columns
/// only from roles without SELECT on them, and the relay's role has it), and db_error sends
/// `details` as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_never_shows_a_column_the_policy_hides() {
    let db = TestDb::new().await;
    db.exec(DOCS).await;
    install_mode(&db, &["docs"], "notify").await;
    db.exec("insert into docs values (1, 1, 'a', 'the-hidden-secret')")
        .await;
    let relay = docs_relay(&db).await;
    let token = member_token(1);
    // The hidden column is hidden on reads.
    let read = http_as(relay.addr, "GET", "/api/docs?id=eq.1", Some(&token), None).await;
    assert_eq!(read.status, 200, "{}", read.text);
    assert!(!read.text.contains("the-hidden-secret"), "{}", read.text);
    // A PATCH that breaks the check constraint on a visible column.
    let patch = http_as(
        relay.addr,
        "PATCH",
        "/api/docs?id=eq.1",
        Some(&token),
        Some(&json!({"title": "a title far too long for the check"})),
    )
    .await;
    assert_eq!(patch.status, 400, "{}", patch.text);
    assert!(
        !patch.text.contains("the-hidden-secret"),
        "the hidden column leaked: {}",
        patch.text
    );
}

/// Was (debug builds panic in the handler and drop the connection; release builds
/// wrap and answer no rows). `Range: 0-9223372036854775807` makes `Range::limit` compute
/// `upper - lower + 1` past i64::MAX.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_header_up_to_i64_max_reads_every_row() {
    let db = TestDb::new().await;
    db.exec("create table r (id int primary key)").await;
    install_mode(&db, &["r"], "notify").await;
    db.exec("insert into r select generate_series(1, 3)").await;
    let relay = Relay::start(&db, &["r"]).await;
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        crate::support::http_raw(
            relay.addr,
            format!(
                "GET /api/r HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nRange: 0-9223372036854775807\r\n",
                relay.addr
            ),
            Vec::new(),
        ),
    )
    .await
    .expect("answered in time");
    let response = response.expect("an HTTP answer, not a dropped connection");
    assert_eq!(response.status, 200, "{}", response.text);
    assert_eq!(response.json, json!([{"id": 1}, {"id": 2}, {"id": 3}]));
}

/// Hostile query strings get a 4xx, never a 5xx or a dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_query_strings_get_client_errors() {
    let db = TestDb::new().await;
    db.exec("create table h (id int primary key, name text, n numeric(5,2), tags text[], j jsonb)")
        .await;
    install_mode(&db, &["h"], "notify").await;
    db.exec("insert into h values (1, 'a', 1.5, '{x}', '{}')")
        .await;
    let relay = Relay::start(&db, &["h"]).await;
    let cases = [
        "or=(",
        "or=(id.eq.1",
        "or=)",
        "and=(or(not(id.eq.1)))",
        "not=",
        "not.or=(id.eq.1)",
        "id=not.not.not.eq.1",
        "id=in.(",
        "id=in.()",
        "id=in.(1,2",
        "id=eq.",
        "id=",
        "=eq.1",
        "select=",
        "select=,",
        "select=id::",
        "select=::int",
        "select=id::int::text",
        "select=a:b:c",
        "select=id->>x",
        "select=j->>0",
        "select=*,*",
        "select=id,id",
        "select=id::%22int%22",
        "select=id::int%3Bdrop",
        "order=",
        "order=id.",
        "order=id.desc.nullsfirst.x",
        "order=,",
        "limit=-1",
        "limit=99999999999999999999",
        "offset=-5",
        "offset=9223372036854775807",
        "limit=9223372036854775807&offset=9223372036854775807",
        "name=like.%25%25%25%25%25",
        "name=eq.%00",
        "name=fts(xx).a",
        "name=fts().a",
        "name=wfts(%27%29).a",
        "tags=cs.{",
        "tags=cs.%7Ba",
        "n=eq.1e99999",
        "n=gt.NaN",
        "j=eq.{",
        "id=eq.99999999999999999999",
        "id=any.eq.{1,2}",
        "id=all.eq.{",
        "id=is.maybe",
        "id=isdistinct.",
        "id=eq.1&id=eq.2",
        "h.id=eq.1",
        "or=(id.eq.1,or(id.eq.2,or(id.eq.3,or(id.eq.4,or(id.eq.5,or(id.eq.6,or(id.eq.7)))))))",
        "columns=id",
        "on_conflict=id",
        "%FF=eq.1",
        "id=eq.%FF",
        "select=%FF",
    ];
    let mut bad = Vec::new();
    for case in cases {
        let path = format!("/api/h?{case}");
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            crate::support::http_raw(
                relay.addr,
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
                    relay.addr
                ),
                Vec::new(),
            ),
        )
        .await;
        match response {
            Ok(Ok(r)) if r.status < 500 => {}
            Ok(Ok(r)) => bad.push(format!("{case}: {} {}", r.status, r.text)),
            Ok(Err(e)) => bad.push(format!("{case}: {e}")),
            Err(_) => bad.push(format!("{case}: timed out")),
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}
