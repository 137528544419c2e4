//! RFC 6455 at the edges: opening handshakes that break it are refused with an HTTP status.
//! Raw sockets write the bytes a broken client would.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::support::{Relay, STEP, TestDb, within};

const ITEMS: &str = "create table items(id serial primary key, name text)";
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A raw HTTP response: status, head (lowercased) and body.
struct Head {
    status: u16,
    head: String,
    body: String,
}

/// Writes `request` (head lines, without the final blank line) and reads the response head
/// and its `content-length` body; returns the stream, still open, after them.
async fn send_head(addr: SocketAddr, request: &str) -> (TcpStream, Head) {
    let mut stream = within(STEP, TcpStream::connect(addr)).await.unwrap();
    within(STEP, stream.write_all(format!("{request}\r\n").as_bytes()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = within(STEP, stream.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = buf[end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 1024];
        let n = within(STEP, stream.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "connection closed inside a response body");
        body.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    (stream, Head { status, head, body })
}

/// An upgrade request for `path` with `headers` (`Name: value` lines) after the request line.
fn upgrade_request(path: &str, headers: &[&str]) -> String {
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    for line in headers {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request
}

/// The usual headers of a valid upgrade, minus those named in `without`.
fn valid_headers(addr: SocketAddr, without: &[&str]) -> Vec<String> {
    [
        format!("Host: {addr}"),
        "Connection: Upgrade".to_owned(),
        "Upgrade: websocket".to_owned(),
        "Sec-WebSocket-Version: 13".to_owned(),
        format!("Sec-WebSocket-Key: {KEY}"),
    ]
    .into_iter()
    .filter(|line| !without.iter().any(|name| line.starts_with(name)))
    .collect()
}

/// Completes a real handshake on `path`; returns the socket, ready for frames.
async fn open(addr: SocketAddr, path: &str) -> TcpStream {
    let headers = valid_headers(addr, &[]);
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let (stream, response) = send_head(addr, &upgrade_request(path, &headers)).await;
    assert_eq!(response.status, 101, "{}", response.head);
    let accept = format!(
        "sec-websocket-accept: {}",
        derive_accept_key(KEY.as_bytes())
    );
    assert!(
        response.head.contains(&accept.to_lowercase()),
        "{}",
        response.head
    );
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_break_rfc_6455_are_refused_with_json_errors() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let addr = relay.addr;
    let key = |value: &str| format!("Sec-WebSocket-Key: {value}");
    let bad_requests: Vec<(&str, Vec<String>)> = vec![
        ("key not base64", vec![key("hello")]),
        ("key of 4 bytes", vec![key("AAAAAA==")]),
        ("empty key", vec![key("")]),
        ("key twice", vec![key(KEY), key("AAAAAAAAAAAAAAAAAAAAAA==")]),
        ("no key", vec![]),
    ];
    for path in ["/ws/items", "/ws"] {
        for (case, extra) in &bad_requests {
            let mut headers = valid_headers(addr, &["Sec-WebSocket-Key"]);
            headers.extend(extra.iter().cloned());
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            let (_, response) = send_head(addr, &upgrade_request(path, &headers)).await;
            assert_eq!(response.status, 400, "{path}: {case}: {}", response.head);
            let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
            assert_eq!(body["error"]["code"], "bad_request", "{path}: {case}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("Sec-WebSocket-Key"),
                "{path}: {case}: {body}"
            );
        }

        let headers = valid_headers(addr, &["Host"]);
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (_, response) = send_head(addr, &upgrade_request(path, &headers)).await;
        assert_eq!(response.status, 400, "{path}: no Host: {}", response.head);
        assert!(response.body.contains("Host"), "{}", response.body);

        for version in [Some("8"), Some("14"), None] {
            let mut headers = valid_headers(addr, &["Sec-WebSocket-Version"]);
            headers.extend(version.map(|v| format!("Sec-WebSocket-Version: {v}")));
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            let (_, response) = send_head(addr, &upgrade_request(path, &headers)).await;
            assert_eq!(
                response.status, 426,
                "{path}: {version:?}: {}",
                response.head
            );
            assert!(
                response.head.contains("\r\nsec-websocket-version: 13\r\n"),
                "{}",
                response.head
            );
            let body: serde_json::Value = serde_json::from_str(&response.body).unwrap();
            assert_eq!(body["error"]["code"], "upgrade_required");
        }

        // The same request, valid, is upgraded.
        drop(open(addr, path).await);
    }
}
