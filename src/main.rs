//! The `pgrelay` command line: serve, install, uninstall, status, tail, bench.

mod bench;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use pgrelay::{Config, TableName};

#[derive(Parser)]
#[command(
    name = "pgrelay",
    version,
    about = "Pushes PostgreSQL row changes to WebSocket subscribers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Database {
    /// PostgreSQL connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the WebSocket and REST routes for the exposed tables.
    Serve(ServeArgs),
    /// Install capture (schema, log, triggers) on tables. Idempotent.
    Install {
        #[command(flatten)]
        db: Database,
        /// How relays learn of commits: `notify` (triggers NOTIFY; lowest latency) or `poll`
        /// (triggers never NOTIFY, so writers take no commit-time lock; relays poll).
        #[arg(long, env = "PGRELAY_CAPTURE", default_value = "notify", value_parser = ["notify", "poll"])]
        capture: String,
        /// Tables: `items` (schema public) or `schema.table`.
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Remove the capture triggers from tables (the log stays).
    Uninstall {
        #[command(flatten)]
        db: Database,
        /// Tables: `items` (schema public) or `schema.table`.
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// Show, per table, whether capture is installed and what the log holds.
    Status {
        #[command(flatten)]
        db: Database,
    },
    /// Measure delivery rate, latency, loss and relay CPU/RSS (see BENCHMARKS.md).
    Bench(BenchArgs),
    /// Print a table's events as JSON lines.
    Tail {
        /// Base URL of the relay.
        #[arg(long, default_value = "ws://127.0.0.1:8080")]
        url: String,
        /// Send the initial rows first.
        #[arg(long)]
        snapshot: bool,
        /// Table (resource) to follow, optionally with query keys: `items?price=gt.10`.
        table: String,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    db: Database,
    /// A running relay exposing table `pgrelay_bench` (`ws://host:port`); by default the
    /// bench starts its own and reports its CPU and memory.
    #[arg(long)]
    relay_url: Option<String>,
    /// What to measure.
    #[arg(long, value_enum, default_value = "burst")]
    scenario: bench::Scenario,
    /// WebSocket subscribers.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Rows of the burst statement.
    #[arg(long, default_value_t = 200_000)]
    rows: usize,
    /// Transactions per second for `steady` (0: as fast as one connection goes).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of writing for `steady` and `fanout`.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Bytes of text per row.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Writer connections for `fanout`.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Rows per INSERT statement for `fanout`.
    #[arg(long, default_value_t = 1)]
    statement_rows: usize,
    /// Repeat the scenario this many times (each run is reported, then the median).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    db: Database,
    /// Address to listen on.
    #[arg(long, env = "PGRELAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Tables to expose, comma separated: `items,shop.orders`.
    #[arg(long, env = "PGRELAY_TABLES", value_delimiter = ',', required = true)]
    tables: Vec<String>,
    /// Install capture for the tables at start (idempotent), and again if its triggers go
    /// missing while the relay runs.
    #[arg(long, env = "PGRELAY_INSTALL")]
    install: bool,
    /// How capture learns of commits: `notify` (wake-ups from the triggers' NOTIFY) or `poll`
    /// (poll the log; use with triggers installed with `--capture poll`).
    #[arg(long, env = "PGRELAY_CAPTURE", default_value = "notify", value_parser = ["notify", "poll"])]
    capture: String,
    /// Longest wait between polls of the log, in milliseconds (poll mode when idle; in
    /// notify mode, the safety net for a missed wake-up).
    #[arg(long, env = "PGRELAY_POLL_MAX_MS", default_value_t = 500)]
    poll_max_ms: u64,
    /// Milliseconds between checks of the exposed tables' catalog entries (renames, drops,
    /// column and trigger changes).
    #[arg(long, env = "PGRELAY_SCHEMA_INTERVAL_MS", default_value_t = 1000)]
    schema_interval_ms: u64,
    /// Seconds between server pings.
    #[arg(long, env = "PGRELAY_PING_INTERVAL", default_value_t = 15)]
    ping_interval: u64,
    /// Seconds of silence after which a socket is closed.
    #[arg(long, env = "PGRELAY_PING_TIMEOUT", default_value_t = 45)]
    ping_timeout: u64,
    /// Largest client frame, in bytes.
    #[arg(long, env = "PGRELAY_MAX_FRAME", default_value_t = 64 * 1024)]
    max_frame: usize,
    /// Per-connection queue limit in bytes (a subscriber further behind is closed with 4008).
    #[arg(long, env = "PGRELAY_QUEUE_BYTES", default_value_t = 8 * 1024 * 1024)]
    queue_bytes: u64,
    /// Events kept per table for catching up.
    #[arg(long, env = "PGRELAY_HISTORY_EVENTS", default_value_t = 250_000)]
    history_events: usize,
    /// Bytes kept per table for catching up.
    #[arg(long, env = "PGRELAY_HISTORY_BYTES", default_value_t = 64 * 1024 * 1024)]
    history_bytes: usize,
    /// Query pool size (initial data, REST).
    #[arg(long, env = "PGRELAY_POOL_SIZE", default_value_t = 16)]
    pool_size: usize,
    /// Seconds a request waits for a free pooled connection before answering 503.
    #[arg(long, env = "PGRELAY_POOL_WAIT_TIMEOUT", default_value_t = 5)]
    pool_wait_timeout: u64,
    /// Seconds opening a pooled connection may take before the request answers 503.
    #[arg(long, env = "PGRELAY_POOL_CONNECT_TIMEOUT", default_value_t = 5)]
    pool_connect_timeout: u64,
    /// Largest REST request body, in bytes (larger gets 413).
    #[arg(long, env = "PGRELAY_MAX_BODY", default_value_t = 1024 * 1024)]
    max_body: u64,
    /// Prune log events older than this many seconds (0: never by age).
    #[arg(long, env = "PGRELAY_RETENTION_SECS", default_value_t = 86_400)]
    retention_secs: u64,
    /// Keep at most this many log events (the newest).
    #[arg(long, env = "PGRELAY_RETENTION_ROWS")]
    retention_rows: Option<i64>,
    /// Serve HTTPS and WSS with this PEM certificate chain (needs --tls-key).
    #[arg(long, env = "PGRELAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "PGRELAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn tables(names: &[String]) -> anyhow::Result<Vec<TableName>> {
    names
        .iter()
        .filter(|n| !n.trim().is_empty())
        .map(|n| TableName::parse(n).map_err(anyhow::Error::from))
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "pgrelay=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Install {
            db,
            capture,
            tables: names,
        } => {
            let tables = tables(&names)?;
            let mut client = pgrelay::sql::connect(&db.database_url)
                .await
                .context("connecting to the database")?;
            pgrelay::sql::install(&mut client, &tables, &capture).await?;
            for t in &tables {
                println!("installed capture on {t} ({capture} mode)");
            }
            Ok(())
        }
        Command::Uninstall { db, tables: names } => {
            let tables = tables(&names)?;
            let mut client = pgrelay::sql::connect(&db.database_url)
                .await
                .context("connecting to the database")?;
            pgrelay::sql::uninstall(&mut client, &tables).await?;
            for t in &tables {
                println!("removed capture from {t}");
            }
            Ok(())
        }
        Command::Status { db } => {
            let client = pgrelay::sql::connect(&db.database_url)
                .await
                .context("connecting to the database")?;
            let (rows, relays) = pgrelay::sql::status(&client).await?;
            if rows.is_empty() {
                println!("capture is not installed in this database");
            }
            println!(
                "{:<40} {:<10} {:>10} {:>12} {:>12}",
                "table", "installed", "log events", "oldest seq", "newest seq"
            );
            for r in rows {
                let seq = |s: Option<i64>| s.map_or("-".to_owned(), |s| s.to_string());
                println!(
                    "{:<40} {:<10} {:>10} {:>12} {:>12}",
                    r.table,
                    if r.installed { "yes" } else { "no" },
                    r.log_events,
                    seq(r.oldest_seq),
                    seq(r.newest_seq)
                );
            }
            println!();
            println!(
                "{:<18} {:>12} {:>14} {:>12} {:>12} {:>18}",
                "relay", "last seq", "lag (s)", "seen (s ago)", "horizon", "held back by pid"
            );
            if relays.is_empty() {
                println!("(no relay has reported progress in the last day)");
            }
            for r in relays {
                let seq = r.last_seq.map_or("-".to_owned(), |s| s.to_string());
                let held = r.held_by.map_or("-".to_owned(), |p| match p {
                    0 => "prepared xact".to_owned(),
                    p => p.to_string(),
                });
                println!(
                    "{:<18} {:>12} {:>14.3} {:>12.1} {:>12} {:>18}",
                    r.instance, seq, r.lag_secs, r.seen_secs_ago, r.horizon, held
                );
            }
            Ok(())
        }
        Command::Tail {
            url,
            snapshot,
            table,
        } => tail(&url, &table, snapshot).await,
        Command::Bench(args) => run_bench(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::new(args.db.database_url, tables(&args.tables)?);
    config.install = args.install;
    config.capture_mode =
        pgrelay::capture::Mode::parse(&args.capture).context("--capture takes notify or poll")?;
    config.poll_max = Duration::from_millis(args.poll_max_ms);
    config.schema_interval = Duration::from_millis(args.schema_interval_ms);
    config.ping_interval = Duration::from_secs(args.ping_interval);
    config.ping_timeout = Duration::from_secs(args.ping_timeout);
    config.max_client_frame = args.max_frame;
    config.queue_bytes = args.queue_bytes;
    config.history_events = args.history_events;
    config.history_bytes = args.history_bytes;
    config.pool_size = args.pool_size;
    config.pool_wait_timeout = Duration::from_secs(args.pool_wait_timeout);
    config.pool_connect_timeout = Duration::from_secs(args.pool_connect_timeout);
    config.max_body_bytes = args.max_body;
    config.retention.max_age =
        (args.retention_secs > 0).then(|| Duration::from_secs(args.retention_secs));
    config.retention.max_rows = args.retention_rows;
    config.tls_cert = args.tls_cert;
    config.tls_key = args.tls_key;
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    if let Err(err) = pgrelay::run(config, listener, shutdown_signal()).await {
        anyhow::bail!(pgrelay::error::chain(&err));
    }
    tracing::info!("stopped");
    Ok(())
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let config = bench::BenchConfig {
        database_url: args.db.database_url,
        relay_url: args.relay_url,
        scenario: args.scenario,
        subscribers: args.subscribers,
        rows: args.rows,
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        payload_bytes: args.payload,
        writers: args.writers,
        statement_rows: args.statement_rows,
    };
    let mut reports = Vec::new();
    for run in 1..=args.runs.max(1) {
        let report = bench::run(&config).await?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("run {run}:\n{}", bench::render(&report));
        }
        reports.push(report);
    }
    if reports.len() > 1 && !args.json {
        println!(
            "median of {} runs:\n{}",
            reports.len(),
            bench::render(&bench::median(&reports))
        );
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the relay");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn tail(url: &str, table: &str, snapshot: bool) -> anyhow::Result<()> {
    // `table` may carry query keys: `items?price=gt.10`.
    let mut target = format!("{}/ws/{}", url.trim_end_matches('/'), table);
    if snapshot {
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str("snapshot=true");
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(&target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    while let Some(message) = socket.next().await {
        match message.context("reading from the relay")? {
            tokio_tungstenite::tungstenite::Message::Text(text) => println!("{}", text.as_str()),
            tokio_tungstenite::tungstenite::Message::Close(frame) => {
                if let Some(frame) = frame {
                    eprintln!("closed: {} {}", u16::from(frame.code), frame.reason);
                }
                break;
            }
            _ => {}
        }
    }
    Ok(())
}
