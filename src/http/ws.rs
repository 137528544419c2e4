//! WebSocket routes: `GET /ws/{table}` (one table) and `GET /ws` (subscribe by message), and
//! the per-socket task.
//!
//! The socket task is a `select!` over shutdown, client frames, the heartbeat and the hub
//! cursors of its subscriptions. A `/ws/{table}` cursor is created before the upgrade
//! completes, so every event published after the client sees `101 Switching Protocols`
//! reaches it. Writes are batched: up to `WRITE_BATCH` frames are fed, then flushed once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::future::select_all;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use warp::http::{HeaderMap, StatusCode, header};
use warp::hyper::upgrade::{OnUpgrade, Upgraded};
use warp::{Filter, Rejection, Reply};

use super::{ApiError, AppState, token_header, with_state};
use crate::access::{Access, AuthError, Principal};
use crate::event::control;
use crate::filter;
use crate::hub::{Cursor, Entry, Overflow, Resume, Topic};
use crate::snapshot::{self, Snapshot, Upkeep};
use crate::sql::TableInfo;
use crate::subscription::{Delivery, Params, Shape, ShapeError};

/// A WebSocket after pgrelay's own upgrade (see [`handshake`]).
pub(super) type WebSocket = WebSocketStream<TokioIo<Upgraded>>;

/// Bytes tungstenite reads (and zero-fills) at a time. Its default, 128 KiB, is resident for
/// every connection once read into: 146 KiB per idle connection was measured with it, 18 KiB
/// with 4 KiB, 15 KiB with this. Client messages are small; a large one takes more reads.
const READ_BUFFER: usize = 1024;

/// Bytes of frames tungstenite gathers before it writes them to the socket (every flush
/// writes what it holds anyway). Its buffer keeps the largest size it reached for as long as
/// the connection lives: the default (128 KiB) left an idle connection holding about 47 kB
/// more after one burst of events than before it.
const WRITE_BUFFER: usize = 8 * 1024;

/// Most frames fed to the socket before one flush.
const WRITE_BATCH: usize = 256;

/// Most entries a subscription's batch keeps room for once written: a burst's room (an
/// entry is about 80 bytes, so 20 KiB for [`WRITE_BATCH`], 80 KiB for [`BATCH_EVENTS`])
/// would otherwise stay with every subscription that saw one, idle or not.
const KEPT_BATCH: usize = 16;

/// How long a subscriber more than its queue limit behind may go without its socket taking a
/// frame before it is closed as a slow consumer.
/// (Long enough that a client merely starved of CPU for a moment is not dropped: at 1 s,
/// `pgrelay bench` saw busy-but-reading subscribers closed on a saturated 2-core machine.)
const STALL_GRACE: Duration = Duration::from_secs(15);

/// How long a close frame may take to go out before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Close codes (DESIGN.md).
pub(super) mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN: u16 = 1013;
    pub const TOO_BIG: u16 = 1009;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const BAD_REQUEST: u16 = 4400;
    pub const NOT_FOUND: u16 = 4004;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const RATE_LIMITED: u16 = 4029;
}

/// Where a subscription starts reading: at the head, or where a client that saw `since`
/// (on this relay or another one) resumes. The flag is true when the relay cannot prove it
/// holds everything after `since` (the client must get a `reset`).
pub(super) async fn open_cursor(
    state: &AppState,
    topic: &Arc<Topic>,
    since: Option<i64>,
) -> (Cursor, bool) {
    let Some(seq) = since else {
        return (topic.subscribe(), false);
    };
    match state.hub.resume(topic, seq) {
        Resume::From(cursor) => (cursor, false),
        Resume::Reset => (topic.subscribe(), true),
        Resume::Ahead(cursor) => {
            // Above every seq this relay published: another relay may be ahead of it (the
            // events will come), or the seq was never drawn at all.
            match drawn(state, seq).await {
                Some(true) => (cursor, false),
                _ => (topic.subscribe(), true),
            }
        }
    }
}

/// Whether `seq` has been drawn from the log's sequence (`None`: the database cannot say).
async fn drawn(state: &AppState, seq: i64) -> Option<bool> {
    let client = state.pool.get().await.ok()?;
    let row = client
        .query_one(
            "select case when is_called then last_value else 0 end from pgrelay.changes_seq",
            &[],
        )
        .await
        .ok()?;
    Some(seq <= row.get::<_, i64>(0))
}

/// Why a subscription could not be set up, as the client is told.
enum SetupError {
    /// The request is wrong: 400, or an `error` message.
    Bad(String),
    /// The table is not exposed, or not readable by this caller (the same to the caller).
    NotFound,
    /// The database could not check it: 503, or an `error` message.
    Unavailable,
}

/// Checks a subscription's parameters against the table and the caller's access (filters
/// need PostgreSQL to type their values, so only they cost a query).
async fn compile_shape(
    state: &AppState,
    table: &TableInfo,
    params: &Params,
    access: &Access,
) -> Result<Shape, SetupError> {
    if !access.read {
        return Err(SetupError::NotFound);
    }
    if let Some(hidden) = filter::conditions(&params.filters).find(|c| !access.sees(&c.column)) {
        let err = filter::FilterError::UnknownColumn(hidden.column.clone());
        return Err(SetupError::Bad(err.to_string()));
    }
    state
        .config
        .limits
        .filter()
        .check(&params.filters)
        .map_err(|e| SetupError::Bad(e.to_string()))?;
    let (filter, policy) = if params.has_filters() || !access.filter.is_empty() {
        let client = state.pool.get().await.map_err(|err| {
            tracing::warn!(error = %crate::error::chain(&err), "no database connection to check a filter");
            SetupError::Unavailable
        })?;
        let unavailable = |err: &tokio_postgres::Error| {
            tracing::warn!(error = %crate::error::chain(err), "checking a filter failed");
            SetupError::Unavailable
        };
        let filter = match filter::compile(&client, &table.columns, params.filters.clone()).await {
            // Live events are filtered in Rust: an operator it cannot evaluate exactly is
            // refused, not approximated.
            Ok(filter) => filter
                .check_live()
                .map(|()| filter)
                .map_err(|err| SetupError::Bad(err.to_string()))?,
            Err(filter::FilterError::Db(err)) => return Err(unavailable(&err)),
            Err(err) => return Err(SetupError::Bad(err.to_string())),
        };
        let policy = match filter::compile(&client, &table.columns, access.filters()).await {
            Ok(policy) if policy.check_live().is_ok() => policy,
            Ok(_) => {
                // A policy condition on a column Rust cannot compare (json, arrays, ranges):
                // this caller's rows cannot be told apart live.
                tracing::warn!(table = %table.name, "a policy filter cannot be evaluated on live events");
                return Err(SetupError::NotFound);
            }
            Err(filter::FilterError::Db(err)) => return Err(unavailable(&err)),
            Err(err) => {
                // A claim that does not fit the column: this caller has no rows here.
                tracing::debug!(error = %err, table = %table.name, "a policy filter did not bind");
                return Err(SetupError::NotFound);
            }
        };
        (filter, policy)
    } else {
        (filter::Filter::default(), filter::Filter::default())
    };
    Shape::new(table, params, filter, policy, access.columns.as_deref())
        .map_err(|e: ShapeError| SetupError::Bad(e.to_string()))
}

/// Percent-decodes a path segment (decoding a plain name changes nothing).
pub(super) fn decode(resource: &str) -> String {
    percent_encoding::percent_decode_str(resource)
        .decode_utf8_lossy()
        .into_owned()
}

/// Why a socket is refused: an HTTP status for a plain request; for an upgrade request, an
/// `error` message and a close code after the upgrade, which browsers can read.
#[derive(Debug)]
pub(super) struct Refusal {
    status: warp::http::StatusCode,
    code: &'static str,
    pub(super) message: String,
    close: u16,
    reason: &'static str,
}

