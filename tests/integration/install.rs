//! Capture install and uninstall, through the command line as a user runs them.

use std::process::Command;

use crate::support::{Relay, TestDb};

fn pgrelay(db: &TestDb, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run pgrelay");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn trigger_count(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "select count(*) from pg_trigger where tgname like 'pgrelay_capture_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_idempotent_and_uninstall_removes_the_triggers() {
    let db = TestDb::new().await;
    db.exec("create table items(id int primary key); create schema shop; create table shop.orders(id int primary key)").await;
    for _ in 0..2 {
        let (ok, out) = pgrelay(&db, &["install", "items", "shop.orders"]);
        assert!(ok, "{out}");
    }
    assert_eq!(trigger_count(&db).await, 12);
    let (ok, out) = pgrelay(&db, &["status"]);
    assert!(
        ok && out.contains("public.items") && out.contains("shop.orders"),
        "{out}"
    );

    let (ok, out) = pgrelay(&db, &["uninstall", "items"]);
    assert!(ok, "{out}");
    assert_eq!(trigger_count(&db).await, 6);
    // A write to an uninstalled table is not logged, and still succeeds.
    db.exec("insert into items values (1)").await;
    let logged: i64 = db
        .client()
        .await
        .query_one("select count(*) from pgrelay.changes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_refuses_missing_tables_and_tables_without_a_primary_key_by_name() {
    let db = TestDb::new().await;
    db.exec("create table items(id int primary key); create table nokey(a int)")
        .await;
    let (ok, out) = pgrelay(&db, &["install", "items", "nokey"]);
    assert!(!ok);
    assert!(out.contains("public.nokey has no primary key"), "{out}");
    let (ok, out) = pgrelay(&db, &["install", "missing"]);
    assert!(!ok);
    assert!(out.contains("public.missing does not exist"), "{out}");
    // Every table is checked first: items was not installed by the failed call.
    assert_eq!(trigger_count(&db).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_install_names_the_table_that_lacks_capture() {
    let db = TestDb::new().await;
    db.exec("create table items(id int primary key)").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = pgrelay::Config::new(
        db.url.clone(),
        vec![pgrelay::TableName::parse("items").unwrap()],
    );
    let err = pgrelay::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Capture is not installed on table public.items"),
        "{err}"
    );
    let _ = Relay::start_with(&db, &["items"], |c| c.install = true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_while_writers_run_loses_no_write() {
    let db = TestDb::new().await;
    db.exec("create table items(id serial primary key, n int)")
        .await;
    let client = db.client().await;
    let writer = tokio::spawn(async move {
        for i in 0..300 {
            client
                .execute("insert into items(n) values ($1)", &[&i])
                .await
                .expect("write never fails");
        }
    });
    for _ in 0..5 {
        let (ok, out) = pgrelay(&db, &["install", "items"]);
        assert!(ok, "{out}");
    }
    writer.await.unwrap();
    let count: i64 = db
        .client()
        .await
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 300);
}

/// Events of tables in the log (relays' start markers left out).
async fn log_rows(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "select coalesce(sum(n), 0)::int8 from pgrelay.changes where relid <> 0",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_the_log_by_row_count_and_by_age() {
    use std::time::Duration;
    let db = TestDb::new().await;
    db.exec("create table items(id serial primary key, n int)")
        .await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.install = true;
        c.retention.max_age = None;
        c.retention.max_rows = Some(10);
        c.retention.interval = Duration::from_millis(100);
    })
    .await;
    // One statement per row: a log row per event, so the count is exact.
    db.exec("do $$ begin for g in 1..50 loop insert into items(n) values (g); end loop; end $$")
        .await;
    crate::support::within(crate::support::STEP, async {
        while log_rows(&db).await > 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let newest: i64 = db
        .client()
        .await
        .query_one(
            "select min((body->0->3->>'n')::int8) from pgrelay.changes where relid <> 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(newest, 41, "the newest 10 rows are kept");
    relay.stop().await.unwrap();

    let _relay = Relay::start_with(&db, &["items"], |c| {
        c.retention.max_age = Some(Duration::from_millis(500));
        c.retention.max_rows = None;
        c.retention.interval = Duration::from_millis(100);
    })
    .await;
    crate::support::within(crate::support::STEP, async {
        while log_rows(&db).await > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_count_keeps_the_newest_transactions_across_an_xid_with_more_digits() {
    use std::time::Duration;
    // A cluster of its own, whose transaction ids are about to reach 10,000: the rows kept
    // straddle 9,999 and 10,000, which sort the other way round as text.
    let cluster = crate::support::Cluster::start().await;
    let db = cluster
        .database(
            "retention",
            "create table items(id serial primary key, n int)",
        )
        .await;
    crate::support::install(&db, &["items"]).await;
    let client = db.client().await;
    let now: i64 = client
        .query_one("select pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get(0);
    let burns = (now..9_975).map(|_| {
        let client = &client;
        async move {
            client
                .query_one("select pg_current_xact_id()", &[])
                .await
                .unwrap()
        }
    });
    futures_util::future::join_all(burns).await;
    for g in 1..=30 {
        client
            .execute("insert into items(n) values ($1)", &[&g])
            .await
            .unwrap();
    }
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.retention.max_age = None;
        c.retention.max_rows = Some(10);
        c.retention.interval = Duration::from_millis(100);
    })
    .await;
    crate::support::within(crate::support::STEP, async {
        while log_rows(&db).await > 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let kept: Vec<i32> = client
        .query(
            "select (body->0->3->>'n')::int4 from pgrelay.changes where relid <> 0 order by xid",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The newest ten events: the relay's start marker and the last nine rows.
    assert_eq!(kept, (22..=30).collect::<Vec<_>>());
    let (lo, hi): (String, String) = {
        let r = client
            .query_one(
                "select min(xid)::text, max(xid)::text from pgrelay.changes where relid <> 0",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        lo.len() < hi.len(),
        "the kept rows straddle 10,000: {lo}..{hi}"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_tables_and_the_running_relays_lag() {
    let db = TestDb::new().await;
    db.exec("create table items(id serial primary key, n int)")
        .await;
    let relay = Relay::start_with(&db, &["items"], |c| c.install = true).await;
    let mut ws = relay.ws("/ws/items").await;
    db.exec("insert into items(n) values (1), (2)").await;
    let events = ws.events(2).await;
    let last_seq = events[1]["seq"].as_i64().unwrap().to_string();
    // The relay reports its progress when its horizon moves (every 200 ms in tests).
    crate::support::within(crate::support::STEP, async {
        loop {
            let (ok, out) = pgrelay(&db, &["status"]);
            assert!(ok, "{out}");
            let relay_line = out
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(last_seq.as_str()));
            if let Some(line) = relay_line {
                let lag: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
                assert_eq!(lag, 0.0, "{out}");
                assert!(out.contains("public.items") && out.contains("yes"), "{out}");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_refuses_partitions_and_inheritance_parents_by_name() {
    let db = TestDb::new().await;
    db.exec(
        "create table events(id int, at date, primary key (id, at)) partition by range (at);
         create table events_2026 partition of events for values from ('2026-01-01') to ('2027-01-01');
         create table animals(id int primary key); create table dogs() inherits (animals);
         alter table dogs add primary key (id)",
    )
    .await;
    let (ok, out) = pgrelay(&db, &["install", "events_2026"]);
    assert!(!ok);
    assert!(
        out.contains("public.events_2026 is a partition; expose its partitioned table (events)"),
        "{out}"
    );
    let (ok, out) = pgrelay(&db, &["install", "animals"]);
    assert!(!ok);
    assert!(
        out.contains("public.animals has inheritance children"),
        "{out}"
    );
    // A DEFERRABLE key can hold duplicates between statements: copies kept by key could not
    // stay exact.
    db.exec("create table swaps(id int primary key deferrable initially deferred, v text)")
        .await;
    let (ok, out) = pgrelay(&db, &["install", "swaps"]);
    assert!(!ok);
    assert!(
        out.contains("public.swaps has a DEFERRABLE primary key"),
        "{out}"
    );
    // The partitioned table itself, and an inheritance child, are captured.
    let (ok, out) = pgrelay(&db, &["install", "events", "dogs"]);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_rows_a_relay_has_not_read_and_an_open_transaction_does_not_stop_it() {
    use std::time::Duration;
    let db = TestDb::new().await;
    db.exec("create table items(id serial primary key, n int)")
        .await;
    let relay = Relay::start_with(&db, &["items"], |c| c.install = true).await;
    let mut ws = relay.ws("/ws/items").await;
    let retention = pgrelay::retention::Retention {
        max_age: Some(Duration::from_millis(1)),
        max_rows: None,
        interval: Duration::from_secs(60),
    };
    let url = format!("{} application_name=test_pool", db.url);
    let pool = pgrelay::sql::pool(&url, 1, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
    let token = tokio_util::sync::CancellationToken::new();

    // A transaction left open (here, in this database) does not stop pruning what the relay
    // has read: only its own rows wait for it.
    let open = db.client().await;
    open.batch_execute("begin; insert into items(n) values (0)")
        .await
        .unwrap();
    db.exec("insert into items(n) select g from generate_series(1, 20) g")
        .await;
    ws.events(20).await;
    crate::support::within(crate::support::STEP, async {
        loop {
            pgrelay::retention::prune(&pool, &retention, &token)
                .await
                .unwrap();
            if log_rows(&db).await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // The relay is cut off (its last report is recent: retention waits for it); rows written
    // meanwhile are kept until it has read them.
    let writer = db.client().await;
    drop(pool.get().await.unwrap());
    let admin = crate::support::connect(&crate::support::admin_url()).await;
    let quoted = format!("\"{}\"", db.name);
    admin
        .batch_execute(&format!(
            "alter database {quoted} with allow_connections false"
        ))
        .await
        .unwrap();
    crate::support::terminate_relay_connections(&db).await;
    crate::support::wait_for_metrics(relay.addr, &["pgrelay_capture_listening 0"]).await;
    writer
        .batch_execute("insert into items(n) select g from generate_series(21, 30) g")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    pgrelay::retention::prune(&pool, &retention, &token)
        .await
        .unwrap();
    let kept: i64 = writer
        .query_one(
            "select coalesce(sum(n), 0)::int8 from pgrelay.changes where relid <> 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 10, "rows a live relay has not read are kept");
    admin
        .batch_execute(&format!(
            "alter database {quoted} with allow_connections true"
        ))
        .await
        .unwrap();
    let late = ws.events(10).await;
    assert_eq!(late[0]["data"]["n"], 21);
    open.batch_execute("commit").await.unwrap();
    assert_eq!(
        ws.next_json().await["data"]["n"],
        0,
        "the open transaction's row, at commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_json_lines_per_request_and_socket_naming_the_peer_never_a_token() {
    use tokio::io::AsyncReadExt;
    let db = TestDb::new()
        .await
        .with_tables("create table items(id int primary key)", &["items"])
        .await;
    let port = free_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = relay_process(&db, port, &["--log-format", "json"], true).await;
    crate::support::http_get(addr, "/api/items?apikey=SECRET-TOKEN")
        .await
        .unwrap();
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/items?access_token=SECRET-TOKEN"))
            .await
            .unwrap();
    drop(ws);
    crate::support::signal("TERM", child.id().unwrap() as i32);
    let mut stderr = child.stderr.take().unwrap();
    let mut text = String::new();
    crate::support::within(crate::support::STEP, stderr.read_to_string(&mut text))
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let request = lines
        .iter()
        .find(|l| l["message"] == "request" && l["path"] == "/api/items")
        .unwrap_or_else(|| panic!("no request line: {text}"));
    assert!(request["status"].is_number(), "{request}");
    assert!(
        request.to_string().contains(r#""peer":"127.0.0.1:"#),
        "{request}"
    );
    assert!(
        lines.iter().any(|l| l["message"] == "socket opened"),
        "{text}"
    );
    assert!(!text.contains("SECRET"), "a token was logged: {text}");
    assert!(!text.contains("\u{1b}["), "colour codes in a log: {text}");
}

use crate::support::free_port;

/// The relay binary serving `items` on `port` (its stderr piped when `logs`), waited for.
async fn relay_process(
    db: &TestDb,
    port: u16,
    extra: &[&str],
    logs: bool,
) -> tokio::process::Child {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--tables", "items", "--listen", &addr.to_string()])
        .args(extra)
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "pgrelay=info")
        .stdout(std::process::Stdio::null())
        .stderr(if logs {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::support::within(crate::support::STEP, async {
        while !matches!(
            crate::support::http_get(addr, "/readyz").await,
            Ok((200, _))
        ) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_a_table_across_a_relay_restart_and_stops_on_a_refusal() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::new()
        .await
        .with_tables("create table items(id int primary key, v text)", &["items"])
        .await;
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}");
    let mut relay = relay_process(&db, port, &[], false).await;
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["tail", "--url", &url, "--snapshot", "items"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut next = async || -> serde_json::Value {
        let line = crate::support::within(crate::support::STEP, lines.next_line())
            .await
            .unwrap()
            .unwrap();
        serde_json::from_str(&line).unwrap()
    };
    assert_eq!(next().await["type"], "initial");
    db.exec("insert into items values (1, 'before')").await;
    assert_eq!(next().await["data"]["v"], "before");
    // The relay restarts: tail reconnects, resumes, is told to start over (the new relay
    // cannot vouch for the old position), and gets the table again with what changed.
    relay.kill().await.unwrap();
    db.exec("insert into items values (2, 'while away')").await;
    let _relay = relay_process(&db, port, &[], false).await;
    let mut seen = Vec::new();
    while !seen.iter().any(|m: &serde_json::Value| {
        m["type"] == "initial" && m["data"].as_array().is_some_and(|rows| rows.len() == 2)
    }) {
        seen.push(next().await);
    }
    assert!(seen.iter().any(|m| m["type"] == "reset"), "{seen:?}");
    db.exec("insert into items values (3, 'after')").await;
    assert_eq!(next().await["data"]["v"], "after");
    drop(tail);

    // A refusal is final: the relay's message is printed and the exit status says so.
    let out = crate::support::within(
        crate::support::STEP,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .args(["tail", "--url", &url, "ghosts"])
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("not_found"), "{stdout}");
    assert!(stderr.contains("4004"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_takes_the_relays_url_from_pgrelay_url() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::new()
        .await
        .with_tables("create table items(id int primary key, v text)", &["items"])
        .await;
    db.exec("insert into items values (1, 'there')").await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut tail = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["tail", "--snapshot", "items"])
        .env("PGRELAY_URL", format!("ws://{}", relay.addr))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let line = crate::support::within(crate::support::STEP, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    let initial: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(initial["data"][0]["v"], "there", "{initial}");
}
