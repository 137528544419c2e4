//! Poll mode (`--capture poll`): writers never NOTIFY, the relay reads the log on its own, and
//! every guarantee holds as in notify mode. Also: a writer's short `lock_timeout` never
//! cancels it inside pgrelay's trigger.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::support::{Relay, TestDb, terminate_relay_connections, wait_for_metrics, within};

const ITEMS: &str = "create table items(id serial primary key, name text)";

/// A database with `items` captured in poll mode.
async fn poll_db() -> TestDb {
    let db = TestDb::new().await;
    db.exec(ITEMS).await;
    crate::support::install_mode(&db, &["items"], "poll").await;
    db
}

async fn poll_relay(db: &TestDb) -> Relay {
    Relay::start_with(db, &["items"], |c| {
        c.capture_mode = pgrelay::capture::Mode::Poll;
    })
    .await
}

fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["data"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_poll_mode_writers_never_notify_and_every_change_arrives_once_in_commit_order() {
    let db = poll_db().await;
    // A session that LISTENs where notify mode's triggers would NOTIFY.
    let (listener, mut connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    let (note_tx, mut note_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = note_tx.send(n.channel().to_owned());
            }
        }
    });
    listener.batch_execute("listen pgrelay").await.unwrap();

    let relay = poll_relay(&db).await;
    let mut ws = relay.ws("/ws/items").await;

    // A late committer: it takes its seqs first and commits after everything else.
    let late = db.client().await;
    late.batch_execute("begin; insert into items(name) values ('late')")
        .await
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = db.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..300 {
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
    // A bulk statement in the middle of it all.
    db.exec("insert into items(name) select 'bulk-' || g from generate_series(0, 2999) g")
        .await;
    for w in writers {
        within(Duration::from_secs(60), w).await.unwrap();
    }
    late.batch_execute("commit").await.unwrap();

    let events = ws.events(1200 + 3000 + 1).await;
    let all = names(&events);
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "no duplicates");
    // Transactions found in one read of the log are ordered by their last change (README,
    // guarantee 1), so `late` may come before writes that committed just before it.
    assert!(
        all.iter().any(|n| n == "late"),
        "the late committer arrives"
    );
    for w in 0..4 {
        let mine: Vec<usize> = all
            .iter()
            .filter_map(|n| {
                n.strip_prefix(&format!("w{w}-"))
                    .map(|i| i.parse().unwrap())
            })
            .collect();
        assert_eq!(
            mine,
            (0..300).collect::<Vec<_>>(),
            "writer {w} in its commit order"
        );
    }
    let bulk: Vec<usize> = all
        .iter()
        .filter_map(|n| n.strip_prefix("bulk-").map(|i| i.parse().unwrap()))
        .collect();
    assert_eq!(
        bulk,
        (0..3000).collect::<Vec<_>>(),
        "the statement whole, in order"
    );

    db.exec("insert into items(name) values ('sentinel')").await;
    assert_eq!(
        ws.next_json().await["data"]["name"],
        "sentinel",
        "nothing extra"
    );
    // The listener got nothing: 1,200 commits, no notification. (A round trip on the same
    // session first, so any notification already sent would have been read.)
    listener.batch_execute("select 1").await.unwrap();
    assert_eq!(
        note_rx.try_recv().ok(),
        None,
        "poll-mode writers never NOTIFY"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_poll_mode_killing_the_relays_connections_loses_and_repeats_nothing() {
    let db = poll_db().await;
    let relay = poll_relay(&db).await;
    let mut ws = relay.ws("/ws/items").await;
    let client = db.client().await;
    let writer = tokio::spawn(async move {
        for i in 0..2000 {
            client
                .execute("insert into items(name) values ($1)", &[&i.to_string()])
                .await
                .unwrap();
        }
    });
    let first = ws.events(500).await;
    assert!(terminate_relay_connections(&db).await >= 1);
    wait_for_metrics(
        relay.addr,
        &[
            "pgrelay_capture_reconnects_total 1",
            "pgrelay_capture_listening 1",
        ],
    )
    .await;
    let rest = ws.events(1500).await;
    within(Duration::from_secs(60), writer).await.unwrap();
    let mut all = names(&first);
    all.extend(names(&rest));
    let expected: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
    assert_eq!(all, expected, "every row once, in commit order");
    db.exec("insert into items(name) values ('sentinel')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "sentinel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_poll_mode_initial_data_hands_over_gap_free_and_since_resumes() {
    let db = poll_db().await;
    db.exec("insert into items(name) select 'old-' || g from generate_series(1, 500) g")
        .await;
    let relay = poll_relay(&db).await;
    // A writer runs through the snapshot.
    let client = db.client().await;
    let writer = tokio::spawn(async move {
        for i in 0..400 {
            client
                .execute(
                    "insert into items(name) values ($1)",
                    &[&format!("new-{i}")],
                )
                .await
                .unwrap();
            if i % 3 == 0 {
                client
                    .execute(
                        "delete from items where name = $1",
                        &[&format!("old-{}", i + 1)],
                    )
                    .await
                    .unwrap();
            }
        }
    });
    let mut ws = relay.ws("/ws/items").await;
    ws.send_json(json!({"type": "subscribe"})).await;
    let mut copy: BTreeMap<i64, Value> = BTreeMap::new();
    for row in ws.initial_rows().await {
        copy.insert(row["id"].as_i64().unwrap(), row);
    }
    within(Duration::from_secs(60), writer).await.unwrap();
    db.exec("insert into items(name) values ('sentinel')").await;
    let mut seen = HashSet::new();
    let last_seq = loop {
        let e = ws.next_json().await;
        let id = e["id"].as_i64().unwrap();
        let seq = e["seq"].as_i64().unwrap();
        seen.insert(seq);
        match e["type"].as_str().unwrap() {
            "create" | "update" => {
                copy.insert(id, e["data"].clone());
            }
            "delete" => {
                assert!(
                    copy.remove(&id).is_some(),
                    "a delete of a row the copy holds"
                );
            }
            other => panic!("unexpected {other}"),
        }
        if e["data"]["name"] == "sentinel" {
            break seq;
        }
    };
    let rows = db
        .client()
        .await
        .query("select id, name from items order by id", &[])
        .await
        .unwrap();
    let table: BTreeMap<i64, Value> = rows
        .iter()
        .map(|r| {
            let id: i32 = r.get(0);
            let name: &str = r.get(1);
            (i64::from(id), json!({"id": id, "name": name}))
        })
        .collect();
    assert_eq!(copy, table, "the copy is the table");

    // Resume from the last event: what came after it. At least once: a replay is a suffix of
    // the stream starting at or before the position, so it may repeat events this client
    // saw, or (from before its snapshot) events it got as initial rows instead.
    drop(ws);
    db.exec("insert into items(name) values ('after 1'), ('after 2')")
        .await;
    let mut ws = relay.ws(&format!("/ws/items?since={last_seq}")).await;
    let mut new = Vec::new();
    while new.len() < 2 {
        let e = ws.next_json().await;
        let seq = e["seq"].as_i64().unwrap();
        if !seen.contains(&seq) && seq > last_seq {
            new.push(e);
        }
    }
    assert_eq!(
        names(&new),
        ["after 1", "after 2"],
        "nothing missed, nothing unknown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_a_1ms_lock_timeout_waits_for_the_logs_locks_instead_of_failing() {
    for mode in ["poll", "notify"] {
        let db = TestDb::new().await;
        db.exec(ITEMS).await;
        crate::support::install_mode(&db, &["items"], mode).await;
        // Someone holds a lock on the log that the capture trigger's insert must wait for
        // (as CREATE INDEX on it would).
        let holder = db.client().await;
        holder
            .batch_execute("begin; lock table pgrelay.changes in share mode")
            .await
            .unwrap();
        let writer = db.client().await;
        writer
            .batch_execute("set lock_timeout = '1ms'")
            .await
            .unwrap();
        let write = tokio::spawn(async move {
            writer
                .execute("insert into items(name) values ('patient')", &[])
                .await
        });
        // The writer is waiting on the log, not failed.
        let probe = db.client().await;
        within(Duration::from_secs(10), async {
            loop {
                let waiting: i64 = probe
                    .query_one(
                        "select count(*) from pg_locks where not granted and relation = 'pgrelay.changes'::regclass",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if waiting > 0 || write.is_finished() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        holder.batch_execute("commit").await.unwrap();
        let inserted = within(Duration::from_secs(10), write).await.unwrap();
        assert_eq!(
            inserted.map_err(|e| e.to_string()),
            Ok(1),
            "{mode} mode: the write waited for the log instead of failing"
        );
        let logged: i64 = probe
            .query_one("select count(*) from pgrelay.changes", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(logged, 1, "{mode} mode: and was captured");
        // The writer's own lock_timeout still holds for its own statements.
        let other = db.client().await;
        other
            .batch_execute("begin; lock table items in share mode")
            .await
            .unwrap();
        let writer = db.client().await;
        writer
            .batch_execute("set lock_timeout = '1ms'")
            .await
            .unwrap();
        let err = writer
            .execute("insert into items(name) values ('impatient')", &[])
            .await
            .expect_err("the table's own lock times out");
        assert!(
            err.to_string().contains("lock timeout")
                || err
                    .as_db_error()
                    .is_some_and(|e| e.message().contains("lock timeout")),
            "{err}"
        );
        other.batch_execute("rollback").await.unwrap();
    }
}