impl Refusal {
    pub(super) fn unauthorized(err: &AuthError) -> Refusal {
        Refusal {
            status: warp::http::StatusCode::UNAUTHORIZED,
            code: match err {
                AuthError::Expired => "token_expired",
                _ => "unauthorized",
            },
            message: match err {
                AuthError::Missing => super::WS_TOKEN_MISSING.to_owned(),
                _ => err.to_string(),
            },
            close: close::UNAUTHORIZED,
            reason: match err {
                AuthError::Expired => "token expired",
                AuthError::Missing => "authentication required",
                AuthError::Invalid(_) => "invalid token",
            },
        }
    }

    fn from_setup(err: SetupError, resource: &str) -> Refusal {
        match err {
            SetupError::Bad(message) => Refusal {
                status: warp::http::StatusCode::BAD_REQUEST,
                code: "bad_request",
                message,
                close: close::BAD_REQUEST,
                reason: "bad request",
            },
            SetupError::NotFound => Refusal {
                status: warp::http::StatusCode::NOT_FOUND,
                code: "not_found",
                message: format!("Table {resource:?} is not exposed by this relay"),
                close: close::NOT_FOUND,
                reason: "table not exposed",
            },
            SetupError::Unavailable => Refusal {
                status: warp::http::StatusCode::SERVICE_UNAVAILABLE,
                code: "unavailable",
                message: "The database is unavailable; try again".into(),
                close: close::TRY_AGAIN,
                reason: "database unavailable",
            },
        }
    }

    pub(super) fn into_rejection(self) -> Rejection {
        warp::reject::custom(ApiError::new(self.status, self.code, self.message))
    }
}

/// A `/ws/{table}` subscription checked against the table and the caller.
pub(super) struct Ready {
    pub(super) table: TableInfo,
    pub(super) access: Access,
    pub(super) shape: Shape,
}

pub(super) async fn prepare(
    state: &AppState,
    resource: &str,
    params: &Params,
    principal: &Principal,
) -> Result<Ready, Refusal> {
    let (table, access) = state
        .table_for(resource, principal)
        .ok_or_else(|| Refusal::from_setup(SetupError::NotFound, resource))?;
    let shape = compile_shape(state, &table, params, &access)
        .await
        .map_err(|e| Refusal::from_setup(e, resource))?;
    Ok(Ready {
        table,
        access,
        shape,
    })
}

/// Checks a subscription again against its table as it is now and rebuilds its shape and
/// access when the table has another key since (a projection, and a policy's visible
/// columns, always hold the key columns; a column that was the key may be hidden now). A
/// table no longer served, or with the same key, leaves them as they are: its other
/// changes end the subscriptions they concern before this is asked (a column a filter or
/// `select` names dropped, renamed or retyped), and most resets are not changes at all.
async fn reshape(
    state: &AppState,
    principal: &Principal,
    params: &Params,
    fields: (&mut TableInfo, &mut Access, &mut Shape),
) -> Result<(), Refusal> {
    let (table, access, shape) = fields;
    let Some(current) = state
        .table(&table.resource)
        .filter(|t| t.key_columns != table.key_columns)
    else {
        return Ok(());
    };
    let fresh = state.gate.access(&current, principal);
    *shape = compile_shape(state, &current, params, &fresh)
        .await
        .map_err(|e| Refusal::from_setup(e, &current.resource))?;
    *access = fresh;
    *table = current;
    Ok(())
}

/// The query keys that carry a token (`access_token`, and Supabase's `apikey`), taken out of
/// the subscription's keys.
pub(crate) fn take_token(pairs: Vec<(String, String)>) -> (Vec<(String, String)>, Option<String>) {
    let mut token = None;
    let mut rest = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        match key.as_str() {
            "access_token" => token = Some(value),
            "apikey" => {
                token.get_or_insert(value);
            }
            _ => rest.push((key, value)),
        }
    }
    (rest, token)
}

