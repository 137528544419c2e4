//! Server-Sent Events: `GET /sse/{table}`, a table's changes as a `text/event-stream`, for
//! networks and tools that do not speak WebSocket (an `EventSource` in a browser, `curl -N`).
//!
//! A stream is a `/ws/{table}` subscription that cannot send messages: the same query keys,
//! checks, policies, cursor, snapshot handoff and slow-consumer rules (the code is
//! `http::ws`'s), and every message is exactly the JSON text the WebSocket would send, as the
//! `data:` of an unnamed event (so `onmessage` gets them all). What SSE adds:
//! - `id:` is the message's `seq` (a `batch`'s last one; the last `initial` message's
//!   position), so the `Last-Event-ID` a browser sends when it reconnects resumes right after
//!   it. The header acts as `since`, and wins over a `since` in the URL (it is newer).
//! - A `reset` is sent as on WebSocket and the stream stays open. With `snapshot=true`, fresh
//!   initial rows follow it on the same stream (a WebSocket client asks for them with a
//!   subscribe message; an `EventSource` cannot). The relay never ends a stream because of a
//!   reset, so a reset cannot make a client reconnect, let alone loop.
//! - A stream that ends for a reason (slow consumer, shutdown, token expiry, a filter column
//!   changed) ends with an `error` message saying why; the `EventSource` then reconnects with
//!   `Last-Event-ID` (or gives up on the 401/4xx it gets). `subscription_ended` clears the
//!   event id first, so that reconnect starts afresh instead of replaying the change that
//!   ended the subscription.
//! - The heartbeat is a comment line (`: ping`) every ping interval: it keeps proxies from
//!   timing the stream out, and a write to a peer that is gone ends the stream.
//!
//! The stream is written by a task of the tracker into a small bounded channel that is the
//! response body, so a client that stops reading stalls that task exactly as a WebSocket that
//! stops reading stalls its socket's.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::Sink;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::PollSender;
use warp::http::HeaderValue;
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use warp::{Filter, Rejection, Reply};

use super::ws::{self, End, Refusal, Subscription, close};
use super::{ApiError, AppState, token_header, with_state};
use crate::access::{AuthError, Principal};
use crate::event::control;
use crate::row::Fields;
use crate::snapshot::Upkeep;
use crate::subscription::Params;

/// What a stream without a token is told: where an SSE request's token may come from.
pub const TOKEN_MISSING: &str = "Authentication required: send the token in an \
     Authorization: Bearer or apikey header, or as ?access_token= (an EventSource cannot set \
     headers)";

/// Chunks of events the body may hold that the client has not taken (besides the one kept for
/// the last message). Small: what the client has not read waits in the shared history, as it
/// does for a WebSocket.
const QUEUE_CHUNKS: usize = 4;

/// Events are gathered into chunks of about this many bytes before they go to the body (a
/// batch of events is flushed whatever its size).
const CHUNK_BYTES: usize = 32 * 1024;

/// The reconnection delay each stream announces (`retry:`) is drawn from this range, so that
/// the clients of a relay that restarts do not all come back in the same instant.
const RETRY_MS: std::ops::RangeInclusive<u64> = 2000..=4000;

/// GET /sse/{table}?snapshot=true&select=id,name&events=create&price=gt.10
/// (`Last-Event-ID: 41` resumes after seq 41)
pub fn route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("sse" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(token_header())
        .and(warp::header::optional::<String>("last-event-id"))
        .and_then(open)
}

