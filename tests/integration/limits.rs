//! Every limit trips with its documented error, and what one client takes never stops the
//! relay from serving others (or its health checks).

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Relay, RelayProcess, STEP, TestDb, http, http_get, http_raw, within};

const TABLES: &str = "create table a (id int primary key, name text);
    create table b (id int primary key); create table c (id int primary key);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_messages_and_filters_have_limits() {
    let db = TestDb::new()
        .await
        .with_tables(TABLES, &["a", "b", "c"])
        .await;
    let relay = Relay::start_with(&db, &["a", "b", "c"], |c| {
        c.limits.max_subscriptions = 2;
        c.limits.max_message_rate = 5;
        c.limits.max_in_values = 10;
        c.limits.max_pattern_length = 20;
        c.limits.max_pattern_wildcards = 3;
        c.limits.max_filter_conditions = 2;
    })
    .await;

    // Subscriptions per socket.
    let mut ws = relay.ws("/ws").await;
    for table in ["a", "b"] {
        ws.send_json(json!({"type": "subscribe", "resource": table}))
            .await;
        assert_eq!(ws.next_json().await["type"], "subscribed");
    }
    ws.send_json(json!({"type": "subscribe", "resource": "c"}))
        .await;
    let error = ws.next_json().await;
    assert_eq!(error["code"], "too_many_subscriptions", "{error}");
    // The socket goes on: its subscriptions still stream.
    db.exec("insert into a values (1, 'x')").await;
    assert_eq!(ws.next_json().await["id"], 1);

    // Filters: too many values, conditions, a pattern too long or too wild.
    let in_list = format!(
        "in.({})",
        (0..11).map(|n| n.to_string()).collect::<Vec<_>>().join(",")
    );
    for (key, value, needle) in [
        ("id", in_list.as_str(), "at most 10 values"),
        (
            "name",
            "like.aaaaaaaaaaaaaaaaaaaaaaaaa",
            "at most 20 characters",
        ),
        ("name", "like.*a*b*c*", "at most 3 wildcards"),
    ] {
        let mut sub = relay.ws(&format!("/ws/a?{key}={value}")).await;
        let error = sub.next_json().await;
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{error}"
        );
        assert_eq!(sub.expect_close().await, Some(4400));
        let r = http(relay.addr, "GET", &format!("/api/a?{key}={value}"), None).await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (400, Some("PGRST100")),
            "{key}={value}"
        );
    }
    let r = http(relay.addr, "GET", "/api/a?id=gt.1&id=lt.5&name=eq.x", None).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 conditions")
    );

    // Messages per second: a burst past twice the rate closes the socket with 4029.
    let mut chatty = relay.ws("/ws").await;
    for _ in 0..30 {
        chatty.send_json(json!({"type": "ping"})).await;
    }
    let mut closed = None;
    for _ in 0..31 {
        match within(STEP, chatty.next_frame()).await {
            crate::support::Frame::Json(v) if v["type"] == "pong" => continue,
            crate::support::Frame::Json(v) => assert_eq!(v["code"], "rate_limited", "{v}"),
            crate::support::Frame::Closed(f) => {
                closed = f.map(|f| u16::from(f.code));
                break;
            }
        }
    }
    assert_eq!(closed, Some(4029));
    // Others are not affected.
    db.exec("insert into a values (2, 'y')").await;
    assert_eq!(ws.next_json().await["id"], 2);
}