/// Whether the request asks for a WebSocket upgrade (refusals then come after it).
fn wants_upgrade() -> impl Filter<Extract = (bool,), Error = std::convert::Infallible> + Clone {
    warp::header::optional::<String>("upgrade")
        .map(|u: Option<String>| u.is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket")))
        .or(warp::any().map(|| false))
        .unify()
}

/// What a socket starts with.
enum Opening {
    /// `/ws`: subscriptions come by message (the caller is `None` until an `auth` message).
    Multiplexed(Option<Principal>),
    /// `/ws/{table}`.
    Table(Box<First>),
    /// Refused: told after the upgrade.
    Refused(Refusal),
}

/// GET /ws/{table}?snapshot=true&since=41&select=id,name&events=create&price=gt.10
pub fn table_route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("ws" / String)
        .and(warp::get())
        .and(with_state(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(token_header())
        .and(wants_upgrade())
        .and_then(
            |resource: String,
             state: Arc<AppState>,
             pairs: Vec<(String, String)>,
             header_token: Option<String>,
             upgrade: bool| async move {
                let resource = decode(&resource);
                let (pairs, query_token) = take_token(pairs);
                let token = header_token.or(query_token);
                let opening = open_table(&state, resource, &pairs, token, upgrade).await;
                match opening {
                    Opening::Refused(refusal) if !upgrade => Err(refusal.into_rejection()),
                    opening => Ok::<_, Rejection>((state, opening)),
                }
            },
        )
        .untuple_one()
        .and(handshake())
        .map(
            |state: Arc<AppState>, mut opening: Opening, ws: Handshake| {
                // Subscribe before the upgrade reply goes out: events from now on are ours
                // (a resume's cursor is placed once the socket is up; its replay is in the
                // ring either way).
                if let Opening::Table(first) = &mut opening
                    && first.params.since.is_none()
                    && let Some(ready) = &first.ready
                {
                    first.cursor = state
                        .hub
                        .topic(&ready.table.resource)
                        .map(|t| t.subscribe());
                }
                upgrade(ws, state, opening)
            },
        )
        .recover(upgrade_required)
}

/// Checks a `/ws/{table}` request: its token, its keys, and (when the token came with it) the
/// table and the caller's access.
///
/// Without a token (when one is required) nothing about the table is looked at, so exposed
/// and unknown tables cannot be told apart: a plain HTTP request is a 401, an upgrade waits
/// for the `auth` message like any other and learns about the table only after it.
async fn open_table(
    state: &AppState,
    resource: String,
    pairs: &[(String, String)],
    token: Option<String>,
    upgrade: bool,
) -> Opening {
    let principal = match state.gate.principal(token.as_deref()) {
        Ok(principal) => Some(principal),
        // No token: the socket may still send one in an `auth` message.
        Err(AuthError::Missing) if upgrade => None,
        Err(err) => return Opening::Refused(Refusal::unauthorized(&err)),
    };
    // (The keys are checked without the table, so a bad one says nothing about it.)
    let params = match Params::from_pairs(pairs) {
        Ok(params) => params,
        Err(message) => {
            return Opening::Refused(Refusal::from_setup(SetupError::Bad(message), &resource));
        }
    };
    let Some(principal) = principal else {
        return Opening::Table(Box::new(First {
            resource,
            params,
            principal: None,
            ready: None,
            cursor: None,
        }));
    };
    match prepare(state, &resource, &params, &principal).await {
        Ok(ready) => Opening::Table(Box::new(First {
            resource,
            params,
            principal: Some(principal),
            ready: Some(ready),
            cursor: None,
        })),
        Err(refusal) => Opening::Refused(refusal),
    }
}

/// A `/ws/{table}` socket's subscription, checked and placed in the stream, not started.
struct Placed {
    sub: Subscription,
    params: Params,
    /// Its `since` could not be resumed.
    reset: bool,
}

/// The subscription a `/ws/{table}` socket starts with.
struct First {
    resource: String,
    params: Params,
    /// `None` until an `auth` message names the caller.
    principal: Option<Principal>,
    /// Checked against the table (once the caller is known).
    ready: Option<Ready>,
    /// Its cursor, when placed before the upgrade (no `since`).
    cursor: Option<Cursor>,
}

/// GET /ws: subscriptions come by message.
pub fn multiplexed_route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("ws")
        .and(warp::get())
        .and(with_state(state))
        .and(warp::query::<Vec<(String, String)>>())
        .and(token_header())
        .and(wants_upgrade())
        .and_then(
            |state: Arc<AppState>,
             pairs: Vec<(String, String)>,
             header_token: Option<String>,
             upgrade: bool| async move {
                let (_, query_token) = take_token(pairs);
                let opening = match state
                    .gate
                    .principal(header_token.or(query_token).as_deref())
                {
                    Ok(principal) => Opening::Multiplexed(Some(principal)),
                    Err(AuthError::Missing) if upgrade => Opening::Multiplexed(None),
                    Err(err) => Opening::Refused(Refusal::unauthorized(&err)),
                };
                match opening {
                    Opening::Refused(refusal) if !upgrade => Err(refusal.into_rejection()),
                    opening => Ok::<_, Rejection>((state, opening)),
                }
            },
        )
        .untuple_one()
        .and(handshake())
        .map(|state: Arc<AppState>, opening: Opening, ws: Handshake| upgrade(ws, state, opening))
        .recover(upgrade_required)
}

/// A WebSocket upgrade request (RFC 6455), checked.
///
/// pgrelay answers the handshake itself instead of using `warp::ws()`, because warp 0.4 cannot
/// size tungstenite's read buffer (see `READ_BUFFER`).
pub struct Handshake {
    /// `Sec-WebSocket-Accept` for the reply.
    accept: String,
    /// Resolves to the raw connection once the 101 reply is out.
    on_upgrade: OnUpgrade,
}

pub(super) fn handshake() -> impl Filter<Extract = (Handshake,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(warp::ext::optional::<OnUpgrade>())
        .and_then(
            |headers: HeaderMap, on_upgrade: Option<OnUpgrade>| async move {
                let key = check_upgrade(&headers).map_err(warp::reject::custom)?;
                let Some(on_upgrade) = on_upgrade else {
                    // The connection cannot be taken over (not HTTP/1.1).
                    return Err(warp::reject::custom(ApiError::bad_request(
                        "Expected a WebSocket upgrade request",
                    )));
                };
                Ok(Handshake {
                    accept: derive_accept_key(key.as_bytes()),
                    on_upgrade,
                })
            },
        )
}

/// Checks an opening handshake (RFC 6455 4.2.1) and returns its `Sec-WebSocket-Key`.
///
/// Not an upgrade, no `Host`, or a key that is not the base64 of 16 bytes (or is given twice):
/// 400. A `Sec-WebSocket-Version` other than 13, or none: 426, which [`upgrade_required`]
/// answers with the version pgrelay speaks (4.2.2).
pub(crate) fn check_upgrade(headers: &HeaderMap) -> Result<&str, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !(has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")) {
        return Err(ApiError::bad_request(
            "Expected a WebSocket upgrade request",
        ));
    }
    let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
    if !(versions.next().is_some_and(|v| v == "13") && versions.next().is_none()) {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "Only WebSocket version 13 is supported",
        ));
    }
    if !headers.contains_key(header::HOST) {
        return Err(ApiError::bad_request(
            "A WebSocket upgrade needs a Host header",
        ));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return Err(ApiError::bad_request(
            "A WebSocket upgrade needs exactly one Sec-WebSocket-Key",
        ));
    };
    match key.to_str() {
        Ok(key) if BASE64.decode(key).is_ok_and(|nonce| nonce.len() == 16) => Ok(key),
        _ => Err(ApiError::bad_request(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        )),
    }
}

/// Answers a 426 from [`check_upgrade`] with `Sec-WebSocket-Version: 13` (RFC 6455 4.2.2);
/// every other rejection passes on to the routes after this one.
async fn upgrade_required(rejection: Rejection) -> Result<impl Reply, Rejection> {
    let required = rejection
        .find::<ApiError>()
        .is_some_and(|e| e.status == StatusCode::UPGRADE_REQUIRED);
    if !required {
        return Err(rejection);
    }
    let Ok(reply) = super::recover(rejection).await;
    Ok(warp::reply::with_header(
        reply,
        header::SEC_WEBSOCKET_VERSION,
        "13",
    ))
}

/// A client's text message, read; what the socket does with it depends on the socket.
#[derive(Debug)]
pub(crate) enum ClientMessage {
    /// `{"type":"ping"}`.
    Ping,
    /// `{"type":"auth","token":…}`.
    Auth(Value),
    /// `{"type":"subscribe",…}`.
    Subscribe(Value),
    /// `{"type":"unsubscribe","resource":…}`.
    Unsubscribe(Value),
    /// Not JSON.
    NotJson,
    /// JSON but not a message: answered with this `bad_request` message.
    Bad(String),
}

/// Reads a text message (JSON with a string `type`).
pub(crate) fn read_message(text: &str) -> ClientMessage {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return ClientMessage::NotJson;
    };
    match value.get("type").and_then(Value::as_str) {
        Some("ping") => ClientMessage::Ping,
        Some("auth") => ClientMessage::Auth(value),
        Some("subscribe") => ClientMessage::Subscribe(value),
        Some("unsubscribe") => ClientMessage::Unsubscribe(value),
        Some(other) => ClientMessage::Bad(format!(
            "Unknown message type {other:?} (expected subscribe, unsubscribe, auth or ping)"
        )),
        None => ClientMessage::Bad("Message has no string \"type\"".into()),
    }
}

/// The token of an `auth` message (`token`, or `access_token`).
pub(crate) fn auth_token(message: &Value) -> Option<&str> {
    message
        .get("token")
        .or_else(|| message.get("access_token"))
        .and_then(Value::as_str)
}

/// Replies 101 and runs the session on the upgraded connection, as a task of the tracker.
fn upgrade(handshake: Handshake, state: Arc<AppState>, opening: Opening) -> impl Reply {
    accept(handshake, Arc::clone(&state), move |socket| async move {
        let single = match &opening {
            Opening::Table(first) => Some(first.resource.clone()),
            _ => None,
        };
        Session::new(socket, state, single).run(opening).await;
    })
}

/// Replies 101 and runs `session` on the upgraded connection (with pgrelay's socket limits),
/// as a task of the tracker.
pub(super) fn accept<F, Fut>(handshake: Handshake, state: Arc<AppState>, session: F) -> impl Reply
where
    F: FnOnce(WebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = state.config.max_client_frame;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let Handshake { accept, on_upgrade } = handshake;
    let tracker = state.tracker.clone();
    // In the span of the connection it came on (its peer): the socket's log lines say who.
    tracker.spawn(tracing::Instrument::in_current_span(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = TokioIo::new(upgraded);
                let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                session(socket).await;
            }
            Err(err) => tracing::debug!(error = %err, "websocket upgrade did not complete"),
        }
    }));
    let reply =
        warp::reply::with_status(warp::reply(), warp::http::StatusCode::SWITCHING_PROTOCOLS);
    let reply = warp::reply::with_header(reply, "connection", "upgrade");
    let reply = warp::reply::with_header(reply, "upgrade", "websocket");
    warp::reply::with_header(reply, "sec-websocket-accept", accept)
}

