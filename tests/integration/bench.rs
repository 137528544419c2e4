//! `pgrelay bench --scenario writes`, run as the binary: every variant writes, the bench's
//! databases are dropped, and a lock timeout is counted where it struck.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::NoTls;

use crate::support::{TestDb, connect, within};

/// How long a short writes bench may take, databases created and dropped (four variants
/// per workload, on a busy machine).
const BENCH: Duration = Duration::from_secs(180);

/// Starts `pgrelay bench --scenario writes --json --runs 1 ARGS` with `db` as its admin
/// database.
fn start_bench(db: &TestDb, args: &[&str]) -> tokio::process::Child {
    let mut all = vec!["--scenario", "writes", "--runs", "1"];
    all.extend_from_slice(args);
    start_bench_with(db, &all)
}

/// Starts `pgrelay bench --json ARGS` with `db` as its database.
fn start_bench_with(db: &TestDb, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["bench", "--json"])
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove("RUST_LOG")
        .env_remove("PGRELAY_BENCH_TRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgrelay bench")
}

/// The report the bench printed, after checking it succeeded.
fn report(output: std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The bench's own databases (named after its pid) still on the server.
async fn leftover_databases(db: &TestDb, pid: u32) -> Vec<String> {
    connect(&db.url)
        .await
        .query(
            "select datname::text from pg_database where starts_with(datname, $1)",
            &[&format!("pgrelay_bench_{pid}_")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn the_writes_bench_measures_every_variant_and_drops_its_databases() {
    let db = TestDb::new().await;
    let child = start_bench(
        &db,
        &[
            "--writers",
            "2",
            "--duration",
            "1",
            "--workload",
            "insert,bulk1000",
        ],
    );
    let pid = child.id().unwrap();
    let report = report(within(BENCH, child.wait_with_output()).await.unwrap());
    let rows = report["rows"].as_array().unwrap();
    let measured: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["workload"].as_str().unwrap(),
                r["variant"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        measured,
        [
            ("insert", "none"),
            ("insert", "bare"),
            ("insert", "notify"),
            ("insert", "poll"),
            ("bulk1000", "none"),
            ("bulk1000", "bare"),
            ("bulk1000", "notify"),
            ("bulk1000", "poll"),
        ]
    );
    for row in rows {
        assert!(row["median_tps"].as_f64().unwrap() > 0.0, "{row}");
        let writers = if row["workload"] == "insert" { 2 } else { 1 };
        assert_eq!(row["writers"], writers, "{row}");
    }
    // Each row's ratio to itself is 1.
    assert_eq!(rows[0]["vs_none"].as_f64(), Some(1.0));
    assert_eq!(rows[1]["vs_bare"].as_f64(), Some(1.0));
    // A relay followed the table in the pgrelay variants only; its CPU time is reported.
    assert_eq!(report["relay"], true);
    for row in rows {
        let pgrelay = row["variant"] == "notify" || row["variant"] == "poll";
        assert_eq!(row["relay_cpu_us_per_tx"].is_number(), pgrelay, "{row}");
    }
    // Capture logged one event per row written, in both modes, and the relay captured them.
    assert_eq!(report["warnings"], serde_json::json!([]));
    assert_eq!(leftover_databases(&db, pid).await, Vec::<String>::new());
}

/// A session on one of the bench's databases; `locked` once it holds the table's lock.
struct Holder {
    client: tokio_postgres::Client,
    locked: bool,
}

/// Takes an EXCLUSIVE lock on the bench table of each of the bench's databases, once its
/// writers are writing (rows are there: setup, which takes the table's locks itself, is
/// over), and holds it until the bench drops the database. One session per database, so
/// that the bench's DROP DATABASE is not raced by new connections.
async fn lock_tables_while_written(db: &TestDb, pid: u32, holders: &mut HashMap<String, Holder>) {
    for name in leftover_databases(db, pid).await {
        if !holders.contains_key(&name) {
            let mut config: tokio_postgres::Config = db.url.parse().unwrap();
            config.dbname(&name);
            // The database may be gone already: nothing to lock then.
            let Ok((client, connection)) = config.connect(NoTls).await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = connection.await;
            });
            holders.insert(
                name.clone(),
                Holder {
                    client,
                    locked: false,
                },
            );
        }
        let Some(holder) = holders.get_mut(&name).filter(|h| !h.locked) else {
            continue;
        };
        // Fails while the table is not there yet: try again next time.
        let written = holder
            .client
            .query_one("select exists (select from bench_items)", &[])
            .await
            .is_ok_and(|r| r.get::<_, bool>(0));
        if written {
            holder.locked = holder
                .client
                .batch_execute("begin; lock table bench_items in exclusive mode")
                .await
                .is_ok();
        }
    }
}

#[tokio::test]
async fn a_writer_stopped_by_a_lock_on_the_table_is_counted_as_cancelled_in_the_write() {
    let db = TestDb::new().await;
    let child = start_bench(
        &db,
        &["--writers", "2", "--duration", "5", "--lock-timeout", "1ms"],
    );
    let pid = child.id().unwrap();
    let mut holders = HashMap::new();
    let output = within(BENCH, async {
        let wait = child.wait_with_output();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                output = &mut wait => break output.unwrap(),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    lock_tables_while_written(&db, pid, &mut holders).await;
                }
            }
        }
    })
    .await;
    let report = report(output);
    assert_eq!(report["lock_timeout"], "1ms");
    for row in report["rows"].as_array().unwrap() {
        let cancelled = &row["cancelled"];
        let total: u64 = ["write", "trigger", "commit"]
            .iter()
            .map(|k| cancelled[k].as_u64().unwrap())
            .sum();
        // Every writer was stopped: by the table lock, or (NOTIFY's commit-time lock) at
        // COMMIT before the lock was taken; none inside pgrelay's functions, which wait.
        assert_eq!(row["clients"], 2, "{row}");
        assert_eq!(total, 2, "{row}");
        assert_eq!(cancelled["trigger"], 0, "{row}");
        if row["variant"] == "none" || row["variant"] == "poll" {
            assert_eq!(cancelled["write"], 2, "{row}");
        }
    }
    let locked = holders.values().filter(|h| h.locked).count();
    assert!(locked >= 2, "the test locked {locked} tables");
    assert_eq!(leftover_databases(&db, pid).await, Vec::<String>::new());
}

