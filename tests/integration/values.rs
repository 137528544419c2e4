//! Any value PostgreSQL can store streams whole, and no value (or broken log row) can stop
//! capture for anyone (issue 9, item 1); timestamps in UTC (item 9).

use serde_json::{Value, json};

use crate::support::{Relay, TestDb, http, http_get, wait_for_metrics};

const DOCS: &str = "create table docs(id int primary key, body jsonb, note text);
                    create table other(id int primary key)";

/// A jsonb value nested `depth` levels deep, as PostgreSQL renders it.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_nested_a_thousand_levels_streams_whole_and_reads_back() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    let relay = Relay::start(&db, &["docs", "other"]).await;
    let mut docs = relay.ws("/ws/docs").await;
    let mut other = relay.ws("/ws/other").await;
    let deep = nested(1000);
    let client = db.client().await;
    // One row alone, then inside a multi-row statement.
    client
        .execute(
            "insert into docs values (1, $1::text::jsonb, 'one')",
            &[&deep],
        )
        .await
        .unwrap();
    client
        .execute(
            "insert into docs select g, $1::text::jsonb, 'many' from generate_series(2, 4) g",
            &[&deep],
        )
        .await
        .unwrap();
    db.exec("insert into other values (1)").await;
    for id in 1..=4 {
        let frame = docs.next_text().await;
        assert!(
            frame.starts_with(&format!(
                r#"{{"type":"create","resource":"docs","id":{id},"#
            )),
            "{}",
            &frame[..80]
        );
        assert!(
            frame.contains(&format!(r#""body":{deep},"#)),
            "the value arrives whole"
        );
    }
    // Capture went on for every table.
    assert_eq!(other.next_json().await["id"], 1);
    let (status, _) = http_get(relay.addr, "/readyz").await.unwrap();
    assert_eq!(status, 200);

    // REST and initial data read it back whole.
    let response = http(relay.addr, "GET", "/api/docs?id=eq.1", None).await;
    assert_eq!(response.status, 200);
    assert!(
        response.text.contains(&deep),
        "REST returns the value whole"
    );
    let mut fresh = relay.ws("/ws/docs?snapshot=true").await;
    let initial = fresh.next_text().await;
    assert!(initial.starts_with(r#"{"type":"initial""#));
    assert_eq!(initial.matches(&deep).count(), 4);
    // An update of it, with old and new.
    db.exec("update docs set note = 'changed' where id = 1")
        .await;
    let frame = docs.next_text().await;
    assert_eq!(frame.matches(&deep).count(), 2, "data and old");
    assert!(frame.contains(r#""changed":["note"]"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_row_the_relay_cannot_read_resets_its_table_and_capture_goes_on() {
    let db = TestDb::new()
        .await
        .with_tables(DOCS, &["docs", "other"])
        .await;
    let relay = Relay::start(&db, &["docs", "other"]).await;
    let mut docs = relay.ws("/ws/docs").await;
    let mut other = relay.ws("/ws/other").await;
    // A log row no capture trigger would write (written by hand, or by a broken version).
    db.exec(
        "insert into pgrelay.changes (seq, last_seq, stmt, relid, keys, n, body)
         select s, s, s, 'docs'::regclass, '{id}', 1, '[[\"not\", \"an event\"]]'
           from (select nextval('pgrelay.changes_seq') as s) x;
         insert into docs values (1, '{}', 'after')",
    )
    .await;
    db.exec("insert into other values (7)").await;
    assert_eq!(
        docs.next_json().await,
        json!({"type": "reset", "resource": "docs", "reason": "events_missing"})
    );
    assert_eq!(docs.next_json().await["data"]["note"], "after");
    assert_eq!(other.next_json().await["id"], 7);
    wait_for_metrics(
        relay.addr,
        &[
            "pgrelay_bad_log_rows_total 1",
            "pgrelay_capture_listening 1",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_render_in_utc_and_exactly_whatever_the_writers_session_settings() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table t(id int primary key, at timestamptz, f float8, b bytea, i interval)",
            &["t"],
        )
        .await;
    let relay = Relay::start(&db, &["t"]).await;
    let mut ws = relay.ws("/ws/t").await;
    let writer = db.client().await;
    writer
        .batch_execute(
            "set timezone = 'Asia/Kolkata'; set extra_float_digits = 0; set bytea_output = 'escape';
             set intervalstyle = 'sql_standard';
             insert into t values (1, '2026-01-01 05:30:00+05:30', 0.1::float8 + 0.2::float8, '\\x01ff', '1 day 2 hours');
             insert into t select g, '1800-01-01 00:00:00+00', 1, null, null from generate_series(2, 3) g",
        )
        .await
        .unwrap();
    // The capture functions pin those settings only while they run: the writer's session
    // keeps its own, in and after the transaction (and a SET LOCAL stays local).
    let settings = "select current_setting('TimeZone'), current_setting('extra_float_digits'),
                           current_setting('bytea_output'), current_setting('IntervalStyle'),
                           current_setting('lock_timeout')";
    let writers =
        |row: tokio_postgres::Row| -> Vec<String> { (0..5).map(|i| row.get(i)).collect() };
    let expected = ["Asia/Kolkata", "0", "escape", "sql_standard", "0"];
    assert_eq!(
        writers(writer.query_one(settings, &[]).await.unwrap()),
        expected
    );
    writer
        .batch_execute(
            "begin; set local lock_timeout = '2s'; set local timezone = 'America/New_York';
             insert into t values (4, now(), 1, null, null);",
        )
        .await
        .unwrap();
    let in_transaction = writers(writer.query_one(settings, &[]).await.unwrap());
    assert_eq!(
        in_transaction,
        ["America/New_York", "0", "escape", "sql_standard", "2s"]
    );
    writer.batch_execute("commit").await.unwrap();
    assert_eq!(
        writers(writer.query_one(settings, &[]).await.unwrap()),
        expected
    );

    let events = ws.events(4).await;
    assert!(
        events[3]["data"]["at"]
            .as_str()
            .unwrap()
            .ends_with("+00:00")
    );
    let e = &events[0];
    assert!(e["ts"].as_str().unwrap().ends_with("+00:00"), "{e}");
    assert_eq!(e["data"]["at"], "2026-01-01T00:00:00+00:00");
    assert_eq!(e["data"]["f"], json!(0.30000000000000004));
    assert_eq!(e["data"]["b"], "\\x01ff");
    assert_eq!(e["data"]["i"], "1 day 02:00:00");
    // A multi-row statement (read back by the relay) renders the same way; an old date is
    // not given a local-mean-time offset.
    assert_eq!(events[1]["data"]["at"], "1800-01-01T00:00:00+00:00");
    assert!(events[1]["ts"].as_str().unwrap().ends_with("+00:00"));
    // Initial data is rendered like events.
    let mut fresh = relay.ws("/ws/t?snapshot=true").await;
    let rows = fresh.initial_rows().await;
    assert_eq!(rows[0], e["data"]);
    let _ = Value::Null;
}