/// One table subscription on a socket (or an SSE stream).
pub(super) struct Subscription {
    pub(super) table: TableInfo,
    /// What the caller may do with the table (a refreshed token must leave it as it is).
    pub(super) access: Access,
    topic: Arc<Topic>,
    cursor: Cursor,
    /// What the client asked for (a subscribe message on `/ws/{table}` overrides parts).
    pub(super) params: Params,
    shape: Shape,
    /// Events whose transaction this snapshot contains were in the initial data: drop them.
    seen_in: Option<Snapshot>,
    /// Entries read from the cursor, waiting to be written.
    batch: Vec<Entry>,
}

impl Subscription {
    pub(super) fn new(
        table: TableInfo,
        access: Access,
        cursor: Cursor,
        params: Params,
        shape: Shape,
    ) -> Self {
        Subscription {
            table,
            access,
            topic: Arc::clone(cursor.topic()),
            cursor,
            params,
            shape,
            seen_in: None,
            // Allocated on first use: an idle subscription holds no slots.
            batch: Vec::new(),
        }
    }

    /// Whether it has written everything published on its table so far (its cursor is at
    /// the head and nothing read waits to be written).
    pub(super) fn caught_up(&self) -> bool {
        self.batch.is_empty() && self.cursor.caught_up()
    }

    /// Entries taken from the cursor per write: more when they go out as `batch` frames.
    fn write_limit(&self) -> usize {
        if self.params.batch == Some(true) {
            BATCH_EVENTS
        } else {
            WRITE_BATCH
        }
    }
}

/// Why a socket loop (or an SSE stream) ended, and how to close it.
pub(super) enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The peer is gone or the socket failed: nothing more to send.
    Gone,
}

/// Milliseconds since `epoch` when the client was last heard from (written by the reader
/// task, which sees every frame, pongs included, even while the session is busy).
pub(super) struct Heard {
    epoch: Instant,
    millis: AtomicU64,
}

impl Heard {
    fn now(&self) {
        let elapsed = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(elapsed, Ordering::Relaxed);
    }

    pub(super) fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.millis.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

struct Session {
    sink: SplitSink<WebSocket, Message>,
    /// When the client was last heard from.
    heard: Arc<Heard>,
    /// When the next heartbeat ping is due.
    next_ping: Instant,
    /// Client frames, read by a task of their own (see `Session::new`); `None` once the
    /// client is gone.
    frames_rx: FramesRx,
    reader: tokio::task::JoinHandle<()>,
    state: Arc<AppState>,
    /// `Some(resource)` on `/ws/{table}`; `None` on `/ws`.
    single: Option<String>,
    subs: Vec<Subscription>,
    /// Which subscription is polled first next time (round robin, for fairness).
    next_first: usize,
    /// Who the socket acts for; `None` until an `auth` message when it came without a token.
    principal: Option<Principal>,
    /// When the token expires (4001), or by when an `auth` message must come.
    deadline: Option<Instant>,
    /// A `/ws/{table}` subscription waiting for the `auth` message.
    pending: Option<First>,
    /// Client messages allowed now (refilled at the configured rate).
    bucket: Bucket,
}

/// A token bucket: `rate` messages per second, bursts of `2 × rate`.
pub(super) struct Bucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Bucket {
    pub(super) fn new(rate: u32) -> Bucket {
        let rate = f64::from(rate.max(1));
        Bucket {
            tokens: 2.0 * rate,
            rate,
            last: Instant::now(),
        }
    }

    /// Takes one message's token; false when the client is over its rate.
    pub(super) fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(2.0 * self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Client frames, as the reader task of [`spawn_reader`] passes them on.
pub(super) type FramesRx = tokio::sync::mpsc::Receiver<Result<Message, WsError>>;

/// Starts the task that reads a socket's client frames. The read half gets its own task,
/// polled only when the socket has data: every poll of a tungstenite stream zero-fills its
/// read buffer, and a session's event loop would otherwise poll it once per event written
/// (measured: 40% of the relay's CPU at 1,000 events/s to 100 subscribers). The task ends
/// when the client is gone or the receiver is dropped; the caller aborts it when done.
pub(super) fn spawn_reader(
    mut stream: SplitStream<WebSocket>,
) -> (FramesRx, tokio::task::JoinHandle<()>, Arc<Heard>) {
    let (frames_tx, frames_rx) = tokio::sync::mpsc::channel(16);
    let heard = Arc::new(Heard {
        epoch: Instant::now(),
        millis: AtomicU64::new(0),
    });
    let reader_heard = Arc::clone(&heard);
    let reader = tokio::spawn(async move {
        while let Some(frame) = stream.next().await {
            reader_heard.now();
            let failed = frame.is_err();
            if frames_tx.send(frame).await.is_err() || failed {
                break;
            }
        }
    });
    (frames_rx, reader, heard)
}

/// Sends Close, then waits briefly for the peer's Close so the handshake completes (dropping
/// at once can reset the connection before the peer reads our frame).
pub(super) async fn close_socket(
    sink: &mut SplitSink<WebSocket, Message>,
    frames_rx: &mut FramesRx,
    code: u16,
    reason: &'static str,
) {
    let frame = Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if sink.send(frame).await.is_ok() {
            while let Some(Ok(message)) = frames_rx.recv().await {
                if message.is_close() {
                    break;
                }
            }
        }
    })
    .await;
}

impl Session {
    fn new(socket: WebSocket, state: Arc<AppState>, single: Option<String>) -> Self {
        let (sink, stream) = socket.split();
        let (frames_rx, reader, heard) = spawn_reader(stream);
        state.metrics.add(&state.metrics.ws_connections, 1);
        let next_ping = Instant::now() + state.config.ping_interval;
        let bucket = Bucket::new(state.config.limits.max_message_rate);
        Session {
            sink,
            heard,
            next_ping,
            frames_rx,
            reader,
            state,
            single,
            subs: Vec::new(),
            next_first: 0,
            principal: None,
            deadline: None,
            pending: None,
            bucket,
        }
    }

    /// Takes the caller: from now on the socket acts for it, until its token expires.
    fn set_principal(&mut self, principal: Principal) {
        self.deadline = principal.expires_in().map(|d| Instant::now() + d);
        self.principal = Some(principal);
    }

    #[tracing::instrument(name = "ws", skip_all, fields(table = ?self.single))]
    async fn run(mut self, opening: Opening) {
        let opened = Instant::now();
        tracing::info!("socket opened");
        let end = match self.serve(opening).await {
            Ok(end) | Err(end) => end,
        };
        let role = self.principal.as_ref().map(|p| p.role.clone());
        match &end {
            End::Close(code, reason) => tracing::info!(
                code,
                reason,
                role,
                secs = opened.elapsed().as_secs_f64(),
                "socket closed"
            ),
            End::Gone => tracing::info!(
                role,
                secs = opened.elapsed().as_secs_f64(),
                "socket closed by the client"
            ),
        }
        if let End::Close(code, reason) = end {
            if code == close::SLOW_CONSUMER {
                self.state.metrics.inc(&self.state.metrics.slow_consumers);
            }
            close_socket(&mut self.sink, &mut self.frames_rx, code, reason).await;
        }
    }