/// Checks a stream's token, keys and table (refusals are HTTP statuses with a JSON body),
/// places its cursor, and starts its task; the response streams what the task writes.
async fn open(
    resource: String,
    state: Arc<AppState>,
    pairs: Vec<(String, String)>,
    header_token: Option<String>,
    last_event_id: Option<String>,
) -> Result<warp::reply::Response, Rejection> {
    let resource = ws::decode(&resource);
    let (pairs, query_token) = ws::take_token(pairs);
    let token = header_token.or(query_token);
    let principal = state.gate.principal(token.as_deref()).map_err(|err| {
        let mut refusal = Refusal::unauthorized(&err);
        if matches!(err, AuthError::Missing) {
            refusal.message = TOKEN_MISSING.to_owned();
        }
        refusal.into_rejection()
    })?;
    let mut params = Params::from_pairs(&pairs)
        .map_err(|message| warp::reject::custom(ApiError::bad_request(message)))?;
    if let Some(id) = last_event_id
        .as_deref()
        .map(str::trim)
        .filter(|id| !id.is_empty())
    {
        // Sent by the browser on every reconnect: newer than any `since` in the URL.
        let seq = id.parse().map_err(|_| {
            warp::reject::custom(ApiError::bad_request(format!(
                "Last-Event-ID must be an event id (a seq), not {id:?}"
            )))
        })?;
        params.since = Some(seq);
    }
    let ready = ws::prepare(&state, &resource, &params, &principal)
        .await
        .map_err(Refusal::into_rejection)?;
    let Some(topic) = state.hub.topic(&ready.table.resource) else {
        return Err(warp::reject::custom(ApiError::not_found(format!(
            "Table {resource:?} is not exposed by this relay"
        ))));
    };
    // From here on every event published is this stream's (a resume's cursor is placed in
    // the history instead).
    let (cursor, reset) = ws::open_cursor(&state, &topic, params.since).await;
    let sub = Subscription::new(ready.table, ready.access, cursor, params, ready.shape);

    let (chunks_tx, mut chunks_rx) = mpsc::channel::<Bytes>(QUEUE_CHUNKS + 2);
    // The first chunk goes out with the headers: how long the client waits to reconnect. A
    // fresh channel has room for it and for the place kept for the last message (were either
    // refused, the stream would go on without a `retry:`, or send its last message like the
    // rest).
    let retry = rand::random_range(RETRY_MS);
    let _ = chunks_tx.try_send(Bytes::from(format!("retry: {retry}\n\n")));
    let last = chunks_tx.clone().try_reserve_owned().ok();
    let stream = Stream {
        out: Out {
            chunks: PollSender::new(chunks_tx),
            last,
            buf: BytesMut::new(),
            saw_reset: false,
            told: false,
        },
        deadline: principal.expires_in().map(|d| Instant::now() + d),
        next_ping: Instant::now() + state.config.ping_interval,
        principal,
        sub,
        state: Arc::clone(&state),
    };
    // In the span of the connection it came on (its peer): the stream's log lines say who.
    state
        .tracker
        .spawn(tracing::Instrument::in_current_span(stream.run(reset)));

    let body = futures_util::stream::poll_fn(move |cx| {
        chunks_rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(Ok::<_, std::convert::Infallible>))
    });
    let mut response = warp::reply::stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx would otherwise buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One stream's task: the subscription, and the body it writes.
struct Stream {
    out: Out,
    state: Arc<AppState>,
    sub: Subscription,
    /// When the token expires (the stream then ends with `token_expired`).
    deadline: Option<Instant>,
    /// When the next `: ping` comment is due.
    next_ping: Instant,
    /// Who the stream is for (for the log, and for what it may see of a table that changed
    /// under it).
    principal: Principal,
}

impl Stream {
    #[tracing::instrument(name = "sse", skip_all, fields(table = %self.sub.table.resource))]
    async fn run(mut self, reset: bool) {
        let opened = Instant::now();
        tracing::info!("stream opened");
        let end = match self.serve(reset).await {
            Ok(end) | Err(end) => end,
        };
        let (role, secs) = (&self.principal.role, opened.elapsed().as_secs_f64());
        match end {
            End::Close(code, reason) => {
                tracing::info!(code, reason, role, secs, "stream closed");
                if code == close::SLOW_CONSUMER {
                    self.state.metrics.inc(&self.state.metrics.slow_consumers);
                }
                if !self.out.told {
                    self.out.finish(&control::error(error_code(code), reason));
                }
            }
            End::Gone => tracing::info!(role, secs, "stream closed by the client"),
        }
        // Dropping `self.out` ends the body once the client has taken what it holds.
    }

