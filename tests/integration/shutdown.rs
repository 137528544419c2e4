//! Shutdown: SIGTERM closes every socket with 1001 and the process exits 0.

use std::process::Stdio;
use std::time::Duration;

use crate::support::{Relay, TestDb, Ws, http_get, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_socket_with_1001_and_exits_0() {
    let db = TestDb::new().await;
    db.exec("create table items(id int primary key)").await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args([
            "serve",
            "--tables",
            "items",
            "--install",
            "--listen",
            &listen,
        ])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgrelay");
    let addr = listen.parse().unwrap();
    within(Duration::from_secs(30), async {
        while !matches!(http_get(addr, "/readyz").await, Ok((200, _))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let url = format!("ws://{listen}/ws/items");
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        sockets.push(Ws { socket });
    }
    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    for ws in sockets.iter_mut() {
        assert_eq!(ws.expect_close().await, Some(1001));
    }
    let status = within(Duration::from_secs(10), child.wait()).await.unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_promptly_after_shutdown_with_clients_connected() {
    let db = TestDb::new().await;
    db.exec("create table items(id int primary key)").await;
    let relay = Relay::start_with(&db, &["items"], |c| c.install = true).await;
    let mut ws = relay.ws("/ws/items").await;
    let started = std::time::Instant::now();
    let result = relay.stop().await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(ws.expect_close().await, Some(1001));
}
