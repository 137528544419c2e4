//! `GET /ws/{table}`: upgrade, then one task per socket that streams the table's events.
//!
//! The socket task is a `select!` over shutdown, client frames, the heartbeat and the hub
//! cursor. The cursor is created before the upgrade completes, so every event published
//! after the client sees `101 Switching Protocols` reaches it. Writes are batched: up to
//! [`WRITE_BATCH`] frames are fed, then flushed once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::{Instant, MissedTickBehavior};
use warp::ws::{Message, WebSocket, Ws};
use warp::{Filter, Rejection, Reply};

use super::{ApiError, AppState, with_state};
use crate::event::control;
use crate::hub::{Cursor, Entry, Overflow, Topic};
use crate::snapshot::{self, Snapshot};
use crate::sql::TableInfo;

/// Most frames fed to the socket before one flush.
const WRITE_BATCH: usize = 256;

/// How long a close frame may take to go out before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Close codes (DESIGN.md).
mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const INTERNAL: u16 = 1011;
    pub const TOO_BIG: u16 = 1009;
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// Options of one subscription, from the query string or a subscribe message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    /// Send the initial rows first (with `since`: only if the resume is impossible).
    pub snapshot: bool,
    /// Resume after this event's seq.
    pub since: Option<i64>,
}

impl Params {
    /// Parses query-string pairs; unknown keys are an error, not silently ignored.
    pub fn from_query(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut params = Params::default();
        for (key, value) in pairs {
            match key.as_str() {
                "snapshot" => params.snapshot = parse_bool(key, value)?,
                "since" => {
                    let seq = value
                        .parse()
                        .map_err(|_| format!("since must be an event seq, not {value:?}"))?;
                    params.since = Some(seq);
                }
                other => return Err(format!("Unknown query parameter {other:?}")),
            }
        }
        Ok(params)
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "1" | "" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{key} must be true or false, not {value:?}")),
    }
}

/// Where a subscription starts reading: at the head, or just after the `since` event. The
/// flag is true when `since` is not in the retained history (the client must get a `reset`).
fn open_cursor(topic: &Arc<Topic>, since: Option<i64>) -> (Cursor, bool) {
    match since {
        None => (topic.subscribe(), false),
        Some(seq) => match topic.subscribe_after_seq(seq) {
            Some(cursor) => (cursor, false),
            None => (topic.subscribe(), true),
        },
    }
}

/// GET /ws/{table}?snapshot=true&since=41
pub fn route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("ws" / String)
        .and(warp::get())
        .and(with_state(state))
        .and_then(|resource: String, state: Arc<AppState>| async move {
            match state.tables.get(&resource) {
                Some(table) => Ok((table.clone(), state)),
                None => Err(warp::reject::custom(ApiError::not_found(format!(
                    "Table {resource:?} is not exposed by this relay"
                )))),
            }
        })
        .untuple_one()
        .and(warp::query::<Vec<(String, String)>>().and_then(
            |pairs: Vec<(String, String)>| async move {
                Params::from_query(&pairs)
                    .map_err(|m| warp::reject::custom(ApiError::bad_request(m)))
            },
        ))
        .and(warp::ws())
        .map(
            |table: TableInfo, state: Arc<AppState>, params: Params, ws: Ws| {
                // Subscribe before the upgrade reply goes out: events from now on are ours.
                let topic = state
                    .hub
                    .topic(&table.resource)
                    .expect("every exposed table has a topic");
                let (cursor, reset) = open_cursor(topic, params.since);
                let limit = state.config.max_client_frame;
                let guard = state.tracker.token();
                ws.max_message_size(limit).max_frame_size(limit).on_upgrade(
                    move |socket| async move {
                        let session = Session::new(socket, state, table, cursor);
                        session.run(params, reset).await;
                        drop(guard);
                    },
                )
            },
        )
}

/// Why a socket loop ended, and how to close it.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The peer is gone or the socket failed: nothing more to send.
    Gone,
}

struct Session {
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
    state: Arc<AppState>,
    table: TableInfo,
    cursor: Cursor,
    /// Events whose transaction this snapshot contains were in the initial data: drop them.
    seen_in: Option<Snapshot>,
}

impl Session {
    fn new(socket: WebSocket, state: Arc<AppState>, table: TableInfo, cursor: Cursor) -> Self {
        let (sink, stream) = socket.split();
        state.metrics.add(&state.metrics.ws_connections, 1);
        Session {
            sink,
            stream,
            state,
            table,
            cursor,
            seen_in: None,
        }
    }