    async fn serve(&mut self, reset: bool) -> Result<End, End> {
        if reset {
            let resource = self.sub.table.resource.clone();
            self.send(control::reset(&resource, "history_unavailable"))
                .await?;
        }
        let params = &self.sub.params;
        if params.snapshot && (params.since.is_none() || reset) {
            self.initial().await?;
        }
        // (The opening reset is answered.)
        self.out.saw_reset = false;
        let ping_interval = self.state.config.ping_interval;
        let token = self.state.token.clone();
        loop {
            let deadline = self.deadline;
            tokio::select! {
                // priority 1: shutdown
                biased;
                _ = token.cancelled() => return Ok(End::Close(close::GOING_AWAY, "server shutting down")),
                // priority 2: the token ran out
                _ = ws::sleep_until_some(deadline) => return Err(self.expired().await),
                // The client hung up (the body is dropped): end now, not at the next write.
                () = self.out.gone() => return Err(End::Gone),
                // priority 3: heartbeat
                _ = tokio::time::sleep_until(self.next_ping) => {
                    ws::send_to(&mut self.out, &self.state, Message::Ping(Default::default())).await?;
                    self.next_ping = Instant::now() + ping_interval;
                }
                // priority 4: events
                (_, result) = ws::next_batch(std::slice::from_mut(&mut self.sub), 0) => {
                    result.map_err(ws::overflow_end)?;
                    if let Some(reason) = ws::write_events(&mut self.out, &mut self.sub, &self.state, Some(&self.principal)).await? {
                        let resource = self.sub.table.resource.clone();
                        self.send(control::resource_error(&resource, "subscription_ended", &reason)).await?;
                        return Err(End::Close(close::BAD_REQUEST, "subscription ended"));
                    }
                    // The client's copy is stale: with `snapshot=true` it gets a fresh one.
                    if std::mem::take(&mut self.out.saw_reset) && self.sub.params.snapshot {
                        self.initial().await?;
                    }
                }
            }
        }
    }

    /// Sends the initial rows (comments keep the stream alive while they go out).
    async fn initial(&mut self) -> Result<(), End> {
        let state = Arc::clone(&self.state);
        // The table as it is now (it may have been dropped, or its columns changed).
        let Some(table) = state.table(&self.sub.table.resource) else {
            let resource = self.sub.table.resource.clone();
            let m = format!("Table {resource:?} is not exposed by this relay");
            self.send(control::resource_error(&resource, "not_found", &m))
                .await?;
            return Err(End::Close(close::NOT_FOUND, "table not exposed"));
        };
        let ping_interval = state.config.ping_interval;
        let mut next_ping = self.next_ping;
        let mut upkeep = move || {
            if Instant::now() >= next_ping {
                next_ping = Instant::now() + ping_interval;
                Upkeep::Ping
            } else {
                Upkeep::Nothing
            }
        };
        ws::send_initial(&state, &mut self.sub, &table, &mut self.out, &mut upkeep).await
    }

    /// The token ran out: the client is told, and reconnects with a new one.
    async fn expired(&mut self) -> End {
        let message = "The token has expired; reconnect with a new one";
        if let Err(end) = self.send(control::error("token_expired", message)).await {
            return end;
        }
        End::Close(close::UNAUTHORIZED, "token expired")
    }

    async fn send(&mut self, text: String) -> Result<(), End> {
        ws::send_to(&mut self.out, &self.state, Message::text(text)).await
    }
}

/// The `error` code of the message that ends a stream for a reason not told yet.
fn error_code(close: u16) -> &'static str {
    match close {
        close::SLOW_CONSUMER => "slow_consumer",
        close::GOING_AWAY => "shutting_down",
        _ => "closed",
    }
}

