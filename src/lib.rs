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
//!   -> http  (warp: /ws/{table}, /ws, /sse/{table}, /api/{table}, /healthz, /readyz, /metrics)
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
//! - [`http`] — routes, the per-socket task, Server-Sent Events and the REST API.
//! - [`sql`], [`tls`] — install/uninstall, catalog, pool, identifier quoting; TLS to PostgreSQL
//!   and on the listener.
//! - [`retention`] — pruning the change log.
//! - [`config`], [`error`], [`metrics`].
//!
//! [`run`] is the whole server; `main.rs` and the tests call it the same way.

pub mod access;
pub mod capture;
pub mod config;
pub mod error;
pub mod event;
pub mod filter;
#[doc(hidden)]
pub mod fuzz;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod retention;
pub mod row;
pub mod schema;
pub mod settings;
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
    let address = listener.local_addr()?;
    if !address.ip().is_loopback() && !config.auth.enabled() && !config.allow_anonymous {
        return Err(config::ConfigError::AnonymousExposed(address).into());
    }
    let authenticator =
        access::Authenticator::new(config.auth.clone()).map_err(config::ConfigError::Keys)?;
    let tls = config.listener_tls()?.map(TlsAcceptor::from);
    let hosts = http::host::Hosts::new(address.ip().is_loopback(), &config.allowed_hosts)
        .map_err(|m| config::ConfigError::Option("allowed_hosts", m))?;
    tokio::pin!(shutdown);
    // A database that is not up yet (started together with the relay, restarting) is waited
    // for, as capture waits for it once running; a setting that cannot work fails at once.
    let mut backoff = std::time::Duration::from_millis(100);
    let mut client = loop {
        match sql::connect(&config.database_url).await {
            Ok(client) => break client,
            Err(err) if sql::is_unavailable(&err) => {
                tracing::warn!(database = %sql::describe_target(&config.database_url),
                    error = %error::chain(&err), retry_in = ?backoff,
                    "the database is not reachable yet; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(
                    config
                        .max_backoff
                        .max(std::time::Duration::from_millis(100)),
                );
            }
            Err(err) => {
                return Err(Error::Startup(
                    sql::describe_target(&config.database_url),
                    Box::new(err),
                ));
            }
        }
    };
    let mode = config.capture_mode.name();
    if config.install {
        sql::install(&mut client, &config.tables, mode).await?;
        tracing::info!(tables = ?config.tables.iter().map(ToString::to_string).collect::<Vec<_>>(), mode, "capture installed");
    }
    // The tables as served and the schema watcher's baseline, in one snapshot: a change
    // made any time after it is seen by the watcher's first check.
    client
        .batch_execute("begin isolation level repeatable read read only")
        .await
        .map_err(sql::SqlError::from)?;
    let infos = sql::describe(&client, &config.tables).await?;
    let schema_start = schema::baseline(&client, &infos).await;
    client
        .batch_execute("commit")
        .await
        .map_err(sql::SqlError::from)?;
    check_policies(&config, &infos)?;
    warn_if_superuser(&client).await;
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
        target: sql::target(&config.database_url, capture::APPLICATION_NAME)?,
        mode: config.capture_mode,
        hub: Arc::clone(&hub),
        state: Arc::clone(&capture_state),
        metrics: Arc::clone(&metrics),
        report_interval: config.report_interval,
        poll_min: config.poll_min,
        poll_max: config.poll_max,
        notify_busy_rate: config.notify_busy_rate,
        max_backoff: config.max_backoff,
    };
    tracker.spawn(capture.run(token.clone()));
    // Serve only once capture is caught up: a subscriber must not connect into a window whose
    // commits the relay will never see, and initial data needs a position.
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
        capture: Arc::clone(&capture_state),
        start: schema_start,
    };
    tracker.spawn(watcher.run(token.clone()));

    let authenticator = Arc::new(authenticator);
    tracker.spawn(Arc::clone(&authenticator).watch(token.clone()));
    let gate = access::Gate {
        auth: authenticator,
        policies: config.policies.clone(),
    };
    // Snapshots never take the whole pool: REST keeps at least one connection.
    let snapshot_slots = config
        .limits
        .max_snapshots
        .min(config.pool_size.saturating_sub(1))
        .max(1);
    let snapshots = Arc::new(tokio::sync::Semaphore::new(snapshot_slots));
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
        gate,
        snapshots,
        hosts: Arc::new(hosts),
    });
    let scheme = if tls.is_some() { "https" } else { "http" };
    let limits = &state.config.limits;
    let connections = http::server::Connections::new(
        limits.max_connections,
        limits.max_connections_per_ip,
        state.config.pool_size as u64,
    );
    let header_timeout = limits.header_timeout;
    let overflow = http::overflow_routes(Arc::clone(&state));
    let routes = http::routes(state);
    tracker.spawn(http::server::serve(
        routes,
        overflow,
        listener,
        tls,
        connections,
        header_timeout,
        token.clone(),
    ));
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

/// Every column a policy names must be a column of its tables (a typo would otherwise hide
/// rows, or show them, silently).
fn check_policies(config: &Config, infos: &[sql::TableInfo]) -> Result<()> {
    for info in infos {
        for column in config.policies.columns_named(&info.name) {
            if !info.columns.iter().any(|c| c.name == column) {
                return Err(config::ConfigError::Policy(format!(
                    "policy: table {} has no column {column:?}",
                    info.name
                ))
                .into());
            }
        }
    }
    Ok(())
}

/// The relay's own reads (initial data, REST) run casts that table owners define, with the
/// relay's privileges: a superuser relay gives those away.
async fn warn_if_superuser(client: &tokio_postgres::Client) {
    let superuser = client
        .query_one(
            "select rolsuper from pg_catalog.pg_roles where rolname = current_user",
            &[],
        )
        .await
        .map(|row| row.get::<_, bool>(0));
    if let Ok(true) = superuser {
        tracing::warn!(
            "pgrelay is connected as a superuser: code that owners of exposed tables define (casts, functions in defaults) runs with superuser rights when the relay reads their rows; connect as a role with only the privileges the README lists"
        );
    }
}