    #[tracing::instrument(name = "ws", skip_all, fields(table = %self.table.resource))]
    async fn run(mut self, params: Params, reset: bool) {
        let end = match self.serve(params, reset).await {
            Ok(end) | Err(end) => end,
        };
        if let End::Close(code, reason) = end {
            if code == close::SLOW_CONSUMER {
                self.state.metrics.inc(&self.state.metrics.slow_consumers);
            }
            // Send Close, then wait briefly for the peer's Close so the handshake completes
            // (dropping at once can reset the connection before the peer reads our frame).
            let frame = Message::close_with(code, reason);
            let stream = &mut self.stream;
            let sink = &mut self.sink;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                if sink.send(frame).await.is_ok() {
                    while let Some(Ok(message)) = stream.next().await {
                        if message.is_close() {
                            break;
                        }
                    }
                }
            })
            .await;
        }
        tracing::debug!("socket closed");
    }

    async fn serve(&mut self, params: Params, reset: bool) -> Result<End, End> {
        self.start(&params, reset).await?;
        let config = &self.state.config;
        let (ping_interval, ping_timeout) = (config.ping_interval, config.ping_timeout);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut batch: Vec<Arc<Entry>> = Vec::with_capacity(WRITE_BATCH);
        let token = self.state.token.clone();
        loop {
            tokio::select! {
                // priority 1: shutdown
                biased;
                _ = token.cancelled() => return Ok(End::Close(close::GOING_AWAY, "server shutting down")),
                // priority 2: what the client says
                frame = self.stream.next() => {
                    last_heard = Instant::now();
                    self.on_client_frame(frame).await?;
                }
                // priority 3: heartbeat
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() >= ping_timeout {
                        return Ok(End::Close(close::NORMAL, "heartbeat timeout"));
                    }
                    self.sink.send(Message::ping(Vec::new())).await.map_err(|_| End::Gone)?;
                }
                // priority 4: events
                result = self.cursor.next_batch(&mut batch, WRITE_BATCH) => {
                    result.map_err(overflow_end)?;
                    self.write_events(&mut batch).await?;
                }
            }
        }
    }

    /// Feeds the batch's frames (minus those the initial data already holds), then flushes
    /// once; gives up with 4008 when the cursor overflows while the socket is slow.
    async fn write_events(&mut self, batch: &mut Vec<Arc<Entry>>) -> Result<(), End> {
        let seen_in = self.seen_in.as_ref();
        let sink = &mut self.sink;
        let metrics = &self.state.metrics;
        let write = async {
            let mut sent = 0u64;
            for entry in batch.iter() {
                if seen_in.is_some_and(|s| s.contains(entry.event.xid)) {
                    continue;
                }
                // One copy of the shared frame per socket: warp's text messages own a String.
                sink.feed(Message::text(entry.frame.clone())).await?;
                sent += 1;
            }
            sink.flush().await?;
            metrics.add(&metrics.frames_sent, sent);
            Ok::<_, warp::Error>(())
        };
        let token = &self.state.token;
        let result = {
            tokio::pin!(write);
            tokio::select! {
            biased;
            overflow = self.cursor.overflowed() => Err(overflow_end(overflow)),
            written = &mut write => written.map_err(|_| End::Gone),
            _ = token.cancelled() => {
                // Shutting down: give the frames in flight a moment to go out, then close.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut write).await;
                                Err(End::Close(close::GOING_AWAY, "server shutting down"))
            }
            }
        };
        batch.clear();
        result
    }

    async fn on_client_frame(
        &mut self,
        frame: Option<Result<Message, warp::Error>>,
    ) -> Result<(), End> {
        let message = match frame {
            None => return Err(End::Gone),
            Some(Err(err)) => {
                return Err(if is_too_big(&err) {
                    End::Close(close::TOO_BIG, "frame too large")
                } else {
                    End::Gone
                });
            }
            Some(Ok(message)) => message,
        };
        if message.is_close() {
            return Err(End::Close(close::NORMAL, ""));
        }
        if message.is_ping() || message.is_pong() {
            return Ok(());
        }
        let Ok(text) = message.to_str() else {
            return self
                .send_error("bad_request", "Messages must be JSON text frames")
                .await;
        };
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return self
                .send_error("bad_request", "Message is not valid JSON")
                .await;
        };
        match value.get("type").and_then(Value::as_str) {
            Some("ping") => self.send_text(control::pong()).await,
            Some("subscribe") => {
                let pairs = match message_params(&value) {
                    Ok(pairs) => pairs,
                    Err(m) => return self.send_error("bad_request", &m).await,
                };
                let params = match Params::from_query(&pairs) {
                    Ok(params) => params,
                    Err(m) => return self.send_error("bad_request", &m).await,
                };
                if params.since.is_some() {
                    let (cursor, reset) = open_cursor(self.cursor.topic(), params.since);
                    self.cursor = cursor;
                    self.seen_in = None;
                    self.start(&params, reset).await
                } else {
                    self.send_initial().await
                }
            }
            Some(other) => {
                let m = format!("Unknown message type {other:?} (expected subscribe or ping)");
                self.send_error("bad_request", &m).await
            }
            None => {
                self.send_error("bad_request", "Message has no string \"type\"")
                    .await
            }
        }
    }

    /// What a subscription sends first: a `reset` when its `since` is not in the history,
    /// then the initial rows if asked for (with `since`, only after a reset).
    async fn start(&mut self, params: &Params, reset: bool) -> Result<(), End> {
        if reset {
            let message = control::reset(&self.table.resource, "history_unavailable");
            self.send_text(message).await?;
        }
        if params.snapshot && (params.since.is_none() || reset) {
            self.send_initial().await?;
        }
        Ok(())
    }

    /// Sends the initial rows and from then on drops events the snapshot contains.
    async fn send_initial(&mut self) -> Result<(), End> {
        let state = &self.state;
        let batch_rows = state.config.snapshot_batch_rows;
        match snapshot::send_initial(&state.pool, &self.table, batch_rows, &mut self.sink).await {
            Ok(snapshot) => {
                self.seen_in = Some(snapshot);
                Ok(())
            }
            Err(snapshot::SnapshotError::Socket(_)) => Err(End::Gone),
            Err(err) => {
                tracing::error!(error = %crate::error::chain(&err), "initial data failed");
                let _ = self
                    .send_text(control::error("internal", "Initial data could not be read"))
                    .await;
                Err(End::Close(close::INTERNAL, "initial data failed"))
            }
        }
    }

    async fn send_error(&mut self, code: &str, message: &str) -> Result<(), End> {
        self.send_text(control::error(code, message)).await
    }

    async fn send_text(&mut self, text: String) -> Result<(), End> {
        self.sink
            .send(Message::text(text))
            .await
            .map_err(|_| End::Gone)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.state.metrics.dec(&self.state.metrics.ws_connections);
    }
}