/// The body's writing end, as a sink of WebSocket messages (so the WebSocket's writers serve
/// SSE unchanged): a text message becomes an event, a ping a `: ping` comment. Events are
/// gathered into chunks; a flush hands the chunk to the body.
struct Out {
    chunks: PollSender<Bytes>,
    /// A place in the body kept for the message that ends the stream, which must get there
    /// even when a client that stopped reading has filled the rest.
    last: Option<mpsc::OwnedPermit<Bytes>>,
    /// Events not yet handed to the body.
    buf: BytesMut,
    /// A `reset` was written since the stream last looked.
    saw_reset: bool,
    /// An `error` was written: the client knows why the stream ends.
    told: bool,
}

impl Out {
    /// Resolves once the body is dropped: the client is gone.
    async fn gone(&self) {
        match self.chunks.get_ref() {
            Some(sender) => sender.closed().await,
            None => std::future::pending().await,
        }
    }

    /// Hands the gathered events to the body.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(self.chunks.poll_reserve(cx)).map_err(|_| WsError::ConnectionClosed)?;
        let chunk = self.buf.split().freeze();
        self.chunks
            .send_item(chunk)
            .map_err(|_| WsError::ConnectionClosed)?;
        Poll::Ready(Ok(()))
    }

    /// Writes the last message (with anything gathered before it) into the kept place.
    fn finish(&mut self, text: &str) {
        push_event(&mut self.buf, text);
        let chunk = self.buf.split().freeze();
        match self.last.take() {
            Some(permit) => {
                permit.send(chunk);
            }
            None => {
                if let Some(sender) = self.chunks.get_ref() {
                    let _ = sender.try_send(chunk);
                }
            }
        }
    }
}

