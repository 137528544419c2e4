//! pgrelay: pushes every row change of the tables you expose to WebSocket subscribers.
//!
//! # Layout
//!
//! The modules follow the data flow:
//!
//! ```text
//! any writer -> table -> AFTER triggers (sql/install.sql) -> pgrelay.changes (+ empty NOTIFY)
//!   capture  (one dedicated connection: polls the log for newly committed transactions,
//!             woken by NOTIFY or a timer; reconnects and catches up from where it was)
//!   -> hub   (per-table ring of frames encoded once; batch log for resumes; 4008)
//!   -> http  (warp: /ws/{table}, /ws, /api/{table}, /healthz, /readyz, /metrics)
//! schema watcher (renames, drops, column and trigger changes -> resets, routing)
//! REST (/api/{table}, pooled connections) writes like any other writer: through the triggers.
//! ```
//!
//! - [`event`], [`row`] — the change event, its wire format, rows as JSON text.
//! - [`capture`] — the capture connection, polls of the log, reconnect and catch-up.
//! - [`hub`] — fan-out and resume positions.
//! - [`snapshot`] — initial data and the snapshot handoff.
//! - [`filter`], [`subscription`] — what a subscriber asks for and what it receives.
//! - [`schema`] — the exposed tables as they are now.
//! - [`http`] — routes, the per-socket task and the REST API.
//! - [`sql`], [`tls`] — install/uninstall, catalog, pool, identifier quoting; TLS to PostgreSQL
//!   and on the listener.
//! - [`retention`] — pruning the change log.
//! - [`config`], [`error`], [`metrics`].
//!
//! [`run`] is the whole server; `main.rs` and the tests call it the same way.

pub mod capture;
pub mod config;
pub mod error;
pub mod event;
pub mod filter;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod retention;
pub mod row;
pub mod schema;
pub mod snapshot;
pub mod sql;
pub mod subscription;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, TableName};
pub use error::{Error, Result};

/// Serves until `shutdown` resolves, then closes every socket with 1001 and returns.
///
/// Startup: validate the config, install capture when asked, check the tables in the
/// catalog, start capture, serve on `listener` (HTTPS and WSS only when the config names a
/// certificate and key). Shutdown: cancel the root token (the server stops accepting, sockets
/// send 1001, capture UNLISTENs), then wait for every task, at most `config.shutdown_timeout`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let tls = config.listener_tls()?.map(TlsAcceptor::from);
    let mut client = sql::connect(&config.database_url).await?;
    let mode = config.capture_mode.name();
    if config.install {
        sql::install(&mut client, &config.tables, mode).await?;
        tracing::info!(tables = ?config.tables.iter().map(ToString::to_string).collect::<Vec<_>>(), mode, "capture installed");
    }
    let infos = sql::describe(&client, &config.tables).await?;
    drop(client);

    let pool = sql::pool(
        &config.database_url,
        config.pool_size,
        config.pool_wait_timeout,
        config.pool_connect_timeout,
    )?;
    let routes: Vec<(u32, String)> = infos
        .iter()
        .map(|t| (t.relid, t.resource.clone()))
        .collect();
    let limits = hub::HubLimits {
        ring_events: config.history_events,
        ring_bytes: config.history_bytes,
        queue_bytes: config.queue_bytes,
    };
    let hub = Arc::new(hub::Hub::new(&routes, limits));
    let tables = Arc::new(schema::Tables::new(infos));
    let metrics = Arc::new(metrics::Metrics::default());
    let capture_state = Arc::new(capture::CaptureState::default());
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();

    let capture = capture::Capture {
        target: sql::target(&config.database_url, "pgrelay capture")?,
        mode: config.capture_mode,
        hub: Arc::clone(&hub),
        state: Arc::clone(&capture_state),
        metrics: Arc::clone(&metrics),
        report_interval: config.report_interval,
        poll_min: config.poll_min,
        poll_max: config.poll_max,
        max_backoff: config.max_backoff,
    };
    tracker.spawn(capture.run(token.clone()));
    // Serve only once capture is caught up: a subscriber must not connect into a window whose
    // commits the relay will never see, and initial data needs a position.
    tokio::pin!(shutdown);
    tokio::select! {
        _ = capture_state.wait_listening() => {}
        _ = &mut shutdown => {
            token.cancel();
            tracker.close();
            let _ = tokio::time::timeout(config.shutdown_timeout, tracker.wait()).await;
            return Ok(());
        }
    }
    tracker.spawn(retention::run(
        pool.clone(),
        config.retention,
        Arc::clone(&metrics),
        token.clone(),
    ));
    let watcher = schema::Watcher {
        names: config.tables.clone(),
        tables: Arc::clone(&tables),
        hub: Arc::clone(&hub),
        pool: pool.clone(),
        install: config.install,
        mode,
        interval: config.schema_interval,
    };
    tracker.spawn(watcher.run(token.clone()));

    let shutdown_timeout = config.shutdown_timeout;
    let state = Arc::new(http::AppState {
        config,
        tables,
        hub,
        pool,
        capture: capture_state,
        metrics,
        token: token.clone(),
        tracker: tracker.clone(),
    });
    let address = listener.local_addr()?;
    let routes = http::routes(state);
    let scheme = if tls.is_some() { "https" } else { "http" };
    match tls {
        None => tracker.spawn(
            warp::serve(routes)
                .incoming(listener)
                .graceful(token.clone().cancelled_owned())
                .run(),
        ),
        Some(tls) => tracker.spawn(tls::serve(routes, listener, tls, token.clone())),
    };
    tracing::info!(%address, scheme, "serving");

    shutdown.await;
    tracing::info!("shutting down");
    token.cancel();
    tracker.close();
    if tokio::time::timeout(shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        return Err(Error::ShutdownTimeout(format!("{} tasks", tracker.len())));
    }
    Ok(())
}