    async fn serve(&mut self, opening: Opening) -> Result<End, End> {
        match opening {
            Opening::Refused(refusal) => {
                self.send_error(refusal.code, &refusal.message).await?;
                return Ok(End::Close(refusal.close, refusal.reason));
            }
            Opening::Multiplexed(Some(principal)) => self.set_principal(principal),
            Opening::Multiplexed(None) => self.await_auth(),
            Opening::Table(mut first) => match first.principal.take() {
                Some(principal) => {
                    self.set_principal(principal);
                    Box::pin(self.open_first(*first)).await?;
                }
                None => {
                    self.pending = Some(*first);
                    self.await_auth();
                }
            },
        }
        let ping_interval = self.state.config.ping_interval;
        let token = self.state.token.clone();
        // The handlers of rare moments (a client message, a subscription that starts or ends,
        // a deadline) are boxed while they run: inline, their state would be part of every
        // idle socket's task (it was 9.7 KiB of the 19 KiB an idle socket cost).
        loop {
            let deadline = self.deadline;
            tokio::select! {
                // priority 1: shutdown
                biased;
                _ = token.cancelled() => return Ok(End::Close(close::GOING_AWAY, "server shutting down")),
                // priority 2: the token ran out (or never came)
                _ = sleep_until_some(deadline) => return Err(Box::pin(self.on_deadline()).await),
                // priority 3: what the client says
                frame = self.frames_rx.recv() => {
                    Box::pin(self.on_client_frame(frame)).await?;
                }
                // priority 4: heartbeat
                _ = tokio::time::sleep_until(self.next_ping) => {
                    self.heartbeat().await?;
                    self.next_ping = Instant::now() + ping_interval;
                }
                // priority 5: events
                (index, result) = next_batch(&mut self.subs, self.next_first) => {
                    self.next_first = index + 1;
                    result.map_err(overflow_end)?;
                    if let Some(reason) = write_events(&mut self.sink, &mut self.subs[index], &self.state, self.principal.as_ref()).await? {
                        Box::pin(self.end_subscription(index, &reason)).await?;
                    }
                }
            }
        }
    }

    /// The socket came without a token: it has the auth timeout to send one.
    fn await_auth(&mut self) {
        self.deadline = Some(Instant::now() + self.state.config.auth.auth_timeout);
    }

    /// The deadline passed: no `auth` message came, or the token expired.
    async fn on_deadline(&mut self) -> End {
        let err = if self.principal.is_none() {
            AuthError::Missing
        } else {
            AuthError::Expired
        };
        let refusal = Refusal::unauthorized(&err);
        let message = match err {
            AuthError::Expired => {
                "The token has expired; send a new one in an auth message before exp, or reconnect"
            }
            _ => "No token arrived in time: send {\"type\":\"auth\",\"token\":…} first",
        };
        if let Err(end) = self.send_error(refusal.code, message).await {
            return end;
        }
        End::Close(refusal.close, refusal.reason)
    }

    /// Starts a `/ws/{table}` socket's subscription once its caller is known.
    async fn open_first(&mut self, first: First) -> Result<(), End> {
        let placed = self.place_first(first).await?;
        self.start_first(placed).await
    }

    /// Checks a `/ws/{table}` socket's subscription against its caller and takes its place in
    /// the stream, sending nothing (a refusal is sent by [`Self::start_first`]).
    async fn place_first(&mut self, first: First) -> Result<Result<Placed, Refusal>, End> {
        let ready = match first.ready {
            Some(ready) => ready,
            None => {
                let principal = self.principal.as_ref().ok_or(End::Gone)?;
                match prepare(&self.state, &first.resource, &first.params, principal).await {
                    Ok(ready) => ready,
                    Err(refusal) => return Ok(Err(refusal)),
                }
            }
        };
        let Some(topic) = self.state.hub.topic(&ready.table.resource) else {
            return Err(End::Close(close::NOT_FOUND, "table not exposed"));
        };
        let (cursor, reset) = match first.cursor {
            Some(cursor) => (cursor, false),
            None => open_cursor(&self.state, &topic, first.params.since).await,
        };
        let sub = Subscription::new(
            ready.table,
            ready.access,
            cursor,
            first.params.clone(),
            ready.shape,
        );
        Ok(Ok(Placed {
            sub,
            params: first.params,
            reset,
        }))
    }

    /// Starts what [`Self::place_first`] placed, or sends its refusal and closes.
    async fn start_first(&mut self, placed: Result<Placed, Refusal>) -> Result<(), End> {
        match placed {
            Ok(placed) => {
                self.subs.push(placed.sub);
                self.start(0, &placed.params, placed.reset).await
            }
            Err(refusal) => {
                self.send_error(refusal.code, &refusal.message).await?;
                Err(End::Close(refusal.close, refusal.reason))
            }
        }
    }

    /// `{"type":"auth","token":…}`: names the caller of a socket that came without a token,
    /// or refreshes the token before it expires. A token that would change what the socket's
    /// subscriptions may see is refused: the client reconnects with it.
    async fn on_auth(&mut self, message: &Value) -> Result<(), End> {
        let Some(token) = auth_token(message) else {
            return self
                .send_error("bad_request", "An auth message needs a \"token\" string")
                .await;
        };
        let principal = match self.state.gate.principal(Some(token)) {
            Ok(principal) => principal,
            Err(err) => {
                let refusal = Refusal::unauthorized(&err);
                self.send_error(refusal.code, &refusal.message).await?;
                return Err(End::Close(refusal.close, refusal.reason));
            }
        };
        if self.principal.is_some() {
            let changed = self
                .subs
                .iter()
                .any(|sub| self.state.gate.access(&sub.table, &principal) != sub.access);
            if changed {
                self.send_error(
                    "auth_changed",
                    "The new token grants different access than the subscriptions were made with; reconnect with it",
                )
                .await?;
                return Err(End::Close(
                    close::UNAUTHORIZED,
                    "token grants different access",
                ));
            }
        }
        let (role, expires_at) = (principal.role.clone(), principal.expires_at);
        self.set_principal(principal);
        // A `/ws/{table}` socket's subscription takes its place in the stream before the
        // client hears that it is authenticated: every change committed after that reaches it.
        let placed = match self.pending.take() {
            Some(first) => Some(self.place_first(first).await?),
            None => None,
        };
        self.send_text(control::authenticated(&role, expires_at))
            .await?;
        match placed {
            Some(placed) => self.start_first(placed).await,
            None => Ok(()),
        }
    }

    /// Pings, or closes a peer that has not been heard from for the ping timeout.
    async fn heartbeat(&mut self) -> Result<(), End> {
        if self.heard.silent_for() >= self.state.config.ping_timeout {
            return Err(End::Close(close::NORMAL, "heartbeat timeout"));
        }
        self.send(Message::Ping(Default::default())).await
    }

    /// A subscription that cannot go on (a column it names changed): the client is told; a
    /// `/ws/{table}` socket closes with 4400, a `/ws` socket keeps its other subscriptions.
    async fn end_subscription(&mut self, index: usize, reason: &str) -> Result<(), End> {
        let resource = self.subs[index].table.resource.clone();
        self.send_text(control::resource_error(
            &resource,
            "subscription_ended",
            reason,
        ))
        .await?;
        if self.single.is_some() {
            return Err(End::Close(close::BAD_REQUEST, "subscription ended"));
        }
        self.subs.remove(index);
        Ok(())
    }

