//! HTTP surface: routes, shared state, and the one `recover` that renders every rejection.

pub mod assets;
pub mod host;
pub mod origin;
pub mod realtime;
pub mod rest;
pub mod server;
pub mod sse;
pub mod ws;

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

use deadpool_postgres::Pool;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::access::{Access, AuthError, Gate, Principal};
use crate::capture::CaptureState;
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::schema::Tables;
use crate::sql::{SqlError, TableInfo};

/// What every request handler and socket task shares.
pub struct AppState {
    /// Validated configuration.
    pub config: Config,
    /// Exposed tables by resource name, kept current by the schema watcher (and re-read when
    /// a request names a column the view does not know: [`AppState::refresh_columns`]).
    pub tables: Arc<Tables>,
    /// Fan-out of captured events.
    pub hub: Arc<Hub>,
    /// Query pool (snapshots).
    pub pool: Pool,
    /// Capture's readiness.
    pub capture: Arc<CaptureState>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Cancelled on shutdown; every socket task watches it.
    pub token: CancellationToken,
    /// Every socket task holds a token of it, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Who may read and write what.
    pub gate: Gate,
    /// Initial-data reads running at once (see [`crate::config::Limits::max_snapshots`]).
    pub snapshots: Arc<tokio::sync::Semaphore>,
    /// The `Host` names the listener answers to (DNS rebinding).
    pub hosts: Arc<host::Hosts>,
}

impl AppState {
    /// The exposed table named `resource` (`items`, `shop.orders`), as last read.
    pub fn table(&self, resource: &str) -> Option<TableInfo> {
        self.tables.get(resource)
    }

    /// The exposed table named `resource` and what `principal` may do with it; `None` for a
    /// table that is not exposed and for one the principal has no right on (the two are
    /// indistinguishable to the caller).
    pub fn table_for(&self, resource: &str, principal: &Principal) -> Option<(TableInfo, Access)> {
        let table = self.tables.get(resource)?;
        let access = self.gate.access(&table, principal);
        access.any().then_some((table, access))
    }

    /// Re-reads a table's columns from the catalog (a column was added or renamed since the
    /// relay last looked) and returns the table as it is now.
    pub async fn refresh_columns(
        &self,
        client: &tokio_postgres::Client,
        table: &TableInfo,
    ) -> Result<TableInfo, SqlError> {
        self.tables.refresh_columns(client, table).await
    }
}

/// A request error with its status, rendered as PostgREST renders errors:
/// `{"code","message","details","hint"}` (REST codes are SQLSTATEs for database errors and
/// `PGRSTxxx` for request errors; other routes keep their own snake_case codes).
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: Cow<'static, str>,
    /// Human-readable message; never SQL text or internals.
    pub message: String,
    /// More about it (PostgreSQL's DETAIL, or what the relay adds), or null.
    pub details: Option<String>,
    /// What to do about it, or null.
    pub hint: Option<String>,
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    /// 400 with code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// Any status and code.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            details: None,
            hint: None,
        }
    }

    /// The same error with `details`.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    /// The same error with a `hint`.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// 503 with code `PGRST000` (PostgREST's "Database connection error"): the database
    /// cannot be reached; the caller may retry.
    pub fn unavailable() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "PGRST000",
            "The database is unavailable; try again",
        )
    }

    /// 500 with code `PGRSTX00`; the details are in the relay's log.
    pub fn internal() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "PGRSTX00",
            "Internal error; the relay's log has the details",
        )
    }

    /// 404 with code `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "code": self.code,
            "message": self.message,
            "details": self.details,
            "hint": self.hint,
        })
    }

    /// The response: the JSON body with the status.
    pub fn into_response(self) -> warp::reply::Response {
        warp::reply::with_status(warp::reply::json(&self.body()), self.status).into_response()
    }
}

/// What a REST request without a token is told: exactly where REST reads one (as PostgREST
/// and Supabase's clients send it; a query string would end up in access logs).
pub const REST_TOKEN_MISSING: &str = "Authentication required: send the token in an \
     Authorization: Bearer header or an apikey header (REST does not read ?access_token=)";

/// What a WebSocket without a token is told: every place a socket's token may come from.
pub const WS_TOKEN_MISSING: &str = "Authentication required: send the token in an auth \
     message ({\"type\":\"auth\",\"token\":…}), an Authorization: Bearer or apikey header, \
     or ?access_token=";

