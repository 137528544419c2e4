//! Supabase Realtime's protocol: `GET /realtime/v1/websocket?apikey=…&vsn=2.0.0`, Phoenix
//! Channels carrying `postgres_changes`, so that supabase-js's
//! `.channel(…).on('postgres_changes', …).subscribe(…)` works unchanged against the relay.
//!
//! A channel's `phx_join` names its bindings (`{event, schema, table, filter}`); each binding
//! is a `/ws/{table}` subscription without initial data (the code is `http::ws`'s: the same
//! checks, policies, filters, cursor and slow-consumer rules), whose change frames are written
//! through `Translate`, which turns each into the `postgres_changes` message realtime-js
//! parses. What the protocol adds:
//! - Both serializers: `vsn=1.0.0` (JSON objects) and `vsn=2.0.0` (JSON arrays
//!   `[join_ref, ref, topic, event, payload]`), chosen by the query parameter.
//! - The join reply (which realtime-js reports as `SUBSCRIBED`) is sent only once every
//!   binding's cursor is placed, so no write committed after `SUBSCRIBED` is missed; then the
//!   `system` message Supabase sends ("Subscribed to PostgreSQL").
//! - A join that cannot be served (unknown table, bad filter, bad token) is answered with
//!   `status: "error"` and a `reason`, which realtime-js reports as `CHANNEL_ERROR`.
//! - When a binding's copy goes stale (a `reset`: history lost, table dropped or changed),
//!   the channel gets `phx_error`: realtime-js reports `CHANNEL_ERROR` and joins again.
//! - Resume (pgrelay's addition): bindings that carry `since` (realtime-js sends the binding
//!   objects as they are when it joins again, so an application can keep a position in them)
//!   are sent `system` `Position` messages once the client has every event up to a newer
//!   point, and a join whose bindings all hold one resumes from it: with every event after
//!   it once on the relay that sent it (events that reached the client after its last
//!   position come again), at least once elsewhere, or not at all (`resumed: false`: the
//!   client reads its rows again).
//! - The token: the join's `access_token` (else the socket's `apikey`/`access_token`
//!   parameter or header) names the channel's caller; an `access_token` message refreshes it;
//!   a channel whose token expires (or whose new token grants other access) is told with a
//!   `system` error and closed (`phx_close`).
//!
//! Broadcast and Presence are not offered: their messages are answered with an error.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::SplitSink;
use futures_util::{Sink, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use warp::{Filter, Rejection, Reply};

use super::ws::{self, Bucket, End, FramesRx, Heard, Subscription, WebSocket, close};
use super::{ApiError, AppState, token_header, with_state};
use crate::access::{AuthError, Principal};
use crate::event::{Op, resource_name};
use crate::filter;
use crate::hub::Resume;
use crate::subscription::{EventType, Params};

/// The Phoenix serializer a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vsn {
    /// `{"topic","event","payload","ref","join_ref"}` objects.
    V1,
    /// `[join_ref, ref, topic, event, payload]` arrays.
    V2,
}

impl Vsn {
    /// The `vsn` query parameter (Phoenix's default, 1.0.0, when there is none).
    fn from_param(value: Option<&str>) -> Option<Vsn> {
        match value {
            None | Some("1.0.0") => Some(Vsn::V1),
            Some("2.0.0") => Some(Vsn::V2),
            Some(_) => None,
        }
    }

    /// Reads a client's text frame.
    fn decode(self, text: &str) -> Option<Frame> {
        match self {
            Vsn::V1 => {
                #[derive(Deserialize)]
                struct Object {
                    topic: String,
                    event: String,
                    #[serde(default)]
                    payload: Value,
                    #[serde(default, rename = "ref")]
                    reference: Value,
                    #[serde(default)]
                    join_ref: Value,
                }
                let o: Object = serde_json::from_str(text).ok()?;
                Some(Frame {
                    join_ref: reference_of(o.join_ref),
                    reference: reference_of(o.reference),
                    topic: o.topic,
                    event: o.event,
                    payload: o.payload,
                })
            }
            Vsn::V2 => {
                let (join_ref, reference, topic, event, payload): (
                    Value,
                    Value,
                    String,
                    String,
                    Value,
                ) = serde_json::from_str(text).ok()?;
                Some(Frame {
                    join_ref: reference_of(join_ref),
                    reference: reference_of(reference),
                    topic,
                    event,
                    payload,
                })
            }
        }
    }

    /// Encodes a message; `payload` is JSON text.
    fn encode(
        self,
        join_ref: Option<&str>,
        reference: Option<&str>,
        topic: &str,
        event: &str,
        payload: &str,
    ) -> String {
        let string = |s: Option<&str>| Value::from(s).to_string();
        let (join_ref, reference) = (string(join_ref), string(reference));
        let (topic, event) = (string(Some(topic)), string(Some(event)));
        match self {
            Vsn::V1 => format!(
                r#"{{"topic":{topic},"event":{event},"payload":{payload},"ref":{reference},"join_ref":{join_ref}}}"#
            ),
            Vsn::V2 => format!("[{join_ref},{reference},{topic},{event},{payload}]"),
        }
    }
}

