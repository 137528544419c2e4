//! Long transactions elsewhere (idle in transaction, prepared and forgotten) cost capture
//! nothing per event and nothing on a reconnect, and are shown with who holds them
//! (issue 9, item 10).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{Cluster, Relay, TestDb, connect, http_get, within};

const ITEMS: &str = "create table items(id serial primary key, name text);
                     create table audit(id serial primary key, note text)";

async fn metric(relay: &Relay, name: &str) -> u64 {
    let (_, body) = http_get(relay.addr, "/metrics").await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {body}"))
}

fn status(url: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["status"])
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_and_prepared_transactions_are_reported_with_their_holder_and_cost_nothing() {
    let cluster = Cluster::start().await;
    let admin = connect(&cluster.url("postgres")).await;
    admin.batch_execute("create database relay").await.unwrap();
    let url = cluster.url("relay");
    connect(&url).await.batch_execute(ITEMS).await.unwrap();
    let db = TestDb::external(url.clone());
    let relay = Relay::start_with(&db, &["items"], |c| c.install = true).await;
    let mut ws = relay.ws("/ws/items").await;

    // A session idle in a transaction that holds an xid, in another database of the cluster.
    let idle = connect(&cluster.url("postgres")).await;
    idle.batch_execute("begin").await.unwrap();
    let idle_pid: i32 = idle
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    idle.query_one("select pg_current_xact_id()", &[])
        .await
        .unwrap();

    // Thousands of transactions commit meanwhile: each is delivered, none is kept around.
    let writer = connect(&url).await;
    for i in 0..2000 {
        writer
            .execute("insert into items(name) values ($1)", &[&i.to_string()])
            .await
            .unwrap();
    }
    let events = ws.events(2000).await;
    assert_eq!(events[1999]["data"]["name"], "1999");
    // The held-back horizon is shown, with the pid that holds it.
    within(crate::support::STEP, async {
        while metric(&relay, "pgrelay_horizon_holder_pid").await != idle_pid as u64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(metric(&relay, "pgrelay_horizon_stuck_seconds").await >= 1);
    let out = status(&url);
    assert!(
        out.lines().any(|l| l.ends_with(&format!(" {idle_pid}"))),
        "status names the holder: {out}"
    );

    // A reconnect catches up at once, reading nothing twice, however long the horizon is held.
    let reconnects = metric(&relay, "pgrelay_capture_reconnects_total").await;
    admin
        .execute(
            "select pg_terminate_backend(pid) from pg_stat_activity
              where datname = 'relay' and application_name like 'pgrelay%'",
            &[],
        )
        .await
        .unwrap();
    let cut = Instant::now();
    within(crate::support::STEP, async {
        while metric(&relay, "pgrelay_capture_reconnects_total").await == reconnects {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    relay.wait_ready().await;
    eprintln!(
        "long transaction open: capture back {:?} after the cut",
        cut.elapsed()
    );
    writer
        .execute("insert into items(name) values ('sentinel')", &[])
        .await
        .unwrap();
    assert_eq!(
        ws.next_json().await["data"]["name"],
        "sentinel",
        "nothing replayed"
    );

    // A prepared transaction left behind (two-phase commit on a table pgrelay does not
    // capture: in notify mode PostgreSQL refuses to PREPARE after a NOTIFY) is named as such.
    idle.batch_execute("commit").await.unwrap();
    let forgotten = connect(&url).await;
    forgotten
        .batch_execute(
            "begin; insert into audit(note) values ('prepared'); prepare transaction 'forgotten'",
        )
        .await
        .unwrap();
    within(crate::support::STEP, async {
        loop {
            let out = status(&url);
            if out.lines().any(|l| l.ends_with("prepared xact")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    writer
        .execute("insert into items(name) values ('while prepared')", &[])
        .await
        .unwrap();
    assert_eq!(ws.next_json().await["data"]["name"], "while prepared");
    forgotten
        .batch_execute("commit prepared 'forgotten'")
        .await
        .unwrap();
}
