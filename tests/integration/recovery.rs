//! Nothing lost when the relay's database connections drop or PostgreSQL restarts
//! (DESIGN.md guarantee 2). Each test causes the fault.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    Cluster, Relay, TestDb, connect, http_get, terminate_relay_connections, within,
};

const ITEMS: &str = "create table items(id serial primary key, name text)";

fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["data"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relays_connections_mid_stream_loses_and_repeats_nothing() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    let client = db.client().await;
    let writer = tokio::spawn(async move {
        for i in 0..3000 {
            client
                .execute("insert into items(name) values ($1)", &[&i.to_string()])
                .await
                .unwrap();
        }
    });
    let first = ws.events(1000).await;
    let killed_at = Instant::now();
    let killed = terminate_relay_connections(&db).await;
    assert!(killed >= 1, "the capture connection was terminated");
    crate::support::wait_for_metrics(
        relay.addr,
        &[
            "pgrelay_capture_reconnects_total 1",
            "pgrelay_capture_listening 1",
        ],
    )
    .await;
    eprintln!(
        "recovery after pg_terminate_backend: listening again after {:?}",
        killed_at.elapsed()
    );
    let rest = ws.events(2000).await;
    within(Duration::from_secs(60), writer).await.unwrap();
    let mut all = names(&first);
    all.extend(names(&rest));
    let expected: Vec<String> = (0..3000).map(|i| i.to_string()).collect();
    assert_eq!(all, expected, "every row once, in commit order");
    eprintln!(
        "recovery after pg_terminate_backend: all 2000 remaining events {:?} after the kill",
        killed_at.elapsed()
    );
    db.exec("insert into items(name) values ('sentinel')").await;
    assert_eq!(
        ws.next_json().await["data"]["name"],
        "sentinel",
        "nothing repeated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_committer_is_delivered_after_the_relay_reconnects() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;

    // The late transaction takes the lower seq and stays open.
    let late = db.client().await;
    late.batch_execute("begin; insert into items(name) values ('late')")
        .await
        .unwrap();
    // A later transaction commits first and is delivered.
    let other = db.client().await;
    other
        .execute("insert into items(name) values ('early')", &[])
        .await
        .unwrap();
    let early = ws.next_json().await;
    assert_eq!(early["data"]["name"], "early");

    // Cut the relay off: refuse new connections to the database, terminate the relay's.
    let admin = connect(&crate::support::admin_url()).await;
    let quoted = format!("\"{}\"", db.name);
    admin
        .batch_execute(&format!(
            "alter database {quoted} with allow_connections false"
        ))
        .await
        .unwrap();
    terminate_relay_connections(&db).await;
    within(crate::support::STEP, async {
        while http_get(relay.addr, "/readyz").await.unwrap().0 != 503 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // The late transaction commits while no relay listens, and so does one more.
    late.batch_execute("commit").await.unwrap();
    other
        .execute("insert into items(name) values ('while away')", &[])
        .await
        .unwrap();

    admin
        .batch_execute(&format!(
            "alter database {quoted} with allow_connections true"
        ))
        .await
        .unwrap();
    relay.wait_ready().await;
    let events = ws.events(2).await;
    let got: HashSet<String> = names(&events).into_iter().collect();
    assert_eq!(
        got,
        HashSet::from(["late".to_owned(), "while away".to_owned()])
    );
    other
        .execute("insert into items(name) values ('sentinel')", &[])
        .await
        .unwrap();
    assert_eq!(
        ws.next_json().await["data"]["name"],
        "sentinel",
        "nothing repeated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_while_a_writer_runs_loses_nothing() {
    let cluster = Cluster::start().await;
    let admin = connect(&cluster.url("postgres")).await;
    admin.batch_execute("create database relay").await.unwrap();
    drop(admin);
    let url = cluster.url("relay");
    let setup = connect(&url).await;
    setup.batch_execute(ITEMS).await.unwrap();
    drop(setup);
    let db = crate::support::TestDb::external(url.clone());
    let relay = Relay::start_with(&db, &["items"], |c| c.install = true).await;
    let mut ws = relay.ws("/ws/items").await;

    // The writer inserts numbered rows and reconnects whenever the server goes away.
    let (restart_tx, mut restart_rx) = tokio::sync::watch::channel(false);
    let writer_url = url.clone();
    let writer = tokio::spawn(async move {
        let mut client = connect(&writer_url).await;
        let mut i = 0;
        while i < 1000 {
            if i == 300 {
                restart_tx.send_replace(true);
            }
            match client
                .execute("insert into items(name) values ($1)", &[&i.to_string()])
                .await
            {
                Ok(_) => i += 1,
                Err(_) => {
                    // The outcome of this insert is unknown; the final check reads the table.
                    i += 1;
                    loop {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if let Ok((c, conn)) =
                            tokio_postgres::connect(&writer_url, tokio_postgres::NoTls).await
                        {
                            tokio::spawn(conn);
                            client = c;
                            break;
                        }
                    }
                }
            }
        }
    });
    within(crate::support::STEP, restart_rx.wait_for(|r| *r))
        .await
        .unwrap();
    let restarted_at = Instant::now();
    let cluster = std::sync::Arc::new(cluster);
    let restarting = std::sync::Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap();
    within(Duration::from_secs(60), writer).await.unwrap();
    relay.wait_ready().await;
    eprintln!(
        "postgres restart: relay ready again {:?} after the restart began",
        restarted_at.elapsed()
    );

    let check = connect(&url).await;
    let committed: HashSet<String> = check
        .query("select name from items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut received = Vec::new();
    while received.len() < committed.len() {
        received.extend(names(&ws.events(1).await));
    }
    let unique: HashSet<String> = received.iter().cloned().collect();
    assert_eq!(unique.len(), received.len(), "no duplicates");
    assert_eq!(unique, committed, "every committed row was delivered");
    drop(relay);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_to_an_earlier_state_resets_every_subscriber() {
    let cluster = std::sync::Arc::new(Cluster::start().await);
    let db = cluster.database("relay", ITEMS).await;
    let relay = Relay::start_with(&db, &["items"], |c| c.install = true).await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("insert into items(name) values ('before')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "before");
    // A backup, then changes the backup does not hold (transactions and seqs drawn).
    let c = std::sync::Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.backup())
        .await
        .unwrap();
    relay.wait_ready().await;
    for i in 0..20 {
        db.exec(&format!("insert into items(name) values ('after {i}')"))
            .await;
    }
    let after = ws.events(20).await;
    let position = after.last().unwrap()["seq"].as_i64().unwrap();
    // The database is restored: those changes are gone, and its ids go back.
    let c = std::sync::Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.restore())
        .await
        .unwrap();
    let reset = ws.next_json().await;
    assert_eq!(
        (&reset["type"], &reset["reason"]),
        (&Value::from("reset"), &Value::from("events_missing")),
        "{reset}"
    );
    relay.wait_ready().await;
    // Capture goes on with the restored history, and a position from the lost one cannot
    // resume (its seqs will be drawn again).
    db.exec("insert into items(name) values ('restored')").await;
    let mut fresh = relay.ws("/ws/items?snapshot=true").await;
    let rows = fresh.initial_rows().await;
    let mut seen: Vec<String> = rows
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    if seen.len() < 2 {
        seen.extend(names(&fresh.events(1).await));
    }
    seen.sort();
    assert_eq!(seen, ["before", "restored"]);
    let mut resumed = relay.ws(&format!("/ws/items?since={position}")).await;
    assert_eq!(resumed.next_json().await["type"], "reset");
    let metrics = http_get(relay.addr, "/readyz").await.unwrap();
    assert_eq!(metrics.0, 200, "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_more_transactions_than_one_page_is_published_whole_and_in_order() {
    let cluster = Cluster::start().await;
    let db = cluster.database("relay", ITEMS).await;
    crate::support::install(&db, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    // Capture is frozen while 5,000 transactions commit (more than one page of the listing).
    let pid = cluster.capture_pid("relay").await;
    crate::support::signal("STOP", pid);
    let writer = db.client().await;
    let inserts = (0..5000).map(|i| {
        let writer = &writer;
        async move {
            writer
                .execute("insert into items(name) values ($1)", &[&i.to_string()])
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(inserts).await;
    crate::support::signal("CONT", pid);
    let events = ws.events(5000).await;
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    let expected: Vec<i64> = (1..=5000).collect();
    assert_eq!(ids, expected);
    db.exec("insert into items(name) values ('next')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "next");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_before_its_database_waits_for_it() {
    let cluster = std::sync::Arc::new(Cluster::start().await);
    let db = cluster.database("relay", ITEMS).await;
    let c = std::sync::Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.stop()).await.unwrap();
    let relay = Relay::spawn_with(&db, &["items"], |c| c.install = true).await;
    // Not serving while the database is down, and not given up either.
    let early =
        tokio::time::timeout(Duration::from_millis(700), http_get(relay.addr, "/readyz")).await;
    assert!(
        !matches!(early, Ok(Ok((200, _)))),
        "ready without a database: {early:?}"
    );
    let c = std::sync::Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.start_again())
        .await
        .unwrap();
    relay.wait_ready().await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("insert into items(name) values ('up')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "up");
}