/// A pattern written to make a backtracking matcher take quadratic time is matched in linear
/// time: an unrelated table's events are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adversarial_pattern_does_not_hold_up_anyone() {
    let db = TestDb::new().await.with_tables(TABLES, &["a", "b"]).await;
    let relay = Relay::start(&db, &["a", "b"]).await;
    let pattern = "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b";
    let mut slow: Vec<_> = Vec::new();
    for _ in 0..2 {
        slow.push(relay.ws(&format!("/ws/a?name=like.{pattern}")).await);
    }
    let mut other = relay.ws("/ws/b").await;
    let long = "a".repeat(200_000);
    let client = db.client().await;
    for id in 0..10 {
        client
            .execute("insert into a values ($1, $2)", &[&id, &long])
            .await
            .unwrap();
    }
    let started = Instant::now();
    db.exec("insert into b values (1)").await;
    assert_eq!(other.next_json().await["id"], 1);
    let delay = started.elapsed();
    assert!(delay < Duration::from_secs(2), "b's event took {delay:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_address_and_in_total_and_health_still_answers() {
    let db = TestDb::new().await.with_tables(TABLES, &["a"]).await;
    let relay = Relay::start_with(&db, &["a"], |c| {
        c.limits.max_connections_per_ip = 5;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(relay.ws("/ws/a").await);
    }
    let (status, body) = http_get(relay.addr, "/api/a").await.unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too_many_connections"), "{body}");
    drop(held.pop());
    within(STEP, async {
        while http_get(relay.addr, "/healthz")
            .await
            .map(|r| r.0)
            .unwrap_or(0)
            != 200
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(held);
    drop(relay);

    let relay = Relay::start_with(&db, &["a"], |c| {
        c.limits.max_connections = 5;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(relay.ws("/ws/a").await);
    }
    // Full: the routes answer 503, the health checks still answer.
    let (status, body) = http_get(relay.addr, "/api/a").await.unwrap();
    assert_eq!(status, 503, "{body}");
    for path in ["/healthz", "/readyz"] {
        let (status, _) = http_get(relay.addr, path).await.unwrap();
        assert_eq!(status, 200, "{path}");
    }
    // The sockets already open keep streaming.
    db.exec("insert into a values (1, 'x')").await;
    for ws in &mut held {
        assert_eq!(ws.next_json().await["id"], 1);
    }
}

/// With fewer file descriptors than connections asked for, the cap is lowered below the
/// limit: the process never runs out, so /healthz and the open sockets keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_stays_below_the_file_descriptor_limit() {
    let db = TestDb::new().await.with_tables(TABLES, &["a"]).await;
    let relay = RelayProcess::start_limited(&db.url, "a", &["--pool-size", "4"], Some(256)).await;
    let mut open = Vec::new();
    for _ in 0..400 {
        match TcpStream::connect(relay.addr).await {
            Ok(s) => open.push(s),
            Err(_) => break,
        }
    }
    assert!(open.len() >= 300, "{}", open.len());
    let (status, _) = within(STEP, http_get(relay.addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// Slowloris: sockets that never finish their headers, and a body that never arrives, are
/// closed after their deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_bodies_are_cut_off() {
    let db = TestDb::new().await.with_tables(TABLES, &["a"]).await;
    let relay = Relay::start_with(&db, &["a"], |c| {
        c.limits.header_timeout = Duration::from_secs(1);
        c.limits.body_timeout = Duration::from_secs(1);
    })
    .await;
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        s.write_all(b"GET /api/a HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // Each is closed (EOF, or a 408) within the deadline and a margin.
    let started = Instant::now();
    for mut s in slow {
        let mut buf = [0u8; 512];
        loop {
            match within(Duration::from_secs(10), s.read(&mut buf)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // A body announced at 100 bytes, of which 8 come.
    let head = format!(
        "POST /api/a HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n",
        relay.addr
    );
    let started = Instant::now();
    let response = within(STEP, http_raw(relay.addr, head, b"{\"id\": 1".to_vec()))
        .await
        .unwrap();
    assert_eq!(response.status, 408, "{}", response.body());
    assert!(started.elapsed() < Duration::from_secs(5));
    let n: i64 = db
        .client()
        .await
        .query_one("select count(*) from a", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// Initial data takes at most `max_snapshots` pooled connections at once, and a reader that
/// stops reading gives its slot back at the deadline; REST keeps working all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_snapshot_readers_cannot_pin_the_pool() {
    let db = TestDb::new().await.with_tables(TABLES, &["a"]).await;
    db.exec("insert into a select n, repeat('x', 200) from generate_series(1, 30000) n")
        .await;
    let relay = Relay::start_with(&db, &["a"], |c| {
        c.limits.max_snapshots = 1;
        c.limits.snapshot_deadline = Duration::from_secs(3);
        c.pool_wait_timeout = Duration::from_secs(1);
    })
    .await;
    // (Timed from before the connection: the deadline runs from the snapshot's start, which
    // a loaded machine can reach before the handshake's answer is read here.)
    let started = Instant::now();
    let mut stalled = crate::support::stalled_client(relay.addr, "/ws/a?snapshot=true").await;
    crate::support::wait_for_metrics(relay.addr, &["pgrelay_snapshots_running 1"]).await;
    let mut second = relay.ws("/ws/a?snapshot=true").await;
    let first = second.next_json().await;
    assert_eq!(first["code"], "unavailable", "{first}");
    assert_eq!(second.expect_close().await, Some(1013));
    // REST is served meanwhile.
    let r = http(relay.addr, "GET", "/api/a/1", None).await;
    assert_eq!(r.status, 200);
    // The stalled reader is closed at the deadline (4008), and its slot is free again. (It
    // reads nothing until then: reading, it might finish its initial data in time.)
    crate::support::wait_for_metrics(relay.addr, &["pgrelay_snapshots_running 0"]).await;
    assert!(started.elapsed() >= Duration::from_secs(3));
    let code = within(STEP, async {
        use futures_util::StreamExt;
        loop {
            match stalled.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                    return f.map(|f| u16::from(f.code));
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await;
    assert!(matches!(code, Some(4008) | None), "{code:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut third = relay.ws("/ws/a?snapshot=true").await;
    let rows = within(STEP, third.initial_rows()).await;
    assert_eq!(rows.len(), 30_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_from_other_origins_are_refused_and_allowed_ones_get_cors() {
    let db = TestDb::new().await.with_tables(TABLES, &["a"]).await;
    let relay = Relay::start_with(&db, &["a"], |c| {
        c.origins.allowed = vec!["https://app.example".into()];
    })
    .await;
    let a = relay.addr;
    let request = |method: &str, path: &str, headers: &str, body: &str| {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n",
            body.len()
        );
        within(STEP, http_raw(a, head, body.as_bytes().to_vec()))
    };
    let upgrade = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    // A page elsewhere cannot open a socket, nor read or write through REST.
    let evil = "Origin: http://evil.example\r\n";
    let r = request("GET", "/ws/a", &format!("{evil}{upgrade}"), "")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body());
    let r = request("GET", "/api/a", evil, "").await.unwrap();
    assert_eq!(r.status, 403);
    let r = request(
        "POST",
        "/api/a",
        &format!("{evil}Content-Type: application/json\r\n"),
        "{\"id\":1}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    // A form post (no preflight) from anywhere: not JSON, refused.
    let r = request(
        "POST",
        "/api/a",
        "Content-Type: text/plain\r\n",
        "{\"id\":2}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 415, "{}", r.body());
    // The configured origin, and the relay's own.
    let app = "Origin: https://app.example\r\n";
    let r = request("OPTIONS", "/api/a", &format!("{app}Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n"), "").await.unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert!(
        r.header("access-control-allow-headers")
            .unwrap()
            .contains("authorization")
    );
    let r = request(
        "POST",
        "/api/a",
        &format!("{app}Content-Type: application/json\r\n"),
        "{\"id\":3}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body());
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let own = format!("Origin: http://{a}\r\n");
    let r = request("GET", "/ws/a", &format!("{own}{upgrade}"), "").await;
    // (The upgrade succeeds: 101, then the socket is dropped by this raw client.)
    assert_eq!(r.map(|r| r.status).unwrap_or(101), 101);
    let n: i64 = db
        .client()
        .await
        .query_one("select count(*) from a", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// One request to `addr` naming `host` in its `Host` header, with extra header lines.
async fn to_host(
    addr: std::net::SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &str,
) -> crate::support::Response {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{headers}Content-Length: 0\r\n"
    );
    within(STEP, http_raw(addr, head, Vec::new()))
        .await
        .unwrap()
}

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// DNS rebinding: a page on evil.example whose name is re-pointed to 127.0.0.1 sends
/// `Host: evil.example:port` and a matching `Origin`, which the same-origin rule accepts. A
/// relay on loopback answers only to loopback names and `allowed_hosts`: 421 otherwise, while
/// health checks answer whatever the Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_loopback_answers_only_to_its_own_names() {
    let db = TestDb::new().await.with_tables(TABLES, &["a"]).await;
    db.exec("insert into a values (1, 'x')").await;
    let relay = Relay::start(&db, &["a"]).await;
    let (a, port) = (relay.addr, relay.addr.port());
    let evil = format!("evil.example:{port}");
    let rebound = format!("Origin: http://{evil}\r\n");
    for (method, path, headers) in [
        ("GET", "/api/a", rebound.clone()),
        ("GET", "/api/a", String::new()),
        ("DELETE", "/api/a/1", rebound.clone()),
        ("GET", "/ws/a", format!("{rebound}{UPGRADE}")),
        ("GET", "/ws", format!("{rebound}{UPGRADE}")),
        ("GET", "/api/nosuch", String::new()),
        ("GET", "/metrics", String::new()),
    ] {
        let r = to_host(a, &evil, method, path, &headers).await;
        assert_eq!(
            (r.status, r.json["code"].as_str()),
            (421, Some("host_not_allowed")),
            "{method} {path}: {}",
            r.body()
        );
        assert!(
            r.json["message"]
                .as_str()
                .unwrap()
                .contains("allowed_hosts")
        );
    }
    for path in ["/healthz", "/readyz"] {
        let r = to_host(a, &evil, "GET", path, "").await;
        assert_eq!(r.status, 200, "{path}: {}", r.body());
    }
    for host in [
        format!("localhost:{port}"),
        format!("LocalHost.:{port}"),
        format!("app.localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "127.0.0.1".to_owned(),
    ] {
        let own = format!("Origin: http://{host}\r\n");
        let r = to_host(a, &host, "GET", "/api/a", &own).await;
        assert_eq!(r.status, 200, "{host}: {}", r.body());
        let r = to_host(a, &host, "GET", "/ws/a", &format!("{own}{UPGRADE}")).await;
        assert_eq!(r.status, 101, "{host}: {}", r.body());
    }
    let n: i64 = db
        .client()
        .await
        .query_one("select count(*) from a", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the rebound DELETE deleted nothing");
    drop(relay);

    // Names of its own are listed; with a port, only on that port.
    let relay = Relay::start_with(&db, &["a"], |c| {
        c.allowed_hosts = vec!["relay.test".into(), format!("pinned.test:1")];
    })
    .await;
    let port = relay.addr.port();
    for (host, status) in [
        (format!("relay.test:{port}"), 200),
        (format!("RELAY.test:{port}"), 200),
        (format!("pinned.test:{port}"), 421),
        (format!("evil.example:{port}"), 421),
    ] {
        let r = to_host(relay.addr, &host, "GET", "/api/a", "").await;
        assert_eq!(r.status, status, "{host}: {}", r.body());
    }
}

/// A relay on another address (in a container, say) is reached under names it cannot know:
/// any Host passes, until `allowed_hosts` names its own (what docker-compose.yml does). The
/// option comes from the flag and the environment, and shows in `--print-config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_listeners_check_hosts_once_they_are_named() {
    let db = TestDb::new().await.with_tables(TABLES, &["a"]).await;
    let serve = |hosts: Vec<String>| {
        let db = &db;
        async move {
            let relay = Relay::spawn_on("0.0.0.0:0", db, &["a"], |c| {
                c.allow_anonymous = true;
                c.allowed_hosts = hosts;
            })
            .await;
            relay.wait_ready().await;
            relay
        }
    };
    let relay = serve(Vec::new()).await;
    for host in ["pgrelay:8080", "evil.example"] {
        let r = to_host(relay.addr, host, "GET", "/api/a", "").await;
        assert_eq!(r.status, 200, "{host}: {}", r.body());
    }
    relay.stop().await.unwrap();

    let relay = serve(vec!["pgrelay".into()]).await;
    for (host, path, status) in [
        ("pgrelay:8080", "/api/a", 200),
        ("127.0.0.1:8080", "/api/a", 200),
        ("evil.example:8080", "/api/a", 421),
        ("evil.example:8080", "/healthz", 200),
        ("pgrelay", "/readyz", 200),
    ] {
        let r = to_host(relay.addr, host, "GET", path, "").await;
        assert_eq!(r.status, status, "{host} {path}: {}", r.body());
    }
    relay.stop().await.unwrap();

    // The flag and the environment; a bad entry is named.
    let print = |args: &[&str], env: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        command
            .arg("serve")
            .args(args)
            .env_remove("PGRELAY_ALLOWED_HOSTS")
            .kill_on_drop(true);
        if let Some(env) = env {
            command.env("PGRELAY_ALLOWED_HOSTS", env);
        }
        async move {
            let out = within(STEP, command.output()).await.unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        }
    };
    let (ok, text) = print(&["--print-config"], None).await;
    assert!(ok && text.contains("allowed_hosts = []"), "{text}");
    let (ok, text) = print(&["--print-config"], Some("relay.test,relay.test:8080")).await;
    assert!(
        ok && text.contains(r#"allowed_hosts = ["relay.test", "relay.test:8080"]"#),
        "{text}"
    );
    let (ok, text) = print(
        &["--tables", "a", "--allowed-hosts", "http://relay.test"],
        None,
    )
    .await;
    assert!(
        !ok && text.contains("allowed_hosts") && text.contains("http://relay.test"),
        "{text}"
    );
}
