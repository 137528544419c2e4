//! pgrelay: pushes every row change of the tables you expose to WebSocket subscribers.
//!
//! # Layout
//!
//! The modules follow the data flow:
//!
//! ```text
//! any writer -> table -> AFTER triggers (sql/install.sql) -> pgrelay.changes + NOTIFY
//!   capture  (one dedicated LISTEN connection: decode, read pointers, catch up)
//!   -> hub   (per-table ring of frames encoded once; cursors; slow consumers -> 4008)
//!   -> http  (warp: /ws/{table}, /ws, /api/{table}, /healthz, /readyz, /metrics)
//! REST (/api/{table}, pooled connections) writes like any other writer: through the triggers.
//! ```
//!
//! - [`event`] — the change event and its wire format.
//! - [`capture`] — the LISTEN task, reconnect and catch-up.
//! - [`hub`] — fan-out.
//! - [`snapshot`] — initial data and the snapshot handoff.
//! - [`filter`], [`subscription`] — what a subscriber asks for and what it receives.
//! - [`http`] — routes, the per-socket task and the REST API.
//! - [`sql`] — install/uninstall, catalog, pool, identifier quoting.
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
pub mod snapshot;
pub mod sql;
pub mod subscription;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, TableName};
pub use error::{Error, Result};

/// Serves until `shutdown` resolves, then closes every socket with 1001 and returns.
///
/// Startup: validate the config, install capture when asked, check the tables in the
/// catalog, start capture, serve on `listener`. Shutdown: cancel the root token (warp stops
/// accepting, sockets send 1001, capture UNLISTENs), then wait for every task, at most
/// `config.shutdown_timeout`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let mut client = sql::connect(&config.database_url).await?;
    if config.install {
        sql::install(&mut client, &config.tables).await?;
        tracing::info!(tables = ?config.tables.iter().map(ToString::to_string).collect::<Vec<_>>(), "capture installed");
    }
    let infos = sql::describe(&client, &config.tables).await?;
    drop(client);

    let pool = sql::pool(
        &config.database_url,
        config.pool_size,
        config.pool_wait_timeout,
        config.pool_connect_timeout,
    )?;
    let names: Vec<(String, String)> = infos
        .iter()
        .map(|t| (t.name.schema.clone(), t.name.table.clone()))
        .collect();
    let limits = hub::HubLimits {
        ring_events: config.history_events,
        ring_bytes: config.history_bytes,
        queue_bytes: config.queue_bytes,
    };
    let hub = Arc::new(hub::Hub::new(&names, limits));
    let metrics = Arc::new(metrics::Metrics::default());
    let capture_state = Arc::new(capture::CaptureState::default());
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();

    let capture = capture::Capture {
        pg_config: sql::pg_config(&config.database_url, "pgrelay capture")?,
        hub: Arc::clone(&hub),
        state: Arc::clone(&capture_state),
        metrics: Arc::clone(&metrics),
        horizon_interval: config.horizon_interval,
        max_backoff: config.max_backoff,
    };
    tracker.spawn(capture.run(token.clone()));
    // Serve only once capture LISTENs: a subscriber must not connect into a window whose
    // commits the relay will never see.
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

    let shutdown_timeout = config.shutdown_timeout;
    let state = Arc::new(http::AppState {
        config,
        tables: std::sync::RwLock::new(
            infos.into_iter().map(|t| (t.resource.clone(), t)).collect(),
        ),
        hub,
        pool,
        capture: capture_state,
        metrics,
        token: token.clone(),
        tracker: tracker.clone(),
    });
    let address = listener.local_addr()?;
    let server = warp::serve(http::routes(state))
        .incoming(listener)
        .graceful(token.clone().cancelled_owned())
        .run();
    tracker.spawn(server);
    tracing::info!(%address, "serving");

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