    async fn on_client_frame(
        &mut self,
        frame: Option<Result<Message, WsError>>,
    ) -> Result<(), End> {
        let message = match frame {
            None => return Err(End::Gone),
            Some(Err(err)) => return Err(read_error_end(&err)),
            Some(Ok(message)) => message,
        };
        if matches!(message, Message::Text(_) | Message::Binary(_)) && !self.bucket.take() {
            let m = format!(
                "More than {} messages per second; slow down and reconnect",
                self.state.config.limits.max_message_rate
            );
            tracing::debug!("a client went over its message rate");
            self.state.metrics.inc(&self.state.metrics.limited);
            self.send_error("rate_limited", &m).await?;
            return Err(End::Close(close::RATE_LIMITED, "message rate limit"));
        }
        let text = match message {
            Message::Close(_) => return Err(End::Close(close::NORMAL, "")),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
            Message::Binary(_) => {
                return self
                    .send_error("bad_request", "Messages must be JSON text frames")
                    .await;
            }
            Message::Text(text) => text,
        };
        let message = read_message(text.as_str());
        // Text that is not JSON is answered before the caller is asked for, as it always was.
        if self.principal.is_none()
            && !matches!(
                message,
                ClientMessage::Auth(_) | ClientMessage::Ping | ClientMessage::NotJson
            )
        {
            let refusal = Refusal::unauthorized(&AuthError::Missing);
            self.send_error(refusal.code, &refusal.message).await?;
            return Err(End::Close(refusal.close, refusal.reason));
        }
        match message {
            ClientMessage::Ping => self.send_text(control::pong()).await,
            ClientMessage::Auth(value) => self.on_auth(&value).await,
            ClientMessage::Subscribe(value) => self.on_subscribe(&value).await,
            ClientMessage::Unsubscribe(value) => self.on_unsubscribe(&value).await,
            ClientMessage::NotJson => {
                self.send_error("bad_request", "Message is not valid JSON")
                    .await
            }
            ClientMessage::Bad(m) => self.send_error("bad_request", &m).await,
        }
    }

    /// `{"type":"subscribe", "resource"?, …query keys}`.
    async fn on_subscribe(&mut self, message: &Value) -> Result<(), End> {
        let named = message
            .get("resource")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let resource = match (&self.single, named) {
            (Some(single), None) => single.clone(),
            (Some(single), Some(named)) if &named == single => named,
            (Some(single), Some(named)) => {
                let m = format!("This socket streams {single:?}; subscribe to {named:?} on /ws");
                return self.send_error("bad_request", &m).await;
            }
            (None, Some(named)) => named,
            (None, None) => {
                return self
                    .send_error("bad_request", "Subscribe needs a \"resource\"")
                    .await;
            }
        };
        let principal = self.principal.as_ref().ok_or(End::Gone)?;
        let found = self
            .state
            .table_for(&decode(&resource), principal)
            .filter(|(_, access)| access.read);
        let Some((table, access)) = found else {
            let m = format!("Unknown resource {resource:?}");
            self.send_resource_error(&resource, "not_found", &m).await?;
            if self.single.is_some() {
                // This socket's own table is gone (dropped or renamed): nothing left to stream.
                return Err(End::Close(close::NOT_FOUND, "table not exposed"));
            }
            return Ok(());
        };
        let mut params = match Params::from_message(message) {
            Ok(params) => params,
            Err(m) => {
                return self
                    .send_resource_error(&resource, "bad_request", &format!("{resource}: {m}"))
                    .await;
            }
        };
        let existing = self.subs.iter().position(|s| s.table.resource == resource);
        if self.single.is_some()
            && let Some(index) = existing
        {
            params = self.subs[index].params.overridden_by(params);
        }
        let limit = self.state.config.limits.max_subscriptions;
        if existing.is_none() && self.subs.len() >= limit {
            self.state.metrics.inc(&self.state.metrics.limited);
            let m = format!("A socket may hold at most {limit} subscriptions");
            return self
                .send_resource_error(&resource, "too_many_subscriptions", &m)
                .await;
        }
        let shape = match compile_shape(&self.state, &table, &params, &access).await {
            Ok(shape) => shape,
            Err(SetupError::Bad(m)) => {
                return self
                    .send_resource_error(&resource, "bad_request", &format!("{resource}: {m}"))
                    .await;
            }
            Err(SetupError::NotFound) => {
                let m = format!("Unknown resource {resource:?}");
                return self.send_resource_error(&resource, "not_found", &m).await;
            }
            Err(SetupError::Unavailable) => {
                return self
                    .send_resource_error(
                        &resource,
                        "unavailable",
                        "The database is unavailable; try again",
                    )
                    .await;
            }
        };
        let Some(topic) = self.state.hub.topic(&resource) else {
            let m = format!("Unknown resource {resource:?}");
            return self.send_resource_error(&resource, "not_found", &m).await;
        };
        if self.single.is_some() {
            // On /ws/{table} the subscription exists; the message replaces its keys and, unless
            // it resumes with `since`, asks for the initial rows.
            let index = existing.expect("a /ws/{table} socket always has its subscription");
            self.subs[index].shape = shape;
            self.subs[index].params = params.clone();
            self.subs[index].table = table;
            self.subs[index].access = access;
            if params.since.is_some() {
                let (cursor, reset) = open_cursor(&self.state, &topic, params.since).await;
                self.subs[index].cursor = cursor;
                self.subs[index].seen_in = None;
                self.start(index, &params, reset).await
            } else {
                self.send_initial(index).await
            }
        } else {
            let (index, reset) = match existing {
                // Subscribing again replaces the keys; without `since` the position stays, so
                // nothing already published (but not yet sent) is skipped.
                Some(index) if params.since.is_none() => {
                    let sub = &mut self.subs[index];
                    sub.shape = shape;
                    sub.params = params.clone();
                    sub.table = table;
                    sub.access = access;
                    (index, false)
                }
                existing => {
                    let (cursor, reset) = open_cursor(&self.state, &topic, params.since).await;
                    let sub = Subscription::new(table, access, cursor, params.clone(), shape);
                    match existing {
                        Some(index) => {
                            self.subs[index] = sub;
                            (index, reset)
                        }
                        None => {
                            self.subs.push(sub);
                            (self.subs.len() - 1, reset)
                        }
                    }
                }
            };
            let key = &self.subs[index].table.key_columns;
            self.send_text(control::subscribed(&resource, key)).await?;
            self.start(index, &params, reset).await
        }
    }

    /// `{"type":"unsubscribe","resource":…}` (on `/ws`).
    async fn on_unsubscribe(&mut self, message: &Value) -> Result<(), End> {
        if self.single.is_some() {
            return self
                .send_error(
                    "bad_request",
                    "Unsubscribe is for /ws; close this socket instead",
                )
                .await;
        }
        let Some(resource) = message.get("resource").and_then(Value::as_str) else {
            return self
                .send_error("bad_request", "Unsubscribe needs a \"resource\"")
                .await;
        };
        match self.subs.iter().position(|s| s.table.resource == resource) {
            Some(index) => {
                let resource = resource.to_owned();
                self.subs.remove(index);
                self.send_text(control::unsubscribed(&resource)).await
            }
            None => {
                let m = format!("Not subscribed to {resource:?}");
                self.send_error("bad_request", &m).await
            }
        }
    }

    /// What a subscription sends first: a `reset` when its `since` is not in the history,
    /// then the initial rows if asked for (with `since`, only after a reset).
    async fn start(&mut self, index: usize, params: &Params, reset: bool) -> Result<(), End> {
        if reset {
            let message = control::reset(&self.subs[index].table.resource, "history_unavailable");
            self.send_text(message).await?;
        }
        if params.snapshot && (params.since.is_none() || reset) {
            self.send_initial(index).await?;
        }
        Ok(())
    }

    /// Sends the initial rows and from then on drops events the snapshot contains.
    async fn send_initial(&mut self, index: usize) -> Result<(), End> {
        let state = Arc::clone(&self.state);
        // The table as it is now (it may have been dropped, or its columns changed).
        let Some(table) = state.table(&self.subs[index].table.resource) else {
            let resource = self.subs[index].table.resource.clone();
            let m = format!("Table {resource:?} is not exposed by this relay");
            self.send_text(control::resource_error(&resource, "not_found", &m))
                .await?;
            if self.single.is_some() {
                return Err(End::Close(close::NOT_FOUND, "table not exposed"));
            }
            self.subs.remove(index);
            return Ok(());
        };
        let (ping_interval, ping_timeout) = (state.config.ping_interval, state.config.ping_timeout);
        let heard = Arc::clone(&self.heard);
        let mut next_ping = self.next_ping;
        let mut upkeep = move || {
            if heard.silent_for() >= ping_timeout {
                Upkeep::PeerSilent
            } else if Instant::now() >= next_ping {
                next_ping = Instant::now() + ping_interval;
                Upkeep::Ping
            } else {
                Upkeep::Nothing
            }
        };
        let sub = &mut self.subs[index];
        send_initial(&state, sub, &table, &mut self.sink, &mut upkeep).await
    }

