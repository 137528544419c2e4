//! Faults an adversarial review of the capture path found, each caused here: a client that
//! applies events by key must end equal to the table, and no write may fail.

use std::time::Duration;

use serde_json::{Value, json};

use crate::model::{Copy, table_rows};
use crate::support::{Cluster, Relay, TestDb, Ws, install, signal, within};

/// Reads until nothing more comes for `quiet`.
async fn drain(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(crate::support::Frame::Json(v)) =
        tokio::time::timeout(quiet, ws.next_frame()).await
    {
        out.push(v);
    }
    out
}

/// Applies every message; panics on a reset (none is expected here).
fn apply_all(copy: &mut Copy, messages: &[Value]) {
    for m in messages {
        assert_eq!(copy.apply(m), crate::model::Next::Continue, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_replays_whole_batches_so_a_copy_kept_by_key_stays_exact() {
    let cluster = Cluster::start().await;
    let db = cluster
        .database("review", "create table p (id int primary key, v text)")
        .await;
    install(&db, &["p"]).await;
    let relay = Relay::start(&db, &["p"]).await;
    let mut ws = relay.ws("/ws/p").await;
    // Two transactions in one batch: capture is frozen while both commit.
    let pid = cluster.capture_pid("review").await;
    signal("STOP", pid);
    db.exec("insert into p values (0, 'x')").await;
    db.exec("delete from p where id = 0").await;
    db.exec("insert into p values (1, 'old')").await;
    db.exec("update p set v = 'new' where id = 1").await;
    signal("CONT", pid);
    let mut copy = Copy::new(&["id"]);
    let live = ws.events(4).await;
    apply_all(&mut copy, &live);
    drop(ws);
    // Resuming after the last event, or from initial data's position, replays enough.
    let mut resumed = relay
        .ws(&format!("/ws/p?since={}", copy.seq.unwrap()))
        .await;
    apply_all(
        &mut copy,
        &drain(&mut resumed, Duration::from_millis(500)).await,
    );
    assert_eq!(copy.rows, table_rows(&db, "p", &["id"]).await);

    let mut fresh = relay.ws("/ws/p?snapshot=true").await;
    let mut copy = Copy::new(&["id"]);
    apply_all(&mut copy, &[fresh.next_json().await]);
    drop(fresh);
    let mut resumed = relay
        .ws(&format!("/ws/p?since={}", copy.seq.unwrap()))
        .await;
    apply_all(
        &mut copy,
        &drain(&mut resumed, Duration::from_millis(500)).await,
    );
    assert_eq!(copy.rows, table_rows(&db, "p", &["id"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_values_that_parse_back_to_nothing_never_fail_a_write() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table jj(id int primary key, doc json, k int)",
            &["jj"],
        )
        .await;
    let relay = Relay::start(&db, &["jj"]).await;
    let mut ws = relay.ws("/ws/jj").await;
    // `json` keeps \u0000 and lone surrogates as written; nothing may try to parse them.
    db.exec(
        r#"insert into jj values (1, '{"k":"\u0000"}', 1), (2, '"\ud800"', 2);
           insert into jj values (3, '[1, "\udfff"]', 3);
           update jj set k = k + 1;
           update jj set id = id + 10 where id = 1;
           delete from jj where id = 2"#,
    )
    .await;
    // The frames carry the values exactly as stored (serde_json refuses lone surrogates,
    // JavaScript's JSON.parse keeps them: the test reads text and parses a tamed copy).
    let mut copy = Copy::new(&["id"]);
    let mut frames = Vec::new();
    for _ in 0..9 {
        frames.push(ws.next_text().await);
    }
    assert!(
        frames[0].contains(r#""doc":{"k":"\u0000"}"#),
        "{}",
        frames[0]
    );
    assert!(frames[1].contains(r#""doc":"\ud800""#), "{}", frames[1]);
    let tamed: Vec<Value> = frames
        .iter()
        .map(|f| serde_json::from_str(&f.replace("\\ud800", "?").replace("\\udfff", "?")).unwrap())
        .collect();
    apply_all(&mut copy, &tamed);
    assert_eq!(copy.rows.keys().cloned().collect::<Vec<_>>(), ["11", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_writes_the_same_table_is_streamed_in_the_order_it_happened() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table node (id int primary key, parent int references node(id), children int not null default 0);
             create function bump() returns trigger language plpgsql as $$
             begin update node set children = children + 1 where id = new.parent; return null; end $$;
             create trigger bump after insert on node for each row execute function bump()",
            &["node"],
        )
        .await;
    let relay = Relay::start(&db, &["node"]).await;
    let mut ws = relay.ws("/ws/node").await;
    db.exec("insert into node (id, parent) values (1, null), (2, 1), (3, 1)")
        .await;
    let events = ws.events(5).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["create", "create", "create", "update", "update"]);
    let mut copy = Copy::new(&["id"]);
    apply_all(&mut copy, &events);
    assert_eq!(copy.rows, table_rows(&db, "node", &["id"]).await);
    assert_eq!(copy.rows["1"]["children"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_connection_after_a_large_batch_was_published_sends_it_once() {
    let cluster = Cluster::start().await;
    let db = cluster
        .database("review", "create table big (id int primary key, v text)")
        .await;
    install(&db, &["big"]).await;
    let relay = Relay::start(&db, &["big"]).await;
    let mut ws = relay.ws("/ws/big").await;
    let admin = crate::support::connect(&cluster.url("postgres")).await;
    db.exec("insert into big select g, 'x' from generate_series(1, 100000) g")
        .await;
    // All 100,000 events arrive; capture is then frozen (it may be between its last read and
    // its COMMIT) and its connection terminated.
    let first = ws.events(100_000).await;
    let pid = cluster.capture_pid("review").await;
    signal("STOP", pid);
    admin
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    signal("CONT", pid);
    crate::support::wait_for_metrics(relay.addr, &["pgrelay_capture_reconnects_total 1"]).await;
    relay.wait_ready().await;
    db.exec("insert into big values (0, 'sentinel')").await;
    let next = ws.next_json().await;
    assert_eq!(next["data"]["v"], "sentinel", "nothing sent twice: {next}");
    assert_eq!(first.len(), 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_can_resume_on_a_relay_that_exposes_other_tables() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table a (id int primary key); create table c (id int primary key)",
            &["a", "c"],
        )
        .await;
    let only_a = Relay::start(&db, &["a"]).await;
    let both = Relay::start(&db, &["a", "c"]).await;
    let mut a_on_only_a = only_a.ws("/ws/a").await;
    let mut c_on_both = both.ws("/ws/c").await;
    // A late committer on a draws a low seq; c commits a higher one meanwhile.
    let late = db.client().await;
    late.batch_execute("begin; insert into a values (1)")
        .await
        .unwrap();
    db.exec("insert into c values (1)").await;
    c_on_both.next_json().await;
    // Initial data of a from the relay that exposes both, then the late commit.
    let mut client = both.ws("/ws/a?snapshot=true").await;
    let position = client.next_json().await["seq"].as_i64().unwrap();
    drop(client);
    late.batch_execute("commit").await.unwrap();
    assert_eq!(a_on_only_a.next_json().await["id"], 1);
    // The client resumes on the relay that exposes only a: it gets row 1 (or a reset).
    let mut resumed = only_a.ws(&format!("/ws/a?since={position}")).await;
    let replay = drain(&mut resumed, Duration::from_millis(500)).await;
    assert!(
        replay.iter().any(|e| e["id"] == 1 || e["type"] == "reset"),
        "{replay:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_can_no_longer_be_captured_resets_once_and_stops_being_served() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table r (id int, region text, primary key (id, region)) partition by list (region);
             create table t (id int, region text, primary key (id, region));
             create table k (id int primary key, v text)",
            &["t", "k"],
        )
        .await;
    let relay = Relay::start_with(&db, &["t", "k"], |c| {
        c.schema_interval = Duration::from_millis(100);
    })
    .await;
    let mut t = relay.ws("/ws/t").await;
    let mut k = relay.ws("/ws/k").await;
    // Attached as a partition: writes made through the parent would bypass its statement
    // triggers, so it is no longer exposed, and its subscribers are told.
    db.exec("alter table r attach partition t for values in ('eu')")
        .await;
    assert_eq!(
        t.next_json().await,
        json!({"type": "reset", "resource": "t", "reason": "table_changed"})
    );
    assert_eq!(
        crate::support::http(relay.addr, "GET", "/api/t", None)
            .await
            .status,
        404
    );
    // Its primary key dropped: events could not be matched to rows any more.
    db.exec("alter table k drop constraint k_pkey").await;
    assert_eq!(
        k.next_json().await,
        json!({"type": "reset", "resource": "k", "reason": "table_changed"})
    );
    // Once, not on every check.
    db.exec("insert into k values (1, 'a')").await;
    let more = drain(&mut k, Duration::from_millis(500)).await;
    assert!(more.is_empty(), "{more:?}");
    assert_eq!(
        crate::support::http(relay.addr, "GET", "/api/k", None)
            .await
            .status,
        404
    );
    // Given a key again: served again.
    db.exec("alter table k add primary key (id)").await;
    within(crate::support::STEP, async {
        while crate::support::http(relay.addr, "GET", "/api/k", None)
            .await
            .status
            != 200
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_cannot_attach_capture_to_its_own_table_to_forge_another_tables_events() {
    let db = TestDb::new()
        .await
        .with_tables("create table items (id int primary key)", &["items"])
        .await;
    let role = format!("forger_{}", std::process::id());
    db.exec(&format!(
        "do $$ begin create role {role} login; exception when duplicate_object then null; end $$;
         grant create, usage on schema public to {role}"
    ))
    .await;
    let items: u32 = db
        .client()
        .await
        .query_one("select 'items'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    let forger = crate::support::connect(&format!("{} user={role}", db.url)).await;
    forger
        .batch_execute("create table mine (id int primary key)")
        .await
        .unwrap();
    let attempt = forger
        .batch_execute(&format!(
            "create trigger forge after insert on mine for each row
             execute function pgrelay.capture_row('notify', '{items}')"
        ))
        .await;
    let err = attempt.expect_err("creating the trigger is refused");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("permission denied"),
        "{err:?}"
    );
    drop(forger);
    db.exec(&format!(
        "drop table mine; revoke all on schema public from {role}; drop role {role}"
    ))
    .await;
}

/// A table whose BEFORE INSERT trigger deletes the row the insert replaces.
const REPLACING_TABLE: &str = "
    create table r (id int primary key, v text);
    create function replace_row() returns trigger language plpgsql as $$
    begin delete from r where id = new.id; return new; end $$;
    create trigger replace_row before insert on r for each row
      when (pg_trigger_depth() = 0) execute function replace_row()";

/// Reads and applies messages until the event of key `sentinel` arrives.
async fn apply_until(ws: &mut Ws, copy: &mut Copy, sentinel: i64) {
    loop {
        let m = ws.next_json().await;
        assert_eq!(copy.apply(&m), crate::model::Next::Continue, "{m}");
        if m["id"] == sentinel {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_while_a_statement_changes_its_rows_keep_each_rows_order() {
    let db = TestDb::new()
        .await
        .with_tables(
            // A BEFORE trigger that replaces the row an INSERT is about to write, and a
            // function in RETURNING that updates the row just written: both write the table
            // while the statement runs, so the log's statement order is wrong for them.
            &format!(
                "{REPLACING_TABLE};
             create function bump(k int) returns int language plpgsql as $$
             begin update r set v = v || '+bumped' where id = k; return k; end $$;
             insert into r values (1, 'old'), (2, 'a'), (3, 'keep')"
            ),
            &["r"],
        )
        .await;
    let relay = Relay::start(&db, &["r"]).await;
    let mut ws = relay.ws("/ws/r?snapshot=true").await;
    let mut copy = Copy::new(&["id"]);
    let initial = ws.next_json().await;
    assert_eq!(copy.apply(&initial), crate::model::Next::Continue);
    db.exec("insert into r values (1, 'new')").await;
    db.exec("update r set v = 'b' where id = 2 returning bump(2)")
        .await;
    // An AFTER-style sequence in one transaction keeps the log's order.
    db.exec("begin; insert into r values (4, 'tmp'); delete from r where id = 4; insert into r values (5, 'x'); update r set v = 'y' where id = 5; commit")
        .await;
    db.exec("insert into r values (1000, 'sentinel')").await;
    apply_until(&mut ws, &mut copy, 1000).await;
    assert_eq!(copy.rows, table_rows(&db, "r", &["id"]).await);
    assert_eq!(copy.rows["1"]["v"], "new");
    assert_eq!(copy.rows["2"]["v"], "b+bumped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_too_large_to_reorder_resets_its_table_when_its_order_is_wrong() {
    let db = TestDb::new()
        .await
        .with_tables(
            &format!(
                "{REPLACING_TABLE};
             insert into r select g, 'old' from generate_series(1, 70) g"
            ),
            &["r"],
        )
        .await;
    let relay = Relay::start(&db, &["r"]).await;
    let mut ws = relay.ws("/ws/r").await;
    // 70 nested deletes and the insert: more chunks than capture holds in memory for one
    // transaction, so it is published as read, and the broken order is found on the way.
    db.exec("insert into r select g, 'new' from generate_series(1, 70) g")
        .await;
    let reset = loop {
        let m = ws.next_json().await;
        if m["type"] == "reset" {
            break m;
        }
    };
    assert_eq!(reset["reason"], "order_unknown", "{reset}");
    let metrics = crate::support::http_get(relay.addr, "/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        metrics.contains("pgrelay_order_unknown_total 1"),
        "{metrics}"
    );
    // Starting over gives the table as it is.
    let mut again = relay.ws("/ws/r?snapshot=true").await;
    let rows = again.initial_rows().await;
    assert_eq!(rows.len(), 70);
    assert!(rows.iter().all(|r| r["v"] == "new"));
}