fn overflow_end(overflow: Overflow) -> End {
    match overflow {
        Overflow::Lagged | Overflow::Evicted => End::Close(close::SLOW_CONSUMER, "slow consumer"),
        Overflow::Closed => End::Close(close::GOING_AWAY, "server shutting down"),
    }
}

/// The query keys carried by a subscribe message, as string pairs.
fn message_params(value: &Value) -> Result<Vec<(String, String)>, String> {
    let Some(object) = value.as_object() else {
        return Err("Message must be a JSON object".into());
    };
    let mut pairs = Vec::new();
    for (key, v) in object {
        if key == "type" {
            continue;
        }
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Bool(_) | Value::Number(_) => v.to_string(),
            _ => return Err(format!("{key} must be a string, number or boolean")),
        };
        pairs.push((key.clone(), text));
    }
    Ok(pairs)
}

fn is_too_big(err: &warp::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let source = std::error::Error::source(err);
    matches!(
        source.and_then(|s| s.downcast_ref::<WsError>()),
        Some(WsError::Capacity(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_accept_snapshot_and_reject_unknown_keys() {
        let q = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Params::from_query(&pairs)
        };
        assert_eq!(q(&[]), Ok(Params::default()));
        assert_eq!(
            q(&[("snapshot", "true")]),
            Ok(Params {
                snapshot: true,
                since: None
            })
        );
        assert_eq!(
            q(&[("since", "41")]),
            Ok(Params {
                snapshot: false,
                since: Some(41)
            })
        );
        assert!(q(&[("since", "x")]).is_err());
        assert!(q(&[("snapshot", "maybe")]).is_err());
        assert!(q(&[("bogus", "1")]).unwrap_err().contains("bogus"));
    }

    #[test]
    fn subscribe_message_keys_become_pairs() {
        let pairs = message_params(&json!({"type": "subscribe", "snapshot": true})).unwrap();
        assert_eq!(pairs, vec![("snapshot".to_string(), "true".to_string())]);
        assert!(message_params(&json!({"type": "subscribe", "x": [1]})).is_err());
    }
}