    async fn send_error(&mut self, code: &str, message: &str) -> Result<(), End> {
        self.send_text(control::error(code, message)).await
    }

    /// An `error` about one subscription, naming its resource (so that a client of `/ws`
    /// knows which of its subscriptions failed).
    async fn send_resource_error(
        &mut self,
        resource: &str,
        code: &str,
        message: &str,
    ) -> Result<(), End> {
        self.send_text(control::resource_error(resource, code, message))
            .await
    }

    async fn send_text(&mut self, text: String) -> Result<(), End> {
        self.send(Message::text(text)).await
    }

    /// Sends one message unless shutdown comes first; a client that has not taken it within
    /// the ping timeout has stopped reading and is closed as a slow consumer.
    async fn send(&mut self, message: Message) -> Result<(), End> {
        send_to(&mut self.sink, &self.state, message).await
    }
}

/// Sends one message unless shutdown comes first; a client that has not taken it within the
/// ping timeout has stopped reading and is closed as a slow consumer.
pub(super) async fn send_to<S>(sink: &mut S, state: &AppState, message: Message) -> Result<(), End>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let limit = state.config.ping_timeout;
    tokio::select! {
        biased;
        _ = state.token.cancelled() => Err(End::Close(close::GOING_AWAY, "server shutting down")),
        sent = tokio::time::timeout(limit, sink.send(message)) => match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(close::SLOW_CONSUMER, "slow consumer")),
        },
    }
}

/// Sends a subscription's initial rows (as of now) to `sink`, and from then on drops the
/// events they contain. At most `max_snapshots` run at once; one not taken within the
/// snapshot deadline ends as a slow consumer. `upkeep` is asked between messages.
pub(super) async fn send_initial<S>(
    state: &AppState,
    sub: &mut Subscription,
    table: &TableInfo,
    sink: &mut S,
    upkeep: &mut (dyn FnMut() -> Upkeep + Send),
) -> Result<(), End>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let batch_rows = state.config.snapshot_batch_rows;
    // Read before the snapshot is taken: every event up to it is in the snapshot.
    let position = state.hub.position();
    // Initial-data reads take pooled connections: at most `max_snapshots` at once, so
    // REST keeps connections of its own.
    let permit = tokio::select! {
        biased;
        _ = state.token.cancelled() => return Err(End::Close(close::GOING_AWAY, "server shutting down")),
        permit = tokio::time::timeout(state.config.pool_wait_timeout, Arc::clone(&state.snapshots).acquire_owned()) => permit,
    };
    let Ok(Ok(_permit)) = permit else {
        tracing::debug!("initial data refused: every snapshot slot is busy");
        state.metrics.inc(&state.metrics.limited);
        let text = control::error(
            "unavailable",
            "Too many subscribers are taking initial data at once; try again",
        );
        send_to(sink, state, Message::text(text)).await?;
        return Err(End::Close(close::TRY_AGAIN, "snapshot slots busy"));
    };
    let deadline = state.config.limits.snapshot_deadline;
    state.metrics.add(&state.metrics.snapshots_running, 1);
    let _running = Running(&state.metrics);
    let sending = snapshot::send_initial(
        &state.pool,
        table,
        &sub.shape,
        batch_rows,
        position,
        snapshot::Target {
            sink: &mut *sink,
            upkeep,
            write_timeout: state.config.ping_timeout,
        },
    );
    let result = tokio::select! {
        biased;
        // Dropping the send rolls the snapshot's transaction back.
        _ = state.token.cancelled() => return Err(End::Close(close::GOING_AWAY, "server shutting down")),
        // A reader too slow to take its initial data within the deadline gives its
        // connection and snapshot back.
        _ = tokio::time::sleep(deadline) => {
            tracing::debug!(?deadline, "initial data not taken within the deadline");
            return Err(End::Close(close::SLOW_CONSUMER, "initial data not read within the deadline"));
        }
        result = sending => result,
    };
    match result {
        Ok(snapshot) => {
            sub.seen_in = Some(snapshot);
            // What was published while the initial data went out is read from the ring
            // (bounded); only what comes after counts against the queue limit.
            sub.cursor.rebase();
            Ok(())
        }
        Err(snapshot::SnapshotError::Socket(_)) => Err(End::Gone),
        Err(snapshot::SnapshotError::Stalled) => {
            Err(End::Close(close::SLOW_CONSUMER, "slow consumer"))
        }
        Err(snapshot::SnapshotError::PeerSilent) => {
            Err(End::Close(close::NORMAL, "heartbeat timeout"))
        }
        Err(err) => {
            tracing::error!(error = %crate::error::chain(&err), "initial data failed");
            let text = control::error("internal", "Initial data could not be read");
            let _ = send_to(sink, state, Message::text(text)).await;
            Err(End::Close(close::INTERNAL, "initial data failed"))
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
        self.state.metrics.dec(&self.state.metrics.ws_connections);
    }
}

/// Waits for entries on any subscription; returns which one has a batch. Pends forever when
/// there is no subscription. Polls starting at `first` so a busy table cannot starve others.
pub(super) async fn next_batch(
    subs: &mut [Subscription],
    first: usize,
) -> (usize, Result<(), Overflow>) {
    match subs.len() {
        0 => std::future::pending().await,
        1 => {
            let sub = &mut subs[0];
            let limit = sub.write_limit();
            (0, sub.cursor.next_batch(&mut sub.batch, limit).await)
        }
        n => {
            let mut waits: Vec<_> = subs
                .iter_mut()
                .enumerate()
                .map(|(i, sub)| {
                    Box::pin(async move {
                        let limit = sub.write_limit();
                        (i, sub.cursor.next_batch(&mut sub.batch, limit).await)
                    })
                })
                .collect();
            waits.rotate_left(first % n);
            select_all(waits).await.0
        }
    }
}

