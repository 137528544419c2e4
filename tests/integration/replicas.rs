//! Resume is safe on any relay (issue 9, item 7), and changes committed before a relay
//! started are never replayed as events (item 6).

use std::time::Duration;

use serde_json::Value;

use crate::support::{Relay, TestDb, admin_url, connect, terminate_relay_connections, within};

const ITEMS: &str = "create table items(id serial primary key, name text)";

/// A relay that connects as its own login role, so that it alone can be cut off.
async fn relay_as(db: &TestDb, role: &str) -> Relay {
    let admin = connect(&admin_url()).await;
    admin
        .batch_execute(&format!(
            "do $$ begin create role {role} login superuser; exception when duplicate_object then null; end $$"
        ))
        .await
        .unwrap();
    let url = format!("{} user={role}", db.url);
    Relay::start_with(db, &["items"], |c| c.database_url = url).await
}

/// Refuses (or allows again) new connections of a role and ends its current ones.
async fn cut_off(role: &str, cut: bool) {
    let admin = connect(&admin_url()).await;
    let login = if cut { "nologin" } else { "login" };
    admin
        .batch_execute(&format!("alter role {role} {login}"))
        .await
        .unwrap();
    if cut {
        admin
            .execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = $1",
                &[&role],
            )
            .await
            .unwrap();
    }
}

fn name(e: &Value) -> &str {
    e["data"]["name"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_on_another_relay_misses_nothing_a_late_committer_reordered() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let role_a = format!("relay_a_{}", std::process::id());
    let a = relay_as(&db, &role_a).await;
    let b = Relay::start(&db, &["items"]).await;
    let mut on_a = a.ws("/ws/items").await;
    let mut on_b = b.ws("/ws/items").await;

    // The late transaction takes the lower seq and stays open.
    let late = db.client().await;
    late.batch_execute("begin; insert into items(name) values ('late')")
        .await
        .unwrap();
    // Relay A is cut off; meanwhile a later transaction commits first, then the late one.
    cut_off(&role_a, true).await;
    crate::support::wait_for_metrics(a.addr, &["pgrelay_capture_listening 0"]).await;
    db.exec("insert into items(name) values ('early')").await;
    // B, listening, sends 'early' before the late transaction commits: commit order.
    assert_eq!(name(&on_b.next_json().await), "early");
    late.batch_execute("commit").await.unwrap();
    assert_eq!(name(&on_b.next_json().await), "late");
    // A catches up with both in one batch: seq order.
    cut_off(&role_a, false).await;
    let from_a = on_a.events(2).await;
    assert_eq!([name(&from_a[0]), name(&from_a[1])], ["late", "early"]);

    // A client that saw only 'late' on A resumes on B with its seq: it gets 'early' (and
    // may see 'late' again: at-least-once, dedupe by seq), never a gap.
    let since = from_a[0]["seq"].as_i64().unwrap();
    let mut resumed = b.ws(&format!("/ws/items?since={since}")).await;
    let mut got = Vec::new();
    within(Duration::from_secs(10), async {
        while !got.contains(&"early".to_owned()) {
            let e = resumed.next_json().await;
            assert_ne!(e["type"], "reset", "B was listening: it can resume");
            got.push(name(&e).to_owned());
        }
    })
    .await;

    // Initial data carries a position a client can resume from on the other relay.
    let mut fresh = a.ws("/ws/items?snapshot=true").await;
    let rows = fresh.initial_rows().await;
    assert_eq!(rows.len(), 2);
    let mut fresh = a.ws("/ws/items?snapshot=true").await;
    let initial = fresh.next_json().await;
    let position = initial["seq"]
        .as_i64()
        .expect("initial data has a position");
    db.exec("insert into items(name) values ('after the snapshot')")
        .await;
    let mut resumed = b.ws(&format!("/ws/items?since={position}")).await;
    within(Duration::from_secs(10), async {
        loop {
            let e = resumed.next_json().await;
            assert_ne!(e["type"], "reset");
            if name(&e) == "after the snapshot" {
                return;
            }
        }
    })
    .await;
    drop(a);
    let admin = connect(&admin_url()).await;
    let _ = admin
        .batch_execute(&format!(
            "select pg_terminate_backend(pid) from pg_stat_activity where usename = '{role_a}'"
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_committed_before_the_relay_started_are_never_replayed() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    // Any session in the cluster that holds an xid keeps snapshots' xmin low…
    let holder = connect(&admin_url()).await;
    holder
        .batch_execute("begin; select pg_current_xact_id()")
        .await
        .unwrap();
    // …so this committed change has an xid above the relay's first horizon.
    db.exec("insert into items(name) values ('before start')")
        .await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("insert into items(name) values ('after start')")
        .await;
    assert_eq!(name(&ws.next_json().await), "after start");
    // A reconnect catches up from where capture was, not from its first horizon.
    terminate_relay_connections(&db).await;
    crate::support::wait_for_metrics(relay.addr, &["pgrelay_capture_reconnects_total 1"]).await;
    relay.wait_ready().await;
    db.exec("insert into items(name) values ('sentinel')").await;
    assert_eq!(
        name(&ws.next_json().await),
        "sentinel",
        "nothing from before the start, nothing twice"
    );
    holder.batch_execute("commit").await.unwrap();
}
