//! `pgrelay bench --scenario steady --peer NAME=ws://…`: other WebSocket relays measured in
//! the same run, by the same subscriber code, from the same commits as pgrelay.
//!
//! A peer is any server that pushes each NOTIFY payload of a channel to WebSocket clients
//! (pg_eventserv, FastAPI + broadcaster, PostGraphile's `@pgSubscription`; the apps are in
//! `bench/peers/`). Peers are fed by the steady baseline's table ([`super::BASELINE_TABLE`]),
//! whose bare row-level trigger sends `row_to_json(new)` on the channel of the same name, in
//! the same transaction (one commit) as the row pgrelay streams. Each received message is
//! matched to its transaction by the row id found at a JSON pointer in it, so latency is
//! commit-to-receive for every system alike.
//!
//! Before the writes start, the bench writes probe rows (ids -1, -2, …) to that table until
//! every peer socket has received one: a peer's subscription is live (its LISTEN issued) only
//! some time after its socket opened, and rows written before would count as lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::BASELINE_TABLE;
use super::receive::{Seen, Socket, commit_latencies};
use super::report::{PeerReport, Percentiles};

/// How long a peer may take to answer a handshake message, and to deliver a probe row.
const PEER_WAIT: Duration = Duration::from_secs(30);

/// Pause between probe rows while waiting for the peers' subscriptions.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// One peer: where to connect and how to read what it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Name in the report (`--peer NAME=URL`).
    pub name: String,
    /// WebSocket URL.
    pub url: String,
    /// `Sec-WebSocket-Protocol` to ask for (e.g. `graphql-transport-ws`).
    pub protocol: Option<String>,
    /// Text messages sent after connecting, in order, each after the peer's reply to the
    /// one before (any message): e.g. graphql-ws's `connection_init`, then `subscribe` once
    /// `connection_ack` came.
    pub send: Vec<String>,
    /// JSON pointer (RFC 6901) to the row id in each message; messages without one (acks,
    /// keep-alives) are skipped.
    pub id_pointer: String,
}

/// Splits `NAME=VALUE`.
fn split_named(option: &str, spec: &str) -> anyhow::Result<(String, String)> {
    match spec.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => bail!("{option} takes NAME=VALUE, got {spec:?}"),
    }
}

/// The index of the peer `NAME=VALUE` names, and the value.
fn named_peer(peers: &[Peer], option: &str, spec: &str) -> anyhow::Result<(usize, String)> {
    let (name, value) = split_named(option, spec)?;
    match peers.iter().position(|p| p.name == name) {
        Some(at) => Ok((at, value)),
        None => bail!("{option} {name}=…: no --peer is named {name}"),
    }
}

/// The peers of `--peer NAME=URL` (in order), with the details of `--peer-protocol`,
/// `--peer-send` (in order) and `--peer-id`, each `NAME=VALUE` naming a `--peer`.
pub fn parse(
    urls: &[String],
    protocols: &[String],
    sends: &[String],
    ids: &[String],
) -> anyhow::Result<Vec<Peer>> {
    let mut peers: Vec<Peer> = Vec::new();
    for spec in urls {
        let (name, url) = split_named("--peer", spec)?;
        if peers.iter().any(|p| p.name == name) {
            bail!("--peer {name} is given twice");
        }
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            bail!("--peer {name}: {url:?} is not a ws:// or wss:// URL");
        }
        peers.push(Peer {
            name,
            url,
            protocol: None,
            send: Vec::new(),
            id_pointer: "/id".to_owned(),
        });
    }
    for spec in protocols {
        let (at, protocol) = named_peer(&peers, "--peer-protocol", spec)?;
        peers[at].protocol = Some(protocol);
    }
    for spec in sends {
        let (at, message) = named_peer(&peers, "--peer-send", spec)?;
        peers[at].send.push(message);
    }
    for spec in ids {
        let (at, pointer) = named_peer(&peers, "--peer-id", spec)?;
        if !pointer.is_empty() && !pointer.starts_with('/') {
            bail!("--peer-id: {pointer:?} is not a JSON pointer (e.g. /payload/data/row/id)");
        }
        peers[at].id_pointer = pointer;
    }
    Ok(peers)
}

/// The row id at `pointer` in a peer's message: a JSON integer, or a string holding one
/// (GraphQL sends 64-bit integers as strings). `None` for anything else.
pub(super) fn message_id(text: &str, pointer: &str) -> Option<i64> {
    let message: serde_json::Value = serde_json::from_str(text).ok()?;
    match message.pointer(pointer)? {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Opens a socket to `peer` and sends its handshake messages, each after a reply.
pub(super) async fn connect(peer: &Peer) -> anyhow::Result<Socket> {
    let mut request = peer
        .url
        .as_str()
        .into_client_request()
        .with_context(|| format!("peer {}: bad URL {}", peer.name, peer.url))?;
    if let Some(protocol) = &peer.protocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(protocol)
                .with_context(|| format!("peer {}: bad protocol {protocol:?}", peer.name))?,
        );
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("connecting to peer {} at {}", peer.name, peer.url))?;
    for (n, message) in peer.send.iter().enumerate() {
        if n > 0 {
            await_reply(&mut socket, &peer.name).await?;
        }
        socket
            .send(Message::text(message.as_str()))
            .await
            .with_context(|| format!("sending to peer {}", peer.name))?;
    }
    Ok(socket)
}

