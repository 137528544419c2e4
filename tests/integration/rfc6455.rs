//! RFC 6455 at the edges: opening handshakes that break it are refused with an HTTP status,
//! and frames that break it close the socket with the matching code, sent before the TCP
//! connection goes. Raw sockets write the bytes a broken client would.

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

/// One client frame: `first` is the FIN/RSV/opcode byte; masked unless `masked` is false.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![first];
    let bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Writes `bytes` on an open socket, then reads everything the server sends until it closes
/// the connection (a reset fails the test: the close frame must come before it), and returns
/// the code of the close frame found in it.
async fn close_code_after(mut stream: TcpStream, bytes: &[u8]) -> u16 {
    within(STEP, stream.write_all(bytes)).await.unwrap();
    let mut received = Vec::new();
    within(STEP, stream.read_to_end(&mut received))
        .await
        .expect("the server closes the connection cleanly, after its close frame");
    let mut rest = received.as_slice();
    while rest.len() >= 2 {
        let opcode = rest[0] & 0x0f;
        assert_eq!(rest[1] & 0x80, 0, "server frames are not masked");
        let (length, start) = match rest[1] & 0x7f {
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 => panic!("no large server frame expected"),
            n => (n as usize, 2),
        };
        let payload = &rest[start..start + length];
        if opcode == 0x8 {
            assert!(payload.len() >= 2, "the close frame carries a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
        rest = &rest[start + length..];
    }
    panic!("no close frame before the connection closed: {received:?}");
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
            assert_eq!(body["code"], "bad_request", "{path}: {case}");
            assert!(
                body["message"]
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
            assert_eq!(body["code"], "upgrade_required");
        }

        // The same request, valid, is upgraded.
        drop(open(addr, path).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_break_the_protocol_close_with_1002_before_the_connection_drops() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let ping = br#"{"type":"ping"}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked text frame", frame(0x81, ping, false)),
        ("reserved data opcode 0x3", frame(0x83, ping, true)),
        ("reserved control opcode 0xb", frame(0x8b, b"", true)),
        ("rsv1 without an extension", frame(0xc1, ping, true)),
        ("rsv3 without an extension", frame(0x91, ping, true)),
        (
            "continuation with nothing to continue",
            frame(0x80, ping, true),
        ),
        ("fragmented ping", frame(0x09, b"x", true)),
        ("ping over 125 bytes", frame(0x89, &[b'x'; 126], true)),
        (
            "new message inside a fragmented one",
            [frame(0x01, b"{\"type\"", true), frame(0x81, ping, true)].concat(),
        ),
    ];
    for (case, bytes) in cases {
        for path in ["/ws/items", "/ws"] {
            let stream = open(relay.addr, path).await;
            assert_eq!(
                close_code_after(stream, &bytes).await,
                1002,
                "{path}: {case}"
            );
        }
    }
    // The relay goes on serving.
    let mut ws = relay.ws("/ws/items").await;
    db.exec("insert into items(name) values ('after')").await;
    assert_eq!(ws.next_json().await["data"]["name"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_text_message_closes_with_1007() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start(&db, &["items"]).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("one frame", frame(0x81, b"{\"type\":\"\xff\xfe\"}", true)),
        (
            "a code point split over two fragments, then cut short",
            [frame(0x01, b"\"\xe2\x82", true), frame(0x80, b"\"", true)].concat(),
        ),
        ("a lone surrogate", frame(0x81, b"\"\xed\xa0\x80\"", true)),
    ];
    for (case, bytes) in cases {
        let stream = open(relay.addr, "/ws/items").await;
        assert_eq!(close_code_after(stream, &bytes).await, 1007, "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_announced_over_the_limit_closes_with_1009_before_the_connection_drops() {
    let db = TestDb::new().await.with_tables(ITEMS, &["items"]).await;
    let relay = Relay::start_with(&db, &["items"], |c| c.max_client_frame = 1024).await;
    let stream = open(relay.addr, "/ws/items").await;
    // Only the header of a 2 KiB text frame: the relay refuses it before reading the payload.
    let mut header = vec![0x81, 0x80 | 126];
    header.extend_from_slice(&2048u16.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(close_code_after(stream, &header).await, 1009);
}