impl ApiError {
    /// 401 for a missing, invalid or expired token on REST, with PostgREST's codes
    /// (`PGRST302` token required, `PGRST303` expired, `PGRST301` invalid); the message says
    /// which, never the token.
    pub fn unauthorized(err: &AuthError) -> Self {
        let (code, message) = match err {
            AuthError::Missing => ("PGRST302", REST_TOKEN_MISSING.to_owned()),
            AuthError::Expired => ("PGRST303", err.to_string()),
            AuthError::Invalid(_) => ("PGRST301", err.to_string()),
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 403 with code `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

/// The token of a request: `Authorization: Bearer`, else an `apikey` header.
pub fn token_header() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::header::optional::<String>("apikey"))
        .map(|authorization: Option<String>, apikey: Option<String>| {
            crate::access::auth::bearer(authorization.as_deref(), apikey.as_deref())
        })
        .or(warp::any().map(|| None))
        .unify()
}

/// The caller of a REST request; a bad or missing (when required) token is a 401.
pub fn caller(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Principal,), Error = Rejection> + Clone {
    token_header().and(with_state(state)).and_then(
        |token: Option<String>, state: Arc<AppState>| async move {
            state
                .gate
                .principal(token.as_deref())
                .map_err(|err| warp::reject::custom(ApiError::unauthorized(&err)))
        },
    )
}

fn with_state(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>,), Error = Infallible> + Clone {
    warp::any().map(move || Arc::clone(&state))
}

/// All routes, with one `recover`.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let origins = Arc::new(state.config.origins.clone());
    let hosts = Arc::clone(&state.hosts);
    let browser_facing = ws::table_route(Arc::clone(&state))
        .or(ws::multiplexed_route(Arc::clone(&state)))
        .or(sse::route(Arc::clone(&state)))
        .or(realtime::route(Arc::clone(&state)))
        .or(rest::routes(Arc::clone(&state)));
    // Health checks pass whatever their Host; everything else must be sent to a name the
    // relay answers to (DNS rebinding), then come from an allowed origin.
    health()
        .or(ready(Arc::clone(&state)))
        .or(host::guard(hosts).and(
            metrics(state)
                .or(root())
                .or(assets::files())
                .or(origin::guard(origins, browser_facing)),
        ))
        .recover(recover)
        .with(warp::log::custom(log_request))
}

/// One line per request (in the span of its connection, which names the peer): health
/// checks and metrics scrapes at debug, the rest at info. Never the query string, which may
/// carry a token.
fn log_request(info: warp::log::Info<'_>) {
    let (method, path, status) = (info.method(), info.path(), info.status().as_u16());
    let ms = info.elapsed().as_secs_f64() * 1000.0;
    if matches!(path, "/healthz" | "/readyz" | "/metrics") {
        tracing::debug!(target: "pgrelay::http", %method, path, status, ms, "request");
    } else {
        tracing::info!(target: "pgrelay::http", %method, path, status, ms, "request");
    }
}

/// What a connection past the connection cap is served: the health routes, and a 503 for
/// anything else.
pub fn overflow_routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let hosts = Arc::clone(&state.hosts);
    health()
        .or(ready(Arc::clone(&state)))
        .or(host::guard(hosts).and(metrics(state)))
        .or(warp::any().map(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "The relay is at its connection limit; try again later",
            )
            .into_response()
        }))
}

/// GET /: the dashboard for a browser (`Accept: text/html`), otherwise what this relay serves
/// as JSON (no table names: `/api` lists those the caller may use).
fn root() -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    warp::path::end()
        .and(warp::get())
        .and(warp::header::optional::<String>("accept"))
        .map(|accept: Option<String>| {
            // The answer depends on Accept: caches must keep the two apart.
            let mut response = if accept.is_some_and(|a| a.contains("text/html")) {
                assets::dashboard()
            } else {
                index()
            };
            response.headers_mut().insert(
                warp::http::header::VARY,
                warp::http::HeaderValue::from_static("accept"),
            );
            response
        })
}

/// What this relay serves, as JSON.
fn index() -> warp::reply::Response {
    warp::reply::json(&json!({
                "name": "pgrelay",
                "version": env!("CARGO_PKG_VERSION"),
                "routes": {
                    "/": "this index as JSON; the live dashboard for a browser",
                    "/client.js": "the JavaScript client (ES module; types at /client.d.ts)",
                    "/api": "the tables you may use, with their columns and rights",
                    "/api/{table}": "REST: read and write rows (PostgREST-style filters)",
                    "/rest/v1/{table}": "the same REST routes, where supabase-js looks for them",
                    "/ws/{table}": "WebSocket: a table's changes (filters, select, snapshot, since, batch)",
                    "/ws": "WebSocket: several tables on one socket (subscribe messages)",
                    "/realtime/v1/websocket": "Supabase Realtime's protocol (Phoenix channels, postgres_changes) for supabase-js",
                    "/sse/{table}": "Server-Sent Events: a table's changes (the keys of /ws/{table}; Last-Event-ID resumes)",
                    "/healthz": "the process is up",
                    "/readyz": "capture is connected and caught up",
                    "/metrics": "Prometheus metrics",
                },
            }))
            .into_response()
}

/// GET /healthz: the process is up.
fn health() -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})))
}

/// GET /readyz: 200 while capture LISTENs, 503 otherwise.
fn ready(state: Arc<AppState>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: Arc<AppState>| {
            let listening = state.capture.is_listening();
            let status = if listening {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = json!({"status": if listening { "ready" } else { "capture not listening" }});
            warp::reply::with_status(warp::reply::json(&body), status)
        })
}

/// GET /metrics: Prometheus text.
fn metrics(
    state: Arc<AppState>,
) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state))
        .map(|state: Arc<AppState>| {
            let mut text = state.metrics.render(state.capture.is_listening());
            crate::metrics::render_tables(&mut text, &state.hub.topic_stats());
            warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4")
        })
}

/// Turns every rejection into a JSON error with a status (PostgREST's shape, see [`ApiError`]).
pub async fn recover(rejection: Rejection) -> Result<impl Reply, Infallible> {
    let error = if let Some(e) = rejection.find::<ApiError>() {
        ApiError {
            status: e.status,
            code: e.code.clone(),
            message: e.message.clone(),
            details: e.details.clone(),
            hint: e.hint.clone(),
        }
    } else if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such route")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Method not allowed",
        )
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        ApiError::new(StatusCode::BAD_REQUEST, "PGRST100", "Invalid query string")
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PGRST102",
            "Request body too large",
        )
    } else if let Some(e) = rejection.find::<warp::reject::MissingHeader>() {
        ApiError::bad_request(format!("Missing header {}", e.name()))
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request(format!("Invalid header {}", e.name()))
    } else {
        tracing::warn!(rejection = ?rejection, "unhandled rejection");
        ApiError::bad_request("Bad request")
    };
    Ok(error.into_response())
}