/// A ref as the client sent it (a string, or a number some clients send), `None` for null.
fn reference_of(value: Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A Phoenix message from the client.
#[derive(Debug)]
struct Frame {
    join_ref: Option<String>,
    reference: Option<String>,
    topic: String,
    event: String,
    payload: Value,
}

/// GET /realtime/v1/websocket?apikey=…&vsn=2.0.0
pub fn route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("realtime" / "v1" / "websocket")
        .and(warp::get())
        .and(with_state(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(token_header())
        .and_then(
            |state: Arc<AppState>,
             pairs: Vec<(String, String)>,
             header_token: Option<String>| async move {
                let vsn = pairs.iter().find(|(k, _)| k == "vsn").map(|(_, v)| v.as_str());
                let Some(vsn) = Vsn::from_param(vsn) else {
                    return Err(warp::reject::custom(ApiError::bad_request(
                        "vsn must be 1.0.0 or 2.0.0",
                    )));
                };
                let (_, query_token) = ws::take_token(pairs);
                Ok::<_, Rejection>((state, vsn, header_token.or(query_token)))
            },
        )
        .untuple_one()
        .and(ws::handshake())
        .map(
            |state: Arc<AppState>, vsn: Vsn, token: Option<String>, handshake: ws::Handshake| {
                let session_state = Arc::clone(&state);
                ws::accept(handshake, state, move |socket| async move {
                    Session::new(socket, session_state, vsn, token).run().await;
                })
            },
        )
}

/// Where a subscription's messages go: its channel and binding.
struct Route {
    /// The channel's topic (`realtime:…`).
    topic: Arc<str>,
    /// The channel's join ref, sent with every message of the channel.
    join_ref: Option<Arc<str>>,
    /// The binding's id, as the join reply gave it (realtime-js matches `ids` against it).
    id: u64,
    /// The table's schema and name as JSON strings.
    schema_json: String,
    table_json: String,
    /// `[{"name","type"}]` of the columns the caller sees.
    columns_json: String,
    /// A `reset` went out as `phx_error`: the channel is over (its client joins again).
    stale: bool,
}

/// A joined channel.
struct Channel {
    topic: Arc<str>,
    join_ref: Option<Arc<str>>,
    /// Who the channel acts for.
    principal: Principal,
    /// When its token expires.
    deadline: Option<Instant>,
    /// The join's bindings carry `since`: the client keeps a position, and is sent one
    /// (a `system` message) whenever it has every event up to a newer one.
    positions: bool,
    /// The batch of the last position sent.
    last_position: Option<u64>,
    /// Events were written that no position sent covers yet (their batch was still open, or
    /// another binding was behind): a position is looked for again when a batch ends.
    pending: bool,
}

struct Session {
    sink: SplitSink<WebSocket, Message>,
    frames_rx: FramesRx,
    reader: tokio::task::JoinHandle<()>,
    heard: Arc<Heard>,
    next_ping: Instant,
    state: Arc<AppState>,
    vsn: Vsn,
    /// The token the socket came with (`apikey`, `access_token`, or a header): a channel's
    /// caller when its join carries none.
    token: Option<String>,
    channels: Vec<Channel>,
    /// Every binding's subscription, and beside it (same index) where its messages go.
    subs: Vec<Subscription>,
    routes: Vec<Route>,
    next_first: usize,
    /// The id the next binding gets.
    next_id: u64,
    bucket: Bucket,
    /// Since when the socket holds no channel: one that has none must come with a token that
    /// authenticates, or it is closed after the auth timeout (heartbeats do not keep it).
    alone_since: Option<Instant>,
    /// Batch ends, waited on while a channel's position is pending.
    ended_rx: tokio::sync::watch::Receiver<u64>,
}

impl Session {
    fn new(socket: WebSocket, state: Arc<AppState>, vsn: Vsn, token: Option<String>) -> Self {
        let (sink, stream) = socket.split();
        let (frames_rx, reader, heard) = ws::spawn_reader(stream);
        state.metrics.add(&state.metrics.ws_connections, 1);
        Session {
            sink,
            frames_rx,
            reader,
            heard,
            next_ping: Instant::now() + state.config.ping_interval,
            vsn,
            token,
            channels: Vec::new(),
            subs: Vec::new(),
            routes: Vec::new(),
            next_first: 0,
            next_id: 1,
            bucket: Bucket::new(state.config.limits.max_message_rate),
            alone_since: None,
            ended_rx: state.hub.batches_ended(),
            state,
        }
    }

    #[tracing::instrument(name = "realtime", skip_all, fields(vsn = ?self.vsn))]
    async fn run(mut self) {
        let opened = Instant::now();
        tracing::info!("socket opened");
        let end = match self.serve().await {
            Ok(end) | Err(end) => end,
        };
        let secs = opened.elapsed().as_secs_f64();
        match end {
            End::Close(code, reason) => {
                tracing::info!(code, reason, secs, "socket closed");
                if code == close::SLOW_CONSUMER {
                    self.state.metrics.inc(&self.state.metrics.slow_consumers);
                }
                ws::close_socket(&mut self.sink, &mut self.frames_rx, code, reason).await;
            }
            End::Gone => tracing::info!(secs, "socket closed by the client"),
        }
    }

    async fn serve(&mut self) -> Result<End, End> {
        let ping_interval = self.state.config.ping_interval;
        let token = self.state.token.clone();
        loop {
            let deadline = self.channels.iter().filter_map(|c| c.deadline).min();
            let alone = self.alone_deadline();
            let pending = self.channels.iter().any(|c| c.pending);
            tokio::select! {
                // priority 1: shutdown
                biased;
                _ = token.cancelled() => return Ok(End::Close(close::GOING_AWAY, "server shutting down")),
                // priority 2: a channel's token ran out
                _ = ws::sleep_until_some(deadline) => Box::pin(self.on_deadline()).await?,
                _ = ws::sleep_until_some(alone) => self.on_alone()?,
                // priority 3: what the client says
                frame = self.frames_rx.recv() => Box::pin(self.on_client_frame(frame)).await?,
                // priority 4: heartbeat
                _ = tokio::time::sleep_until(self.next_ping) => {
                    if self.heard.silent_for() >= self.state.config.ping_timeout {
                        return Err(End::Close(close::NORMAL, "heartbeat timeout"));
                    }
                    self.send(Message::Ping(Default::default())).await?;
                    self.next_ping = Instant::now() + ping_interval;
                }
                // priority 5: events
                (index, result) = ws::next_batch(&mut self.subs, self.next_first) => {
                    self.next_first = index + 1;
                    result.map_err(ws::overflow_end)?;
                    let Session { sink, subs, routes, state, vsn, .. } = self;
                    let mut out = Translate { sink, vsn: *vsn, route: &mut routes[index] };
                    // (A reset makes the channel stale: it is dropped, not reshaped.)
                    let ended = ws::write_events(&mut out, &mut subs[index], state, None).await?;
                    if ended.is_some() && !routes[index].stale {
                        // A column the binding names changed: its client joins again.
                        let topic = Arc::clone(&routes[index].topic);
                        Box::pin(self.channel_error(&topic)).await?;
                    } else if routes[index].stale {
                        let topic = Arc::clone(&routes[index].topic);
                        self.drop_channel(&topic);
                    } else {
                        let topic = Arc::clone(&routes[index].topic);
                        Box::pin(self.report_position(&topic)).await?;
                    }
                }
                // priority 6: a batch ended that a position may now cover
                () = batch_ended(&mut self.ended_rx, pending) => {
                    let topics: Vec<Arc<str>> = self
                        .channels
                        .iter()
                        .filter(|c| c.pending)
                        .map(|c| Arc::clone(&c.topic))
                        .collect();
                    for topic in topics {
                        Box::pin(self.report_position(&topic)).await?;
                    }
                }
            }
        }
    }

    async fn on_client_frame(
        &mut self,
        frame: Option<Result<Message, WsError>>,
    ) -> Result<(), End> {
        let message = match frame {
            None => return Err(End::Gone),
            Some(Err(err)) => return Err(ws::read_error_end(&err)),
            Some(Ok(message)) => message,
        };
        if matches!(message, Message::Text(_) | Message::Binary(_)) && !self.bucket.take() {
            tracing::debug!("a client went over its message rate");
            self.state.metrics.inc(&self.state.metrics.limited);
            return Err(End::Close(close::RATE_LIMITED, "message rate limit"));
        }
        let text = match message {
            Message::Close(_) => return Err(End::Close(close::NORMAL, "")),
            Message::Text(text) => text,
            // Binary frames are Broadcast's (not offered); pings are answered by tungstenite.
            _ => return Ok(()),
        };
        let Some(frame) = self.vsn.decode(text.as_str()) else {
            tracing::debug!("a client message is not a Phoenix message");
            return Ok(());
        };
        match (frame.topic.as_str(), frame.event.as_str()) {
            ("phoenix", "heartbeat") => self.reply(&frame, "ok", "{}").await,
            (_, "phx_join") => self.on_join(frame).await,
            (_, "phx_leave") => {
                self.drop_channel(&frame.topic);
                self.reply(&frame, "ok", "{}").await
            }
            (_, "access_token") => self.on_access_token(frame).await,
            (topic, event) if !self.channels.iter().any(|c| &*c.topic == topic) => {
                tracing::debug!(topic, event, "a message for a channel that is not joined");
                self.reply(&frame, "error", r#"{"reason":"unmatched topic"}"#)
                    .await
            }
            (_, "broadcast" | "presence") => {
                let reason = json!({"reason": "Broadcast and Presence are not offered by pgrelay"});
                self.reply(&frame, "error", &reason.to_string()).await
            }
            (_, event) => {
                let reason = json!({"reason": format!("Unknown event {event:?}")});
                self.reply(&frame, "error", &reason.to_string()).await
            }
        }
    }

    /// `phx_join` with `config.postgres_changes`: checks every binding, places their
    /// cursors, then replies (realtime-js's `SUBSCRIBED`) and sends the `system` message.
    async fn on_join(&mut self, frame: Frame) -> Result<(), End> {
        // Joining a topic again (realtime-js does after `phx_error`) replaces the channel.
        self.drop_channel(&frame.topic);
        // Every channel is held by the socket (its topic may be as long as a client frame),
        // bindings or not: they are counted too, or joins without bindings would grow the
        // socket without bound.
        let limit = self.state.config.limits.max_subscriptions;
        if self.channels.len() >= limit {
            self.state.metrics.inc(&self.state.metrics.limited);
            let reason = format!("A socket may hold at most {limit} channels");
            return self.join_error(&frame, &reason).await;
        }
        let token = match frame.payload.get("access_token") {
            Some(Value::String(token)) => Some(token.clone()),
            _ => self.token.clone(),
        };
        let principal = match self.state.gate.principal(token.as_deref()) {
            Ok(principal) => principal,
            Err(err) => return self.join_error(&frame, &auth_reason(&err)).await,
        };
        let requested = match frame
            .payload
            .pointer("/config/postgres_changes")
            .unwrap_or(&Value::Null)
        {
            Value::Null => Vec::new(),
            Value::Array(bindings) => bindings.clone(),
            _ => {
                return self
                    .join_error(&frame, "config.postgres_changes must be an array")
                    .await;
            }
        };
        if self.subs.len() + requested.len() > limit {
            // Before any binding is checked: checking one may ask the database.
            self.state.metrics.inc(&self.state.metrics.limited);
            let reason = format!("A socket may hold at most {limit} table subscriptions");
            return self.join_error(&frame, &reason).await;
        }
        let topic: Arc<str> = Arc::from(frame.topic.as_str());
        let join_ref: Option<Arc<str>> = frame.join_ref.as_deref().map(Arc::from);
        // Check everything first: a join is served whole or not at all.
        let mut prepared = Vec::new();
        let mut echoed = Vec::new();
        // Whether the client keeps positions (a binding carries `since`), and whether every
        // binding holds one (then the channel may resume from them).
        let mut positions = false;
        let mut held = !requested.is_empty();
        // Tables of a whole-schema binding that are no longer served (dropped, renamed): what
        // they published after the position is missed by a channel that resumes.
        let mut gone: Vec<(Arc<crate::hub::Topic>, Position)> = Vec::new();
        for (n, binding) in requested.iter().enumerate() {
            let id = self.next_id;
            self.next_id += 1;
            let wanted = match Binding::read(binding) {
                Ok(wanted) => wanted,
                Err(reason) => return self.join_error(&frame, &reason).await,
            };
            positions |= wanted.since.is_some();
            held &= matches!(wanted.since, Some(Some(_)));
            let resources = match &wanted.table {
                Some(table) => vec![resource_name(&wanted.schema, table)],
                // A whole schema: every exposed table of it the caller may read.
                None => {
                    let mut names: Vec<String> = self
                        .state
                        .tables
                        .all()
                        .into_iter()
                        .filter(|t| t.name.schema == wanted.schema)
                        .filter(|t| {
                            self.state
                                .table_for(&t.resource, &principal)
                                .is_some_and(|(_, access)| access.read)
                        })
                        .map(|t| t.resource)
                        .collect();
                    names.sort();
                    if let Some(Some(since)) = wanted.since {
                        for name in &self.state.config.tables {
                            let resource = name.resource();
                            if name.schema == wanted.schema
                                && self.state.tables.get(&resource).is_none()
                                && let Some(topic) = self.state.hub.topic(&resource)
                            {
                                gone.push((topic, since));
                            }
                        }
                    }
                    names
                }
            };
            // A whole-schema binding may grow into more subscriptions than bindings: counted
            // as it grows (with one for each binding still to come), before any is looked up.
            let later = requested.len() - n - 1;
            if self.subs.len() + prepared.len() + resources.len() + later > limit {
                self.state.metrics.inc(&self.state.metrics.limited);
                let reason = format!("A socket may hold at most {limit} table subscriptions");
                return self.join_error(&frame, &reason).await;
            }
            for resource in resources {
                let ready =
                    match ws::prepare(&self.state, &resource, &wanted.params, &principal).await {
                        Ok(ready) => ready,
                        Err(refusal) => return self.join_error(&frame, &refusal.message).await,
                    };
                prepared.push((id, ready, wanted.params.clone(), wanted.since.flatten()));
            }
            let mut echo = serde_json::Map::new();
            echo.insert("id".into(), Value::from(id));
            for key in ["event", "schema", "table", "filter"] {
                if let Some(value) = binding.get(key) {
                    echo.insert(key.into(), value.clone());
                }
            }
            echoed.push(Value::Object(echo));
        }
        // Everything that can fail is looked up before anything is armed: a join is armed
        // whole or not at all. Column types once per table (several bindings may share one).
        let mut columns: Vec<(String, String)> = Vec::new();
        let mut armed = Vec::with_capacity(prepared.len());
        for (id, ready, params, since) in prepared {
            let resource = ready.table.resource.clone();
            let columns_json = match columns.iter().find(|(r, _)| *r == resource) {
                Some((_, json)) => json.clone(),
                None => match column_types(&self.state, &ready).await {
                    Some(json) => {
                        columns.push((resource.clone(), json.clone()));
                        json
                    }
                    None => {
                        return self
                            .join_error(&frame, "The database is unavailable; try again")
                            .await;
                    }
                },
            };
            let Some(hub_topic) = self.state.hub.topic(&resource) else {
                return self
                    .join_error(&frame, "The table is not exposed by this relay")
                    .await;
            };
            armed.push((id, ready, params, columns_json, hub_topic, since));
        }
        // A position every event up to which the client will have once it has read the rows
        // (taken before any cursor is placed: an event after it is sent or in those rows).
        let position = self.state.hub.exact_position();
        // Resume every binding from its `since`, or none of them: a client told that its
        // channel did not resume reads its rows again.
        let mut cursors = Vec::with_capacity(armed.len());
        let mut resumed = held;
        for (_, _, _, _, hub_topic, since) in armed.iter().filter(|_| held) {
            let Some(since) = since else { break };
            let (cursor, reset) = resume_cursor(&self.state, hub_topic, *since).await;
            if reset || cursor.backlog_ends() {
                // (A replay that holds a `reset` would end the channel again, and again.)
                resumed = false;
                break;
            }
            cursors.push(cursor);
        }
        // A table the channel had that is gone: resumed, the client would never hear of what
        // it missed there (a live channel got its rows, then `phx_error`).
        for (hub_topic, since) in &gone {
            if !resumed {
                break;
            }
            let (cursor, reset) = resume_cursor(&self.state, hub_topic, *since).await;
            resumed = !reset && cursor.caught_up();
        }
        if !resumed {
            cursors.clear();
        }
        let mut cursors = cursors.into_iter();
        // Arm every binding, then reply: from now on every event published is the channel's.
        for (id, ready, params, columns_json, hub_topic, _) in armed {
            let route = Route {
                topic: Arc::clone(&topic),
                join_ref: join_ref.clone(),
                id,
                schema_json: Value::from(ready.table.name.schema.as_str()).to_string(),
                table_json: Value::from(ready.table.name.table.as_str()).to_string(),
                columns_json,
                stale: false,
            };
            let cursor = cursors.next().unwrap_or_else(|| hub_topic.subscribe());
            let sub = Subscription::new(ready.table, ready.access, cursor, params, ready.shape);
            self.subs.push(sub);
            self.routes.push(route);
        }
        self.channels.push(Channel {
            topic: Arc::clone(&topic),
            join_ref: join_ref.clone(),
            deadline: principal.expires_in().map(|d| Instant::now() + d),
            principal,
            positions,
            last_position: None,
            pending: false,
        });
        let response = json!({"postgres_changes": echoed}).to_string();
        self.reply(&frame, "ok", &response).await?;
        if !requested.is_empty() {
            let mut system = json!({
                "extension": "postgres_changes",
                "status": "ok",
                "message": "Subscribed to PostgreSQL",
                "channel": topic.strip_prefix("realtime:").unwrap_or(&topic),
            });
            if positions {
                system["resumed"] = Value::from(resumed);
            }
            self.push(&topic, join_ref.as_deref(), "system", &system.to_string())
                .await?;
        }
        if positions
            && !resumed
            && let Some(position) = position
        {
            self.send_position(&topic, position).await?;
        }
        Ok(())
    }

    /// After a channel's events were written: when the client keeps positions and now has
    /// every event up to a newer one (all the channel's bindings are at the head), it is
    /// sent that position.
    async fn report_position(&mut self, topic: &Arc<str>) -> Result<(), End> {
        let Some(channel) = self.channels.iter().find(|c| c.topic == *topic) else {
            return Ok(());
        };
        if !channel.positions {
            return Ok(());
        }
        // Taken before the bindings are looked at: every event up to it was published
        // before they were found at the head.
        let Some(position) = self.state.hub.exact_position() else {
            self.set_pending(topic, true);
            return Ok(());
        };
        if channel.last_position.is_some_and(|last| last >= position.1) {
            // What was written may be of a batch still open: its end is waited for.
            self.set_pending(topic, true);
            return Ok(());
        }
        let at_head = self
            .subs
            .iter()
            .zip(&self.routes)
            .filter(|(_, route)| route.topic == *topic)
            .all(|(sub, route)| !route.stale && sub.caught_up());
        if at_head {
            self.send_position(topic, position).await?;
        }
        // (Not at the head: what is left to read is written, and looked at, next.)
        self.set_pending(topic, !at_head);
        Ok(())
    }

    fn set_pending(&mut self, topic: &str, pending: bool) {
        if let Some(channel) = self.channels.iter_mut().find(|c| &*c.topic == topic) {
            channel.pending = pending;
        }
    }

    /// `system` `{"message":"Position","position":"…"}`: the client has every event of the
    /// channel up to `position`; a join whose bindings carry it as `since` resumes there.
    async fn send_position(
        &mut self,
        topic: &Arc<str>,
        (seq, batch): (i64, u64),
    ) -> Result<(), End> {
        let join_ref = self.join_ref_of(topic);
        if let Some(channel) = self.channels.iter_mut().find(|c| c.topic == *topic) {
            channel.last_position = Some(batch);
        }
        let position = Position {
            seq,
            exact: Some((self.state.hub.epoch(), batch)),
        };
        let system = json!({
            "extension": "postgres_changes",
            "status": "ok",
            "message": "Position",
            "channel": topic.strip_prefix("realtime:").unwrap_or(topic),
            "position": position.text(),
        });
        self.push(topic, join_ref.as_deref(), "system", &system.to_string())
            .await
    }

    /// `access_token`: refreshes the channel's token. One that is invalid, or that grants
    /// other access than the channel's bindings were made with, closes the channel.
    async fn on_access_token(&mut self, frame: Frame) -> Result<(), End> {
        let Some(token) = frame.payload.get("access_token").and_then(Value::as_str) else {
            return Ok(());
        };
        let Some(index) = self.channels.iter().position(|c| *c.topic == frame.topic) else {
            return Ok(());
        };
        let principal = match self.state.gate.principal(Some(token)) {
            Ok(principal) => principal,
            Err(err) => {
                let topic = Arc::clone(&self.channels[index].topic);
                return self.close_channel(&topic, &auth_reason(&err)).await;
            }
        };
        let changed = self
            .subs
            .iter()
            .zip(&self.routes)
            .filter(|(_, route)| *route.topic == frame.topic)
            .any(|(sub, _)| self.state.gate.access(&sub.table, &principal) != sub.access);
        if changed {
            let topic = Arc::clone(&self.channels[index].topic);
            let reason = "The new token grants different access than the channel was joined with; join again";
            return self.close_channel(&topic, reason).await;
        }
        let channel = &mut self.channels[index];
        channel.deadline = principal.expires_in().map(|d| Instant::now() + d);
        channel.principal = principal;
        Ok(())
    }

    /// When a socket without a channel is next checked for a token that authenticates.
    fn alone_deadline(&mut self) -> Option<Instant> {
        if !self.channels.is_empty() {
            self.alone_since = None;
            return None;
        }
        let since = *self.alone_since.get_or_insert_with(Instant::now);
        Some(since + self.state.config.auth.auth_timeout)
    }

    /// A socket has held no channel for the auth timeout: it is closed unless its own token
    /// (the `apikey`) authenticates (the next check is an auth timeout later).
    fn on_alone(&mut self) -> Result<(), End> {
        self.alone_since = Some(Instant::now());
        match self.state.gate.principal(self.token.as_deref()) {
            Ok(_) => Ok(()),
            Err(err) => {
                tracing::debug!(error = %err, "a socket without a channel has no valid token");
                let reason = match err {
                    AuthError::Expired => "token expired",
                    _ => "authentication required",
                };
                Err(End::Close(close::UNAUTHORIZED, reason))
            }
        }
    }

    /// A channel's token expired: it is told, and closed.
    async fn on_deadline(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let expired: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| Arc::clone(&c.topic))
            .collect();
        for topic in expired {
            let role = self
                .channels
                .iter()
                .find(|c| c.topic == topic)
                .map(|c| c.principal.role.clone());
            tracing::debug!(?role, "a channel's token expired");
            self.close_channel(&topic, "Token has expired").await?;
        }
        Ok(())
    }

    /// Tells a channel's client why it ends (a `system` error), closes it (`phx_close`), and
    /// drops its bindings.
    async fn close_channel(&mut self, topic: &Arc<str>, reason: &str) -> Result<(), End> {
        let join_ref = self.join_ref_of(topic);
        self.drop_channel(topic);
        let system = json!({"extension": "system", "status": "error", "message": reason});
        self.push(topic, join_ref.as_deref(), "system", &system.to_string())
            .await?;
        // (`ref` is the join's: realtime-js takes a close with another ref for an older join's.)
        let text = self.vsn.encode(
            join_ref.as_deref(),
            join_ref.as_deref(),
            topic,
            "phx_close",
            "{}",
        );
        self.send(Message::text(text)).await
    }

    /// The channel's copy is stale: `phx_error` (realtime-js reports `CHANNEL_ERROR` and
    /// joins again, getting fresh bindings), and its bindings are dropped.
    async fn channel_error(&mut self, topic: &Arc<str>) -> Result<(), End> {
        let join_ref = self.join_ref_of(topic);
        self.drop_channel(topic);
        let text = self.vsn.encode(
            join_ref.as_deref(),
            join_ref.as_deref(),
            topic,
            "phx_error",
            "{}",
        );
        self.send(Message::text(text)).await
    }

    fn join_ref_of(&self, topic: &str) -> Option<Arc<str>> {
        self.channels
            .iter()
            .find(|c| &*c.topic == topic)
            .and_then(|c| c.join_ref.clone())
    }

    /// Forgets a channel and its bindings (nothing is sent).
    fn drop_channel(&mut self, topic: &str) {
        self.channels.retain(|c| &*c.topic != topic);
        let mut i = 0;
        while i < self.routes.len() {
            if &*self.routes[i].topic == topic {
                self.routes.remove(i);
                self.subs.remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Answers a join with Supabase's error form: realtime-js reports `CHANNEL_ERROR` with
    /// the reason.
    async fn join_error(&mut self, frame: &Frame, reason: &str) -> Result<(), End> {
        tracing::debug!(topic = %frame.topic, reason, "join refused");
        let response = json!({"reason": reason}).to_string();
        self.reply(frame, "error", &response).await
    }

    /// `phx_reply` to `frame` with `status` and a `response` (JSON text).
    async fn reply(&mut self, frame: &Frame, status: &str, response: &str) -> Result<(), End> {
        let status = Value::from(status);
        let payload = format!(r#"{{"status":{status},"response":{response}}}"#);
        let text = self.vsn.encode(
            frame.join_ref.as_deref(),
            frame.reference.as_deref(),
            &frame.topic,
            "phx_reply",
            &payload,
        );
        self.send(Message::text(text)).await
    }

    /// A message the server pushes on a channel.
    async fn push(
        &mut self,
        topic: &str,
        join_ref: Option<&str>,
        event: &str,
        payload: &str,
    ) -> Result<(), End> {
        let text = self.vsn.encode(join_ref, None, topic, event, payload);
        self.send(Message::text(text)).await
    }

    async fn send(&mut self, message: Message) -> Result<(), End> {
        ws::send_to(&mut self.sink, &self.state, message).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
        self.state.metrics.dec(&self.state.metrics.ws_connections);
    }
}

/// Where a binding that holds `since` resumes on `topic`: right after its batch on the relay
/// that sent it, else from its seq (at least once). True when it cannot be resumed.
async fn resume_cursor(
    state: &AppState,
    topic: &Arc<crate::hub::Topic>,
    since: Position,
) -> (crate::hub::Cursor, bool) {
    let hub = &state.hub;
    match since.exact {
        Some((epoch, batch)) if epoch == hub.epoch() => match hub.resume_after(topic, batch) {
            Resume::From(cursor) => (cursor, false),
            _ => (topic.subscribe(), true),
        },
        _ => ws::open_cursor(state, topic, Some(since.seq)).await,
    }
}

/// Resolves when a batch ended since the last time it resolved; pends while `wait` is false
/// (no channel waits for a position) or once the hub is gone.
async fn batch_ended(rx: &mut tokio::sync::watch::Receiver<u64>, wait: bool) {
    if !wait || rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What an auth failure is called in a join's or a channel's error.
fn auth_reason(err: &AuthError) -> String {
    match err {
        AuthError::Missing => {
            "Authentication required: send the token as the apikey parameter, an \
             Authorization: Bearer or apikey header, or the join's access_token"
                .to_owned()
        }
        AuthError::Expired => "Token has expired".to_owned(),
        AuthError::Invalid(_) => err.to_string(),
    }
}

/// A `postgres_changes` binding of a join, read.
struct Binding {
    schema: String,
    /// `None`: every exposed table of the schema.
    table: Option<String>,
    params: Params,
    /// `since`, pgrelay's addition: absent (`None`), `null` (`Some(None)`: the client keeps
    /// positions and has none yet), or the position the client holds.
    since: Option<Option<Position>>,
}

/// A position the relay sent (`system` `Position`): `"seq/epoch/batch"`, where `seq` is
/// pgrelay's resume position (any relay resumes from it, at least once) and `epoch/batch`
/// name the last batch the client has whole on the relay that sent it (that relay resumes
/// right after it, exactly once). A plain seq is taken too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    seq: i64,
    exact: Option<(u64, u64)>,
}

impl Position {
    fn parse(text: &str) -> Option<Position> {
        let mut parts = text.split('/');
        let seq = parts.next()?.parse().ok()?;
        let exact = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => None,
            (Some(epoch), Some(batch), None) => {
                Some((u64::from_str_radix(epoch, 16).ok()?, batch.parse().ok()?))
            }
            _ => return None,
        };
        Some(Position { seq, exact })
    }

    fn text(&self) -> String {
        match self.exact {
            Some((epoch, batch)) => format!("{}/{epoch:x}/{batch}", self.seq),
            None => self.seq.to_string(),
        }
    }
}

impl Binding {
    /// `{event, schema, table?, filter?}`: `event` is `*`, `INSERT`, `UPDATE` or `DELETE`;
    /// `filter` is realtime's `column=op.value`, which is pgrelay's filter on one column.
    fn read(binding: &Value) -> Result<Binding, String> {
        if !binding.is_object() {
            // (Read as one, it would have every key missing: a whole-schema binding.)
            return Err(format!(
                "postgres_changes: a binding must be an object, not {binding}"
            ));
        }
        let text = |key: &str| match binding.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("postgres_changes: {key} must be a string")),
        };
        let event = text("event")?.unwrap_or_else(|| "*".into());
        let events = match event.to_ascii_uppercase().as_str() {
            "*" => vec![
                EventType::Change(Op::Create),
                EventType::Change(Op::Update),
                EventType::Change(Op::Delete),
            ],
            "INSERT" => vec![EventType::Change(Op::Create)],
            "UPDATE" => vec![EventType::Change(Op::Update)],
            "DELETE" => vec![EventType::Change(Op::Delete)],
            _ => {
                return Err(format!(
                    "postgres_changes: event must be *, INSERT, UPDATE or DELETE, not {event:?}"
                ));
            }
        };
        let schema = text("schema")?.unwrap_or_else(|| "public".into());
        let table = text("table")?.filter(|t| t != "*");
        let mut params = Params {
            events: Some(events),
            ..Params::default()
        };
        if let Some(filter) = text("filter")?.filter(|f| !f.is_empty()) {
            if table.is_none() {
                return Err("postgres_changes: a filter needs a table".into());
            }
            let Some((column, condition)) = filter.split_once('=') else {
                return Err(format!(
                    "postgres_changes: filter must be column=op.value, not {filter:?}"
                ));
            };
            let parsed = filter::parse_pair(column, condition)
                .map_err(|e| format!("postgres_changes: filter {filter:?}: {e}"))?;
            params.filters.push(parsed);
        }
        let since = match binding.get("since") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(Value::String(s)) if Position::parse(s).is_some() => Some(Position::parse(s)),
            Some(Value::Number(n)) if n.as_i64().is_some() => {
                Some(n.as_i64().map(|seq| Position { seq, exact: None }))
            }
            Some(other) => {
                return Err(format!(
                    "postgres_changes: since must be null or a position the relay sent, not {other}"
                ));
            }
        };
        Ok(Binding {
            schema,
            table,
            params,
            since,
        })
    }
}

/// `[{"name","type"}]` of the columns the caller sees (`type` as realtime names it: the
/// type's name in `pg_type`, `_int4` for arrays), or `None` when the database cannot say.
async fn column_types(state: &AppState, ready: &ws::Ready) -> Option<String> {
    const TYPES: &str = "
        select a.attname::text, t.typname::text
          from pg_attribute a join pg_type t on t.oid = a.atttypid
         where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped
         order by a.attnum";
    let client = state.pool.get().await.ok()?;
    let rows = client.query(TYPES, &[&ready.table.relid]).await.ok()?;
    let columns: Vec<Value> = rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .filter(|(name, _)| ready.access.sees(name))
        .map(|(name, kind)| json!({"name": name, "type": kind}))
        .collect();
    Some(Value::from(columns).to_string())
}

/// A change frame's fields, as far as a `postgres_changes` message needs them.
#[derive(Deserialize)]
struct View<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    old: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<Cow<'a, str>>,
}

/// The sink one subscription's frames are written through: each change frame becomes the
/// `postgres_changes` message of its binding; a `reset` becomes the channel's `phx_error`
/// (the route is then stale and what follows is dropped); a `truncate` is not sent
/// (Supabase sends none).
struct Translate<'a> {
    sink: &'a mut SplitSink<WebSocket, Message>,
    vsn: Vsn,
    route: &'a mut Route,
}

