//! The WebSocket protocol around the events: errors, ping, heartbeat, limits.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Frame, Relay, STEP, TestDb, http_get, within};

const ITEMS: &str = "create table items(id serial primary key, name text)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_or_unexposed_table_is_a_json_404_or_a_4004_after_the_upgrade() {
    let db = TestDb::new()
        .await
        .with_tables(
            "create table items(id int primary key); create table secret(id int primary key)",
            &["items", "secret"],
        )
        .await;
    let relay = Relay::start(&db, &["items"]).await;
    for path in ["/ws/nope", "/ws/secret", "/ws/public.items"] {
        let (status, body) = http_get(relay.addr, path).await.unwrap();
        assert_eq!(status, 404, "{path}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["code"], "not_found", "{path}");
        assert!(body["message"].as_str().unwrap().contains("not exposed"));
        // An upgrade request is upgraded and told why (browsers cannot read a refused
        // handshake's status): an error message, then 4004.
        let mut ws = relay.ws(path).await;
        let error = ws.next_json().await;
        assert_eq!(error["type"], "error", "{path}: {error}");
        assert_eq!(error["code"], "not_found", "{path}: {error}");
        assert_eq!(ws.expect_close().await, Some(4004), "{path}");
    }
    let (status, body) = http_get(relay.addr, "/ws/items?bogus=1").await.unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("bogus"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_an_error_and_the_connection_keeps_working() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let mut ws = relay.ws("/ws/items").await;
    let bad = [
        "not json",
        "[1,2]",
        r#"{"no":"type"}"#,
        r#"{"type":"dance"}"#,
        r#"{"type":"subscribe","bogus":1}"#,
        r#"{"type":"subscribe","snapshot":[true]}"#,
    ];
    for text in bad {
        ws.send_text(text).await;
        let reply = ws.next_json().await;
        assert_eq!(reply["type"], "error", "{text} -> {reply}");
        assert_eq!(reply["code"], "bad_request");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    within(
        crate::support::STEP,
        ws.socket.send(Message::binary(vec![1, 2, 3])),
    )
    .await
    .unwrap();
    assert_eq!(ws.next_json().await["type"], "error");

    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_json().await, json!({"type": "pong"}));
    db.exec("insert into items(name) values ('still here')")
        .await;
    assert_eq!(ws.next_json().await["data"]["name"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_limit_closes_with_1009() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| c.max_client_frame = 1024).await;
    let mut ws = relay.ws("/ws/items").await;
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(4096));
    ws.send_text(&big).await;
    assert_eq!(ws.expect_close().await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_pings_and_closes_a_peer_that_stays_silent() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| {
        c.ping_interval = Duration::from_millis(200);
        c.ping_timeout = Duration::from_millis(800);
    })
    .await;

    // A client that keeps reading answers the pings (the client library does) and stays,
    // while a client that reads nothing (so answers nothing) past the timeout is closed.
    let mut live = relay.ws("/ws/items").await;
    let mut silent = relay.ws("/ws/items").await;
    let keep_reading = async {
        use futures_util::StreamExt;
        let mut pings = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(2000);
        loop {
            match tokio::time::timeout_at(deadline, live.socket.next()).await {
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => break,
            }
        }
        pings
    };
    let stay_silent = async {
        tokio::time::sleep(Duration::from_millis(1200)).await; // the fault: stay silent
        match within(crate::support::STEP, silent.next_frame()).await {
            Frame::Closed(f) => f.map(|f| u16::from(f.code)),
            Frame::Json(v) => panic!("unexpected {v}"),
        }
    };
    let (pings, code) = tokio::join!(keep_reading, stay_silent);
    assert!(pings >= 5, "server pinged {pings} times");
    assert_eq!(code, Some(1000));

    live.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        live.next_json().await,
        json!({"type": "pong"}),
        "the reading client is still open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_are_served() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    assert_eq!(http_get(relay.addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(relay.addr, "/readyz").await.unwrap().0, 200);
    let (status, body) = http_get(relay.addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("pgrelay_capture_listening 1"), "{body}");
    let (status, body) = http_get(relay.addr, "/nope").await.unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_initial_is_kept_alive_by_pings_and_the_socket_lives_on_after_it() {
    use futures_util::StreamExt;
    let db = TestDb::new()
        .await
        .with_tables("create table big(id int primary key, pad text)", &["big"])
        .await;
    db.exec("insert into big select g, repeat('x', 1000) from generate_series(1, 16000) g")
        .await;
    let relay = Relay::start_with(&db, &["big"], |c| {
        c.ping_interval = Duration::from_secs(1);
        c.ping_timeout = Duration::from_secs(3);
        c.snapshot_batch_rows = 100;
    })
    .await;
    // A client with a small receive buffer that reads slowly: 16 MB of initial data take
    // longer than the ping timeout to go out. It answers pings as it reads them.
    let mut ws = crate::support::stalled_client(relay.addr, "/ws").await;
    ws.send(Message::text(
        r#"{"type":"subscribe","resource":"big","snapshot":true}"#,
    ))
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut rows = 0;
    let mut pings = 0;
    within(Duration::from_secs(60), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == "initial" {
                        rows += v["data"].as_array().unwrap().len();
                        if v["done"] == true {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                }
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                other => panic!("socket ended during the initial data: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(rows, 16000);
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "the initial took longer than the ping timeout"
    );
    assert!(
        pings >= 2,
        "pings went out while the initial streamed ({pings})"
    );
    // Still alive well past the timeout, and streaming.
    let idle = std::time::Instant::now();
    within(Duration::from_secs(20), async {
        while idle.elapsed() < Duration::from_secs(4) {
            match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) | Ok(Some(Ok(Message::Ping(_)))) => {}
                other => panic!("closed after the initial: {other:?}"),
            }
        }
    })
    .await;
    db.exec("insert into big values (0, 'live')").await;
    let event = within(STEP, async {
        loop {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                return serde_json::from_str::<Value>(t.as_str()).unwrap();
            }
        }
    })
    .await;
    assert_eq!(event["data"]["pad"], "live");
}