/// Waits for the next data message from a peer (control frames are skipped).
async fn await_reply(socket: &mut Socket, name: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PEER_WAIT;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => bail!("peer {name} did not answer a handshake message within 30 s"),
            Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) => return Ok(()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                bail!("peer {name} closed the socket during the handshake: {frame:?}")
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(err))) => {
                return Err(err).with_context(|| format!("peer {name} during the handshake"));
            }
            Ok(None) => bail!("peer {name} ended the connection during the handshake"),
        }
    }
}

/// Writes probe rows (ids -1, -2, …) to the baseline table until every socket in `live`
/// (peer name, set by its reader on a probe) has received one.
pub(super) async fn await_live(
    client: &tokio_postgres::Client,
    live: &[(String, Arc<AtomicBool>)],
) -> anyhow::Result<()> {
    if live.is_empty() {
        // No peers: no baseline table to probe through either.
        return Ok(());
    }
    let insert = client
        .prepare(&format!(
            "insert into {BASELINE_TABLE}(id, payload) values ($1, 'probe')"
        ))
        .await?;
    let deadline = Instant::now() + PEER_WAIT;
    let mut id = 0i64;
    loop {
        let waiting: Vec<&str> = live
            .iter()
            .filter(|(_, got)| !got.load(Ordering::Acquire))
            .map(|(name, _)| name.as_str())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no probe row reached peer(s) {} within 30 s: does each LISTEN on channel \
                 {BASELINE_TABLE}, and does --peer-id point at the row id?",
                waiting.join(", ")
            );
        }
        id -= 1;
        client.execute(&insert, &[&id]).await?;
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// What `peer`'s sockets saw, against the rows `1..=rows` committed at `commits`.
pub(super) fn summarize(
    peer: &Peer,
    seen: &[Seen],
    sockets: usize,
    rows: u64,
    commits: &[Instant],
    warm: impl Fn(usize) -> bool + Copy,
) -> PeerReport {
    let mut report = PeerReport {
        name: peer.name.clone(),
        url: peer.url.clone(),
        ..PeerReport::default()
    };
    let mut latencies = Vec::new();
    for s in seen {
        report.frames_received += s.frames;
        report.closed += u64::from(s.closed);
        for id in 1..=rows as usize {
            match s.counts.get(id).copied().unwrap_or(0) {
                0 => report.lost += 1,
                1 => {}
                _ => report.duplicated += 1,
            }
        }
        latencies.extend(commit_latencies(&s.arrivals, commits, warm));
    }
    // A socket whose task failed saw nothing.
    report.lost += sockets.saturating_sub(seen.len()) as u64 * rows;
    report.latency_ms = Percentiles::of(latencies);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn peers_collect_their_details_by_name_in_order() {
        let peers = parse(
            &strings(&["gql=ws://127.0.0.1:5000/graphql", "plain=ws://h/ws/c?a=b"]),
            &strings(&["gql=graphql-transport-ws"]),
            &strings(&[
                r#"gql={"type":"connection_init"}"#,
                r#"gql={"id":"1","type":"subscribe"}"#,
            ]),
            &strings(&["gql=/payload/data/row/id"]),
        )
        .unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].protocol.as_deref(), Some("graphql-transport-ws"));
        assert_eq!(
            peers[0].send,
            [
                r#"{"type":"connection_init"}"#,
                r#"{"id":"1","type":"subscribe"}"#
            ]
        );
        assert_eq!(peers[0].id_pointer, "/payload/data/row/id");
        // The URL keeps its own `=`; the defaults hold for the other peer.
        assert_eq!(peers[1].url, "ws://h/ws/c?a=b");
        assert_eq!(
            (peers[1].protocol.clone(), peers[1].id_pointer.as_str()),
            (None, "/id")
        );
        assert!(peers[1].send.is_empty());
    }

    #[test]
    fn bad_peer_options_are_refused_with_the_reason() {
        let err = |urls: &[&str], sends: &[&str], ids: &[&str]| {
            parse(&strings(urls), &[], &strings(sends), &strings(ids))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&["ws://h/x"], &[], &[]).contains("NAME=VALUE"));
        assert!(err(&["a=http://h/x"], &[], &[]).contains("not a ws://"));
        assert!(err(&["a=ws://h/x", "a=ws://h/y"], &[], &[]).contains("twice"));
        assert!(err(&["a=ws://h/x"], &["b={}"], &[]).contains("no --peer is named b"));
        assert!(err(&["a=ws://h/x"], &[], &["a=id"]).contains("JSON pointer"));
    }

    #[test]
    fn message_ids_are_found_at_the_pointer_as_numbers_or_strings() {
        let graphql =
            r#"{"id":"1","type":"next","payload":{"data":{"row":{"id":"42","payload":"x"}}}}"#;
        assert_eq!(message_id(graphql, "/payload/data/row/id"), Some(42));
        assert_eq!(message_id(r#"{"id":7,"payload":"x"}"#, "/id"), Some(7));
        assert_eq!(
            message_id(r#"{"id":-3,"payload":"probe"}"#, "/id"),
            Some(-3)
        );
        // Acks, keep-alives and non-JSON have no id.
        assert_eq!(message_id(r#"{"type":"ka"}"#, "/payload/data/row/id"), None);
        assert_eq!(message_id("not json", "/id"), None);
        assert_eq!(message_id(r#"{"id":1.5}"#, "/id"), None);
    }
}