impl Sink<Message> for Out {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        if this.buf.len() >= CHUNK_BYTES {
            return this.poll_send(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        let this = self.get_mut();
        match message {
            Message::Text(text) => match push_event(&mut this.buf, text.as_str()) {
                Kind::Reset => this.saw_reset = true,
                Kind::Error => this.told = true,
                Kind::Other => {}
            },
            Message::Ping(_) => this.buf.extend_from_slice(b": ping\n\n"),
            _ => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().poll_send(cx)
    }
}

/// What a message written to the stream was, as far as the stream cares.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Reset,
    Error,
    Other,
}

/// What an event does to the client's last event id.
#[derive(Debug, PartialEq, Eq)]
enum Id {
    /// Sets it to this seq.
    Set(i64),
    /// Empties it (a reconnect then starts afresh).
    Clear,
    /// Leaves it.
    Keep,
}

/// Appends a message as one event: its `id:` line, if it has one, then its `data:` lines
/// (JSON text holds a raw line break only as whitespace; each line is a `data:` line, which
/// the client joins with `\n` again).
fn push_event(buf: &mut BytesMut, text: &str) -> Kind {
    let (kind, id) = read_head(text);
    match id {
        Id::Set(seq) => {
            buf.extend_from_slice(b"id: ");
            buf.extend_from_slice(seq.to_string().as_bytes());
            buf.extend_from_slice(b"\n");
        }
        Id::Clear => buf.extend_from_slice(b"id:\n"),
        Id::Keep => {}
    }
    let lines = text
        .split('\n')
        .flat_map(|line| line.strip_suffix('\r').unwrap_or(line).split('\r'));
    for line in lines {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\n");
    }
    buf.extend_from_slice(b"\n");
    kind
}

/// A message's kind and event id, read from its top-level fields (values are skipped, not
/// parsed). `initial` messages carry their position, but only the last one (`"done":true`)
/// is a place to resume from: a client that reconnects in the middle of initial data needs
/// all of it again.
fn read_head(text: &str) -> (Kind, Id) {
    let Ok(fields) = Fields::parse(text) else {
        return (Kind::Other, Id::Keep);
    };
    let get = |name: &str| fields.get(name).map(RawValue::get);
    let seq_of = |raw: Option<&str>| raw.and_then(|s| s.parse::<i64>().ok());
    let set = |seq: Option<i64>| seq.map_or(Id::Keep, Id::Set);
    match get("type") {
        Some(r#""reset""#) => (Kind::Reset, Id::Keep),
        Some(r#""error""#) if get("code") == Some(r#""subscription_ended""#) => {
            (Kind::Error, Id::Clear)
        }
        Some(r#""error""#) => (Kind::Error, Id::Keep),
        Some(r#""batch""#) => {
            let last = get("events")
                .and_then(|events| serde_json::from_str::<Vec<&RawValue>>(events).ok())
                .and_then(|events| events.last().copied())
                .and_then(|event| Fields::parse(event.get()).ok())
                .and_then(|event| seq_of(event.get("seq").map(RawValue::get)));
            (Kind::Other, set(last))
        }
        Some(r#""initial""#) if get("done") != Some("true") => (Kind::Other, Id::Keep),
        _ => (Kind::Other, set(seq_of(get("seq")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str) -> (String, Kind) {
        let mut buf = BytesMut::new();
        let kind = push_event(&mut buf, text);
        (String::from_utf8(buf.to_vec()).unwrap(), kind)
    }

    #[test]
    fn messages_become_events_whose_id_is_the_position_to_resume_from() {
        let create = r#"{"type":"create","resource":"items","id":1,"data":{"id":1,"seq":7},"seq":41,"ts":"t"}"#;
        assert_eq!(
            event(create),
            (format!("id: 41\ndata: {create}\n\n"), Kind::Other)
        );
        let truncate = control::truncate("items", 44, "t");
        assert_eq!(event(&truncate).0, format!("id: 44\ndata: {truncate}\n\n"));
        let batch = r#"{"type":"batch","resource":"items","events":[{"type":"create","seq":5},{"type":"delete","seq":3}]}"#;
        assert_eq!(event(batch).0, format!("id: 3\ndata: {batch}\n\n"));
        // Only the last initial message is a place to resume from.
        let rows = ["{\"id\":1}".to_owned()];
        let part = control::initial("items", &rows, false, Some(9));
        assert_eq!(event(&part).0, format!("data: {part}\n\n"));
        let done = control::initial("items", &rows, true, Some(9));
        assert_eq!(event(&done).0, format!("id: 9\ndata: {done}\n\n"));
        let fresh = control::initial("items", &rows, true, None);
        assert_eq!(event(&fresh).0, format!("data: {fresh}\n\n"));
    }

    #[test]
    fn a_reset_keeps_the_id_and_an_ended_subscription_clears_it() {
        let reset = control::reset("items", "history_unavailable");
        assert_eq!(event(&reset), (format!("data: {reset}\n\n"), Kind::Reset));
        let ended = control::resource_error("items", "subscription_ended", "Column dropped");
        assert_eq!(
            event(&ended),
            (format!("id:\ndata: {ended}\n\n"), Kind::Error)
        );
        let slow = control::error("slow_consumer", "slow consumer");
        assert_eq!(event(&slow), (format!("data: {slow}\n\n"), Kind::Error));
    }

    #[test]
    fn line_breaks_in_the_json_become_data_lines() {
        let text = "{\"type\":\"initial\",\r\n\"data\":[{\"j\":\n{}}],\r\"done\":true}";
        assert_eq!(
            event(text).0,
            "data: {\"type\":\"initial\",\ndata: \"data\":[{\"j\":\ndata: {}}],\ndata: \"done\":true}\n\n"
        );
    }

    #[test]
    fn text_that_is_not_an_object_still_goes_out_without_an_id() {
        assert_eq!(event("[1]").0, "data: [1]\n\n");
    }
}