#[tokio::test]
async fn the_delivery_benches_run_without_a_baseline_or_peers() {
    let db = TestDb::new().await;
    for args in [
        &["--scenario", "burst", "--rows", "2000"][..],
        &["--scenario", "steady", "--rate", "200", "--duration", "1"],
        &[
            "--scenario",
            "fanout",
            "--duration",
            "1",
            "--subscribers",
            "2",
        ],
    ] {
        let child = start_bench_with(&db, args);
        let report = report(within(BENCH, child.wait_with_output()).await.unwrap());
        assert_eq!(report["lost"], 0, "{args:?}: {report}");
        assert!(
            report["rows_written"].as_u64() > Some(0),
            "{args:?}: {report}"
        );
    }
}

#[tokio::test]
async fn the_steady_bench_measures_its_baseline_in_the_same_transactions() {
    let db = TestDb::new().await;
    let child = start_bench_with(
        &db,
        &[
            "--scenario",
            "steady",
            "--baseline",
            "--subscribers",
            "2",
            "--rate",
            "200",
            "--duration",
            "2",
        ],
    );
    let report = report(within(BENCH, child.wait_with_output()).await.unwrap());
    assert_eq!(report["rows_written"], 400, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["baseline_lost"], 0, "{report}");
    for field in ["latency_ms", "first_latency_ms", "baseline_latency_ms"] {
        assert!(report[field]["p99"].is_number(), "{field}: {report}");
    }
    // Its table is dropped with the bench's own.
    let left: Option<String> = connect(&db.url)
        .await
        .query_one("select to_regclass('pgrelay_bench_baseline')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, None);
}

/// What the mock peer saw of one connection.
#[derive(Debug, Default, Clone)]
struct PeerConnection {
    path: String,
    /// The `Sec-WebSocket-Protocol` asked for.
    protocol: Option<String>,
    /// Text messages received before streaming, and whether each came before the reply to
    /// the one before it.
    handshake: Vec<(String, bool)>,
}

/// A WebSocket server shaped like the bench's peers: each connection LISTENs on
/// `pgrelay_bench_baseline` and forwards every payload. On `/plain/…` as sent (like
/// pg_eventserv or broadcaster); on `/graphql` after a graphql-ws-like handshake
/// (`connection_init` answered with `connection_ack` after a pause, then `subscribe`),
/// wrapped as `{"type":"next","payload":{"data":{"row":PAYLOAD}}}` (like PostGraphile).
async fn start_mock_peer(
    db_url: String,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<PeerConnection>>>,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let connections = std::sync::Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let db_url = db_url.clone();
            let log = std::sync::Arc::clone(&connections);
            tokio::spawn(async move {
                let mut seen = PeerConnection::default();
                // The error type is tungstenite's callback contract, not ours to shrink.
                #[allow(clippy::result_large_err)]
                let accept = |request: &Request, mut response: Response| {
                    seen.path = request.uri().path().to_owned();
                    seen.protocol = request
                        .headers()
                        .get("sec-websocket-protocol")
                        .map(|p| p.to_str().unwrap().to_owned());
                    if let Some(p) = request.headers().get("sec-websocket-protocol") {
                        response
                            .headers_mut()
                            .insert("sec-websocket-protocol", p.clone());
                    }
                    Ok::<_, ErrorResponse>(response)
                };
                let mut socket = tokio_tungstenite::accept_hdr_async(stream, accept)
                    .await
                    .unwrap();
                let graphql = seen.path == "/graphql";
                if graphql {
                    let text = |m: Option<Result<Message, _>>| match m {
                        Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
                        other => panic!("mock peer expected a text message, got {other:?}"),
                    };
                    let init = text(socket.next().await);
                    // Anything arriving before the ack came too early.
                    let early = tokio::time::timeout(Duration::from_millis(300), socket.next())
                        .await
                        .ok()
                        .map(text);
                    seen.handshake.push((init, false));
                    socket
                        .send(Message::text(r#"{"type":"connection_ack"}"#))
                        .await
                        .unwrap();
                    let subscribe = match early {
                        Some(message) => (message, true),
                        None => (text(socket.next().await), false),
                    };
                    seen.handshake.push(subscribe);
                }
                log.lock().unwrap().push(seen);
                let (client, mut connection) =
                    tokio_postgres::connect(&db_url, NoTls).await.unwrap();
                let (payload_tx, mut payload_rx) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(Ok(message)) =
                        futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        if let tokio_postgres::AsyncMessage::Notification(n) = message
                            && payload_tx.send(n.payload().to_owned()).is_err()
                        {
                            break;
                        }
                    }
                });
                client
                    .batch_execute("listen pgrelay_bench_baseline")
                    .await
                    .unwrap();
                loop {
                    tokio::select! {
                        payload = payload_rx.recv() => {
                            let Some(payload) = payload else { break };
                            let message = match graphql {
                                true => format!(
                                    r#"{{"id":"s1","type":"next","payload":{{"data":{{"row":{payload}}}}}}}"#
                                ),
                                false => payload,
                            };
                            if socket.send(Message::text(message)).await.is_err() {
                                break;
                            }
                        }
                        incoming = socket.next() => {
                            if !matches!(incoming, Some(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, log)
}

#[tokio::test]
async fn the_steady_bench_measures_peers_with_the_same_client_in_the_same_run() {
    let db = TestDb::new().await;
    let (addr, connections) = start_mock_peer(db.url.clone()).await;
    let plain = format!("plain=ws://{addr}/plain/pgrelay_bench_baseline");
    let graphql = format!("gql=ws://{addr}/graphql");
    let child = start_bench_with(
        &db,
        &[
            "--scenario",
            "steady",
            "--subscribers",
            "2",
            "--rate",
            "200",
            "--duration",
            "2",
            "--peer",
            &plain,
            "--peer",
            &graphql,
            "--peer-protocol",
            "gql=graphql-transport-ws",
            "--peer-send",
            r#"gql={"type":"connection_init"}"#,
            "--peer-send",
            r#"gql={"id":"s1","type":"subscribe"}"#,
            "--peer-id",
            "gql=/payload/data/row/id",
        ],
    );
    let report = report(within(BENCH, child.wait_with_output()).await.unwrap());
    assert_eq!(report["rows_written"], 400, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    // Peers are fed by the baseline's trigger: the LISTEN baseline is measured too.
    assert_eq!(report["baseline_lost"], 0, "{report}");
    let peers = report["peers"].as_array().unwrap();
    let names: Vec<&str> = peers.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["plain", "gql"]);
    for peer in peers {
        // Every row once at each of its 2 sockets; the probe rows are not counted.
        assert_eq!(peer["lost"], 0, "{peer}");
        assert_eq!(peer["duplicated"], 0, "{peer}");
        assert_eq!(peer["closed"], 0, "{peer}");
        assert_eq!(peer["frames_received"], 800, "{peer}");
        for q in ["p50", "p90", "p99", "max"] {
            assert!(peer["latency_ms"][q].as_f64().unwrap() >= 0.0, "{peer}");
        }
    }
    let connections = connections.lock().unwrap().clone();
    let plain: Vec<_> = connections
        .iter()
        .filter(|c| c.path != "/graphql")
        .collect();
    let graphql: Vec<_> = connections
        .iter()
        .filter(|c| c.path == "/graphql")
        .collect();
    assert_eq!((plain.len(), graphql.len()), (2, 2), "{connections:?}");
    assert!(
        plain
            .iter()
            .all(|c| c.protocol.is_none() && c.handshake.is_empty())
    );
    for c in graphql {
        assert_eq!(c.protocol.as_deref(), Some("graphql-transport-ws"));
        // Sent in order, the second only after the reply to the first.
        assert_eq!(
            c.handshake,
            [
                (r#"{"type":"connection_init"}"#.to_owned(), false),
                (r#"{"id":"s1","type":"subscribe"}"#.to_owned(), false),
            ]
        );
    }
}

#[tokio::test]
async fn a_peer_that_cannot_be_reached_fails_the_steady_bench_naming_it() {
    let db = TestDb::new().await;
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let peer = format!("gone=ws://127.0.0.1:{port}/ws");
    let child = start_bench_with(
        &db,
        &["--scenario", "steady", "--duration", "1", "--peer", &peer],
    );
    let output = within(BENCH, child.wait_with_output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("connecting to peer gone"), "{stderr}");
}