impl Translate<'_> {
    fn translate(&mut self, frame: &str) -> Option<String> {
        if self.route.stale {
            return None;
        }
        let view: View<'_> = serde_json::from_str(frame).ok()?;
        let route = &*self.route;
        let join_ref = route.join_ref.as_deref();
        let kind = match view.kind.as_ref() {
            "create" => "INSERT",
            "update" => "UPDATE",
            "delete" => "DELETE",
            "reset" => {
                let text = self
                    .vsn
                    .encode(join_ref, join_ref, &route.topic, "phx_error", "{}");
                self.route.stale = true;
                return Some(text);
            }
            _ => return None,
        };
        let ts = Value::from(view.ts.as_deref().unwrap_or_default()).to_string();
        let mut payload = String::with_capacity(frame.len() + route.columns_json.len() + 160);
        payload.push_str(r#"{"ids":["#);
        payload.push_str(&route.id.to_string());
        payload.push_str(r#"],"data":{"schema":"#);
        payload.push_str(&route.schema_json);
        payload.push_str(r#","table":"#);
        payload.push_str(&route.table_json);
        payload.push_str(r#","commit_timestamp":"#);
        payload.push_str(&ts);
        payload.push_str(r#","type":""#);
        payload.push_str(kind);
        payload.push_str(r#"","columns":"#);
        payload.push_str(&route.columns_json);
        if kind != "DELETE" {
            payload.push_str(r#","record":"#);
            payload.push_str(view.data.map_or("{}", RawValue::get));
        }
        if kind != "INSERT" {
            payload.push_str(r#","old_record":"#);
            payload.push_str(view.old.map_or("{}", RawValue::get));
        }
        payload.push_str(r#","errors":null}}"#);
        Some(
            self.vsn
                .encode(join_ref, None, &route.topic, "postgres_changes", &payload),
        )
    }
}

impl Sink<Message> for Translate<'_> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.sink.poll_ready_unpin(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        match item {
            Message::Text(frame) => match self.translate(frame.as_str()) {
                Some(text) => self.sink.start_send_unpin(Message::text(text)),
                None => Ok(()),
            },
            other => self.sink.start_send_unpin(other),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.sink.poll_flush_unpin(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.sink.poll_close_unpin(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_serializers_read_and_write_the_same_message() {
        let v1 = r#"{"topic":"realtime:x","event":"phx_join","payload":{"a":1},"ref":"2","join_ref":"2"}"#;
        let v2 = r#"["2","2","realtime:x","phx_join",{"a":1}]"#;
        for (vsn, text) in [(Vsn::V1, v1), (Vsn::V2, v2)] {
            let frame = vsn.decode(text).expect("a Phoenix message");
            assert_eq!(frame.topic, "realtime:x");
            assert_eq!(frame.event, "phx_join");
            assert_eq!(frame.reference.as_deref(), Some("2"));
            assert_eq!(frame.join_ref.as_deref(), Some("2"));
            assert_eq!(frame.payload, json!({"a": 1}));
            let encoded = vsn.encode(Some("2"), Some("2"), "realtime:x", "phx_join", r#"{"a":1}"#);
            let a: Value = serde_json::from_str(&encoded).expect("JSON");
            let b: Value = serde_json::from_str(text).expect("JSON");
            assert_eq!(a, b);
        }
        assert_eq!(Vsn::from_param(None), Some(Vsn::V1));
        assert_eq!(Vsn::from_param(Some("3.0.0")), None);
    }

    #[test]
    fn a_position_is_a_seq_with_an_optional_exact_batch() {
        let exact = Position {
            seq: 41,
            exact: Some((0xabc, 7)),
        };
        assert_eq!(exact.text(), "41/abc/7");
        assert_eq!(Position::parse("41/abc/7"), Some(exact));
        assert_eq!(
            Position::parse("41"),
            Some(Position {
                seq: 41,
                exact: None
            })
        );
        for bad in [
            "",
            "x",
            "41/",
            "41/abc",
            "41/abc/7/1",
            "41/zz/7",
            "41/abc/-1",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
        let b = Binding::read(&json!({"schema":"public","table":"t","since":"41/abc/7"}));
        assert_eq!(b.map(|b| b.since), Ok(Some(Some(exact))));
        let b = Binding::read(&json!({"schema":"public","table":"t","since":null}));
        assert_eq!(b.map(|b| b.since), Ok(Some(None)));
        assert!(Binding::read(&json!({"schema":"public","table":"t","since":true})).is_err());
    }

    #[test]
    fn a_binding_is_a_subscription_with_events_and_one_filter() {
        let b = Binding::read(
            &json!({"event":"INSERT","schema":"public","table":"items","filter":"price=gt.10"}),
        )
        .expect("valid");
        assert_eq!(b.table.as_deref(), Some("items"));
        assert_eq!(b.params.events, Some(vec![EventType::Change(Op::Create)]));
        assert_eq!(b.params.filters.len(), 1);
        let all = Binding::read(&json!({"event":"*","schema":"shop"})).expect("valid");
        assert_eq!((all.schema.as_str(), all.table), ("shop", None));
        for bad in [
            json!({"event":"TRUNCATE","schema":"public","table":"items"}),
            json!({"event":"*","schema":"public","table":"items","filter":"price"}),
            json!({"event":"*","schema":"public","filter":"id=eq.1"}),
            json!({"event":"*","schema":"public","table":"items","filter":"price=zz.1"}),
        ] {
            assert!(Binding::read(&bad).is_err(), "{bad}");
        }
    }
}