/// Feeds the subscription's batch (each entry shaped for it, minus what its initial data
/// holds), then flushes once; gives up with 4008 when the cursor overflows while the socket
/// is slow. Returns why the subscription ends, when an entry ends it.
pub(super) async fn write_events<S>(
    sink: &mut S,
    sub: &mut Subscription,
    state: &AppState,
    principal: Option<&Principal>,
) -> Result<Option<String>, End>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let Subscription {
        table,
        access,
        topic,
        cursor,
        shape,
        seen_in,
        batch,
        params,
    } = sub;
    let metrics = &state.metrics;
    let mut ended = None;
    let batching = params.batch == Some(true);
    // When the socket last took a frame: a subscriber is slow when it takes nothing for a
    // while, not when it takes a batch slowly.
    let progress = Progress::new();
    let write = async {
        let mut sent = 0u64;
        let mut group = Group::default();
        for entry in batch.iter() {
            if entry
                .xid()
                .is_some_and(|xid| seen_in.as_ref().is_some_and(|s| s.contains(xid)))
            {
                continue;
            }
            match shape.deliver(entry, topic) {
                Delivery::Send(frame) => {
                    let event = matches!(
                        entry.kind,
                        crate::hub::EntryKind::Change(_) | crate::hub::EntryKind::Truncate
                    );
                    if batching && event {
                        if let Some(full) = group.push(topic.resource_json(), &frame) {
                            feed(sink, Message::Text(full.into()), &progress).await?;
                            sent += 1;
                        }
                        continue;
                    }
                    if let Some(rest) = group.take() {
                        feed(sink, Message::Text(rest.into()), &progress).await?;
                        sent += 1;
                    }
                    feed(sink, Message::Text(frame), &progress).await?;
                    sent += 1;
                    // What follows a reset is shaped for the table as it is now. (Boxed:
                    // checking a filter is a large future, and every socket's task would
                    // hold its room all the time: 2 KiB per idle connection.)
                    if let Some(principal) = principal
                        && !event
                        && let Err(refusal) =
                            Box::pin(reshape(state, principal, params, (table, access, shape)))
                                .await
                    {
                        ended = Some(refusal.message);
                        break;
                    }
                }
                Delivery::Skip => {}
                Delivery::End(reason) => {
                    ended = Some(reason);
                    break;
                }
            }
        }
        if let Some(rest) = group.take() {
            feed(sink, Message::Text(rest.into()), &progress).await?;
            sent += 1;
        }
        sink.flush().await?;
        metrics.add(&metrics.frames_sent, sent);
        Ok::<_, WsError>(())
    };
    let token = &state.token;
    let result = {
        tokio::pin!(write);
        tokio::select! {
            biased;
            overflow = async {
                let overflow = cursor.overflowed().await;
                if overflow == Overflow::Lagged {
                    // Too far behind: close once the socket has taken nothing for a while.
                    loop {
                        let idle_until = progress.last() + STALL_GRACE;
                        if Instant::now() >= idle_until {
                            break;
                        }
                        tokio::time::sleep_until(idle_until).await;
                    }
                }
                overflow
            } => Err(overflow_end(overflow)),
            written = &mut write => written.map_err(|_| End::Gone),
            _ = tokio::time::sleep(state.config.ping_timeout) => {
                Err(End::Close(close::SLOW_CONSUMER, "slow consumer"))
            }
            _ = token.cancelled() => {
                // Shutting down: give the frames in flight a moment to go out, then close.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut write).await;
                Err(End::Close(close::GOING_AWAY, "server shutting down"))
            }
        }
    };
    batch.clear();
    if batch.capacity() > KEPT_BATCH {
        *batch = Vec::new();
    }
    result.map(|()| ended)
}

/// When a socket last took a frame (shared by the write and the stall check racing it).
struct Progress {
    start: Instant,
    millis: std::sync::atomic::AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            start: Instant::now(),
            millis: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn note(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis
            .store(millis, std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.millis.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Feeds one frame to the socket and notes that it took it.
async fn feed<S>(sink: &mut S, message: Message, progress: &Progress) -> Result<(), WsError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    sink.feed(message).await?;
    progress.note();
    Ok(())
}

/// Most events in one `batch` frame.
const BATCH_EVENTS: usize = 1000;

/// Most bytes of events in one `batch` frame (one event larger than this goes alone, in a
/// batch of one).
const BATCH_BYTES: usize = 1 << 20;

/// Events waiting to go out as one `{"type":"batch","resource":…,"events":[…]}` frame, each
/// element exactly the message it would have been on its own.
#[derive(Default)]
struct Group {
    text: String,
    events: usize,
}

impl Group {
    /// Adds an event; returns the frame when the group is full.
    fn push(&mut self, resource_json: &str, frame: &str) -> Option<String> {
        if self.events > 0 && self.text.len() + frame.len() > BATCH_BYTES {
            let full = self.take();
            self.push(resource_json, frame);
            return full;
        }
        if self.events == 0 {
            self.text.reserve(frame.len() + resource_json.len() + 40);
            self.text.push_str(r#"{"type":"batch","resource":"#);
            self.text.push_str(resource_json);
            self.text.push_str(r#","events":["#);
        } else {
            self.text.push(',');
        }
        self.text.push_str(frame);
        self.events += 1;
        (self.events >= BATCH_EVENTS).then(|| self.take()).flatten()
    }

    /// The frame of what is waiting, if anything is.
    fn take(&mut self) -> Option<String> {
        if self.events == 0 {
            return None;
        }
        self.events = 0;
        let mut text = std::mem::take(&mut self.text);
        text.push_str("]}");
        Some(text)
    }
}

/// How a socket whose client frames could not be read ends: a client that broke the protocol
/// is told why (RFC 6455 7.4.1), a connection that failed or went away is just dropped.
pub(super) fn read_error_end(err: &WsError) -> End {
    let end = match err {
        WsError::Capacity(_) => End::Close(close::TOO_BIG, "frame too large"),
        WsError::Utf8(_) => End::Close(close::INVALID_DATA, "invalid utf-8 in a text frame"),
        // The peer closed TCP without a close frame: nobody is left to tell.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(_) => End::Close(close::PROTOCOL_ERROR, "protocol error"),
        _ => End::Gone,
    };
    if let End::Close(code, _) = end {
        tracing::debug!(error = %err, code, "client frame refused");
    }
    end
}

pub(super) fn overflow_end(overflow: Overflow) -> End {
    match overflow {
        Overflow::Lagged => End::Close(close::SLOW_CONSUMER, "slow consumer: not reading"),
        Overflow::Evicted => End::Close(
            close::SLOW_CONSUMER,
            "slow consumer: fell behind the history",
        ),
        Overflow::Closed => End::Close(close::GOING_AWAY, "server shutting down"),
    }
}

/// Sleeps until `deadline`, or for ever when there is none.
pub(super) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Counts a running initial-data read while it lives.
struct Running<'a>(&'a crate::metrics::Metrics);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.dec(&self.0.snapshots_running);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header changes: `None` removes the header; a header named twice is sent twice.
    type Changes<'a> = &'a [(&'static str, Option<&'static str>)];

    /// A valid upgrade request's headers, with `changes` applied.
    fn headers(changes: Changes) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "relay.example"),
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ] {
            headers.insert(name, value.parse().unwrap());
        }
        for &(name, _) in changes {
            headers.remove(name);
        }
        for &(name, value) in changes {
            if let Some(value) = value {
                headers.append(name, value.parse().unwrap());
            }
        }
        headers
    }

    fn status(changes: Changes) -> u16 {
        match check_upgrade(&headers(changes)) {
            Ok(_) => 101,
            Err(e) => e.status.as_u16(),
        }
    }

    #[test]
    fn a_handshake_is_refused_unless_it_follows_rfc_6455() {
        assert_eq!(
            check_upgrade(&headers(&[])).ok(),
            Some("dGhlIHNhbXBsZSBub25jZQ==")
        );
        let key = "sec-websocket-key";
        let version = "sec-websocket-version";
        let cases: &[(Changes, u16)] = &[
            (&[(key, Some("hello"))], 400),
            (&[(key, Some("aGVsbG8="))], 400), // 5 bytes
            (&[(key, Some(""))], 400),
            (&[(key, Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="))], 400), // 22 bytes
            (&[(key, Some("dGhlIHNhbXBsZSBub25jZR=="))], 400),         // bits after the 16th byte
            (&[(key, None)], 400),
            (
                &[
                    (key, Some("dGhlIHNhbXBsZSBub25jZQ==")),
                    (key, Some("AAAAAAAAAAAAAAAAAAAAAA==")),
                ],
                400,
            ),
            (&[("host", None)], 400),
            (&[("upgrade", Some("h2c"))], 400),
            (&[("connection", None)], 400),
            (&[(version, Some("8"))], 426),
            (&[(version, None)], 426),
            (&[(version, Some("13")), (version, Some("8"))], 426),
            (&[("upgrade", Some("WebSocket"))], 101),
            (&[(key, Some("AAAAAAAAAAAAAAAAAAAAAA=="))], 101),
        ];
        for (changes, expected) in cases {
            assert_eq!(status(changes), *expected, "{changes:?}");
        }
    }
}
