//! Partitioned tables are exposed by their root's name; inheritance children and writes
//! under `session_replication_role = replica` are captured (issue 9, item 5).

use serde_json::json;

use crate::model::{Copy, read_until_equal, table_rows};
use crate::support::{Relay, TestDb};

const MEASURES: &str = "
    create table m(id int, region text, v int, primary key (id, region)) partition by list (region);
    create table m_eu partition of m for values in ('eu');
    create table m_us partition of m for values in ('us')";

fn fast_schema_checks(c: &mut pgrelay::Config) {
    c.schema_interval = std::time::Duration::from_millis(100);
}

fn summary(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["resource"].as_str().unwrap(),
                e["type"].as_str().unwrap(),
                e["id"]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_streams_as_its_root_however_and_wherever_rows_are_written() {
    let db = TestDb::new().await.with_tables(MEASURES, &["m"]).await;
    let relay = Relay::start_with(&db, &["m"], fast_schema_checks).await;
    let mut ws = relay.ws("/ws/m").await;
    let mut copy = Copy::new(&["id", "region"]);
    db.exec(
        "insert into m values (1, 'eu', 1), (2, 'us', 2);
         insert into m_eu values (3, 'eu', 3);
         update m set region = 'us' where id = 1;
         update m_us set v = 20 where id = 2;
         delete from m where id = 3",
    )
    .await;
    let mut events = ws.events(7).await;
    // A partition created while the relay runs: the watcher notices (the partition set
    // changed: subscribers start over) and rows written into it are captured anyway.
    db.exec(
        "create table m_asia partition of m for values in ('asia');
         insert into m_asia values (4, 'asia', 4)",
    )
    .await;
    let next = ws.events(2).await;
    let (reset, create) = if next[0]["type"] == "reset" {
        (&next[0], &next[1])
    } else {
        (&next[1], &next[0])
    };
    assert_eq!(reset["reason"], "table_changed");
    events.push(create.clone());
    assert_eq!(
        summary(&events),
        [
            r#"m create {"id":1,"region":"eu"}"#,
            r#"m create {"id":2,"region":"us"}"#,
            r#"m create {"id":3,"region":"eu"}"#,
            r#"m delete {"id":1,"region":"eu"}"#,
            r#"m create {"id":1,"region":"us"}"#,
            r#"m update {"id":2,"region":"us"}"#,
            r#"m delete {"id":3,"region":"eu"}"#,
            r#"m create {"id":4,"region":"asia"}"#,
        ]
    );
    for e in &events {
        copy.apply(e);
    }
    assert_eq!(copy.rows, table_rows(&db, "m", &["id", "region"]).await);

    // Truncating one partition: its rows are gone without a trace in the root's events, so
    // subscribers start over; truncating the root is a truncate.
    db.exec("truncate m_eu").await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "reset", "resource": "m", "reason": "table_changed"})
    );
    db.exec("truncate m").await;
    let truncate = ws.next_json().await;
    assert_eq!(truncate["type"], "truncate", "{truncate}");
    db.exec("insert into m values (9, 'us', 9)").await;
    assert_eq!(
        ws.next_json().await["id"],
        json!({"id": 9, "region": "us"}),
        "no reset for the root's own partitions"
    );

    // Detaching a partition takes its rows away: subscribers start over.
    db.exec("alter table m detach partition m_us").await;
    assert_eq!(ws.next_json().await["reason"], "table_changed");
    // A detached table's truncate is none of the root's business any more.
    crate::support::within(crate::support::STEP, async {
        loop {
            let left: i64 = db
                .client()
                .await
                .query_one(
                    "select count(*) from pg_trigger where tgrelid = 'm_us'::regclass and tgname like 'pgrelay%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    db.exec("truncate m_us").await;
    // A partition attached later is captured too, once the watcher has seen it.
    db.exec("alter table m attach partition m_us for values in ('us')")
        .await;
    assert_eq!(ws.next_json().await["reason"], "table_changed");
    db.exec("insert into m_us values (10, 'us', 10)").await;
    assert_eq!(
        ws.next_json().await["id"],
        json!({"id": 10, "region": "us"})
    );

    // A fresh subscriber's copy equals the table.
    let mut fresh = relay.ws("/ws/m?snapshot=true").await;
    let mut copy = Copy::new(&["id", "region"]);
    let expected = table_rows(&db, "m", &["id", "region"]).await;
    read_until_equal(&mut fresh, &mut copy, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_capture_on_one_partition_resets_and_install_puts_it_back() {
    let db = TestDb::new().await.with_tables(MEASURES, &["m"]).await;
    let relay = Relay::start_with(&db, &["m"], |c| {
        fast_schema_checks(c);
        c.install = true;
    })
    .await;
    let mut ws = relay.ws("/ws/m").await;
    // The root's row trigger is cloned to every partition, and a clone can be disabled on
    // one partition alone: its writes would go uncaptured.
    db.exec("alter table m_eu disable trigger all").await;
    assert_eq!(
        ws.next_json().await,
        json!({"type": "reset", "resource": "m", "reason": "table_changed"})
    );
    // Reinstalled: writes into that partition stream again.
    crate::support::within(crate::support::STEP, async {
        loop {
            let enabled: bool = db
                .client()
                .await
                .query_one(
                    "select coalesce(bool_and(tgenabled = 'A'), false) from pg_trigger
                      where tgrelid = 'm_eu'::regclass and tgname = 'pgrelay_capture_row'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if enabled {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    db.exec("insert into m_eu values (9, 'eu', 9)").await;
    let next = ws.next_json().await;
    assert_eq!(
        (&next["type"], &next["id"]),
        (&json!("create"), &json!({"id": 9, "region": "eu"})),
        "{next}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_under_session_replication_role_replica_are_captured() {
    let db = TestDb::new()
        .await
        .with_tables(
            &format!("{MEASURES}; create table items(id int primary key, name text)"),
            &["m", "items"],
        )
        .await;
    let relay = Relay::start(&db, &["m", "items"]).await;
    let mut items = relay.ws("/ws/items").await;
    let mut m = relay.ws("/ws/m").await;
    // As logical-replication apply workers and some restore and ETL tools write.
    db.exec(
        "set session_replication_role = replica;
         insert into items values (1, 'replicated');
         insert into m values (1, 'eu', 1);
         truncate items",
    )
    .await;
    assert_eq!(items.next_json().await["data"]["name"], "replicated");
    assert_eq!(items.next_json().await["type"], "truncate");
    assert_eq!(m.next_json().await["id"], json!({"id": 1, "region": "eu"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inheritance_child_gets_the_writes_made_through_its_parent() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table animals(id int primary key, name text);
             create table dogs(primary key (id)) inherits (animals)",
            &["dogs"],
        )
        .await;
    let relay = Relay::start(&db, &["dogs"]).await;
    let mut ws = relay.ws("/ws/dogs").await;
    db.exec(
        "insert into dogs values (1, 'rex'), (2, 'fido');
         update animals set name = upper(name) where id = 1;
         delete from animals where id = 2",
    )
    .await;
    let events = ws.events(4).await;
    assert_eq!(
        summary(&events),
        [
            "dogs create 1",
            "dogs create 2",
            "dogs update 1",
            "dogs delete 2"
        ]
    );
    assert_eq!(events[2]["data"]["name"], "REX");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_applied_by_logical_replication_are_captured() {
    use crate::support::{Cluster, install};
    let schema = "create table lr(id int primary key, v text);
                  create table lp(id int, region text, v text, primary key (id, region))
                      partition by list (region);
                  create table lp_eu partition of lp for values in ('eu')";
    let publisher = Cluster::start_with(&["wal_level=logical"]).await;
    let source = publisher.database("app", schema).await;
    source
        .exec("create publication relayed for table lr, lp")
        .await;
    let subscriber = Cluster::start().await;
    let db = subscriber.database("app", schema).await;
    install(&db, &["lr", "lp"]).await;
    let relay = Relay::start(&db, &["lr", "lp"]).await;
    let mut lr = relay.ws("/ws/lr").await;
    let mut lp = relay.ws("/ws/lp").await;
    // The apply worker fires row triggers only (and only ENABLE REPLICA or ALWAYS ones).
    db.exec(&format!(
        "create subscription relayed connection 'host=127.0.0.1 port={} dbname=app user=postgres'
         publication relayed",
        publisher.port
    ))
    .await;
    // Once the initial copy is done, changes are streamed and applied row by row.
    let check = db.client().await;
    crate::support::within(crate::support::STEP, async {
        loop {
            let pending: i64 = check
                .query_one(
                    "select count(*) from pg_subscription_rel where srsubstate <> 'r'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if pending == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    source
        .exec(
            "insert into lr values (1, 'a'), (2, 'b');
             update lr set v = 'aa' where id = 1;
             update lr set id = 20 where id = 2;
             delete from lr where id = 1;
             insert into lp values (1, 'eu', 'x')",
        )
        .await;
    let events = lr.events(6).await;
    let summary: Vec<String> = events
        .iter()
        .map(|e| format!("{} {}", e["type"].as_str().unwrap(), e["id"]))
        .collect();
    assert_eq!(
        summary,
        [
            "create 1",
            "create 2",
            "update 1",
            "delete 2",
            "create 20",
            "delete 1"
        ]
    );
    assert_eq!(lp.next_json().await["id"], json!({"id": 1, "region": "eu"}));
    db.exec("drop subscription relayed").await;
}
