//! The `pgrelay` command line: serve, install, uninstall, status, tail, bench, demo.

mod bench;
mod cli;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use pgrelay::TableName;

#[derive(Parser)]
#[command(
    name = "pgrelay",
    version,
    about = "Pushes PostgreSQL row changes to WebSocket subscribers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as `text` (colours only on a terminal) or `json` (one object per line, for
    /// log collectors). `RUST_LOG` chooses what is logged (default `pgrelay=info,warn`; for
    /// `demo`, `warn`).
    #[arg(long, global = true, env = "PGRELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    Serve(Box<pgrelay::settings::Settings>),
    /// Make an API key: prints the key (give it to the client) and the `[[auth.api_keys]]`
    /// entry for the configuration (which stores only its SHA-256).
    ApiKey {
        /// The role the key acts as.
        #[arg(long, default_value = "service")]
        role: String,
    },
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
    Bench(Box<BenchArgs>),
    /// Print a table's events as JSON lines.
    ///
    /// Reconnects when the connection drops (resuming after the last event printed), starts
    /// over on `reset`, and exits with an error on a refusal (the relay's message printed).
    Tail {
        /// Base URL of the relay.
        #[arg(long, env = "PGRELAY_URL", default_value = "ws://127.0.0.1:8080")]
        url: String,
        /// Send the initial rows first.
        #[arg(long)]
        snapshot: bool,
        /// Resume after this event seq (from an earlier tail, say).
        #[arg(long)]
        since: Option<i64>,
        /// A JWT or API key, sent as `Authorization: Bearer`.
        #[arg(long, env = "PGRELAY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Table (resource) to follow, optionally with query keys: `items?price=gt.10`.
        table: String,
    },
    /// Try pgrelay: a throwaway PostgreSQL (or --database-url), a demo table, a writer
    /// changing it, and the relay serving it on loopback, until Ctrl-C.
    ///
    /// Without --database-url it starts a PostgreSQL cluster from the local server binaries
    /// in a temporary directory, and removes it on Ctrl-C.
    Demo(cli::demo::DemoArgs),
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
    /// Seconds of writing for `steady` and `fanout` (default 20), and per measurement for
    /// `writes` (default 10).
    #[arg(long)]
    duration: Option<u64>,
    /// Bytes of text per row.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Writer connections for `fanout` and `steady` (which spreads `rate` over them; default
    /// 4), and for the single-row workloads of `writes` (default 8).
    #[arg(long)]
    writers: Option<usize>,
    /// Capture mode the bench installs and its relay runs with (`notify` or `poll`).
    #[arg(long, default_value = "notify")]
    capture: String,
    /// Rows per INSERT statement for `fanout`.
    #[arg(long, default_value_t = 1)]
    statement_rows: usize,
    /// Subscribe with `batch=true`: events that arrive together come as one `batch` frame.
    #[arg(long)]
    batch: bool,
    /// `steady`: also measure a baseline in the same run: every transaction inserts its row
    /// into a second table too, whose bare `pg_notify` trigger a plain LISTEN client reads
    /// (commit-to-receive without the relay).
    #[arg(long)]
    baseline: bool,
    /// `steady`: also measure another relay in the same run, `NAME=ws://…` (repeatable):
    /// `subscribers` sockets to it, read by the same code as pgrelay's. Peers are fed by the
    /// baseline's table (so this implies `--baseline`): a bare row-level trigger sends
    /// `row_to_json(new)` on channel `pgrelay_bench_baseline` in every transaction. See
    /// `bench/peers/`.
    #[arg(long = "peer", value_name = "NAME=URL")]
    peers: Vec<String>,
    /// `NAME=SUBPROTOCOL`: the `Sec-WebSocket-Protocol` to ask peer NAME for (e.g.
    /// `graphql-transport-ws`).
    #[arg(long = "peer-protocol", value_name = "NAME=SUBPROTOCOL")]
    peer_protocols: Vec<String>,
    /// `NAME=MESSAGE`: a text message to send peer NAME after connecting (repeatable, sent
    /// in order, each after the peer's reply to the one before; e.g. graphql-ws's
    /// `connection_init`, then `subscribe`).
    #[arg(long = "peer-send", value_name = "NAME=MESSAGE")]
    peer_sends: Vec<String>,
    /// `NAME=POINTER`: the JSON pointer to the row id in peer NAME's messages (default
    /// `/id`, the payload as the trigger sent it).
    #[arg(long = "peer-id", value_name = "NAME=POINTER")]
    peer_ids: Vec<String>,
    /// Repeat the scenario this many times (each run is reported, then the median; `writes`
    /// interleaves its variants across the runs).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// `writes`: what the writers do (comma-separated): `insert` (single-row INSERTs),
    /// `update` (single-row UPDATEs), `bulk1000` (1,000-row INSERT … SELECT), `bulk200k`
    /// (two 200,000-row INSERT … SELECT).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "insert")]
    workload: Vec<bench::writes::Workload>,
    /// `writes`: the writers' `lock_timeout` (e.g. `1ms`). Each transaction is then BEGIN;
    /// write; COMMIT, and writers a lock timeout cancels are counted by where it struck.
    #[arg(long)]
    lock_timeout: Option<String>,
    /// `writes`: the writers' `synchronous_commit` (e.g. `off`, to leave the WAL flush out).
    #[arg(long)]
    synchronous_commit: Option<String>,
    /// `writes`: no relay follows the table in the pgrelay variants (by default the bench
    /// starts one per measurement, as in real use, and reports its CPU time apart).
    #[arg(long)]
    no_relay: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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
    let cli = Cli::parse();
    // The demo's own lines say what happens; its log shows only what goes wrong.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        _ => "pgrelay=info,warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            logs.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
    match cli.command {
        Command::Serve(settings) => serve(*settings).await,
        Command::ApiKey { role } => {
            use rand::Rng;
            let bytes: [u8; 24] = rand::rng().random();
            let key: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let key = format!("pgr_{key}");
            println!("key (give this to the client; it is not stored anywhere):\n  {key}\n");
            println!("configuration entry:\n");
            println!("[[auth.api_keys]]");
            println!(
                "sha256 = \"{}\"",
                pgrelay::access::auth::api_key_digest(&key)
            );
            println!("role = {}", toml_string(&role));
            println!("claims = {{}}");
            Ok(())
        }
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
            since,
            token,
            table,
        } => tail(&url, &table, snapshot, since, token.as_deref()).await,
        Command::Bench(args) => run_bench(*args).await,
        Command::Demo(args) => cli::demo::run(args).await,
    }
}

async fn serve(settings: pgrelay::settings::Settings) -> anyhow::Result<()> {
    let settings = settings.with_file()?;
    if settings.print_config {
        print!("{}", settings.to_redacted_toml());
        return Ok(());
    }
    let listen = settings.listen();
    let config = settings.into_config()?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    if let Err(err) = pgrelay::run(config, listener, shutdown_signal()).await {
        anyhow::bail!(pgrelay::error::chain(&err));
    }
    tracing::info!("stopped");
    Ok(())
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        bench::Scenario::Writes => return run_bench_writes(args).await,
        bench::Scenario::All => {
            let config = bench::all::AllConfig {
                database_url: args.db.database_url,
                runs: args.runs,
                duration: Duration::from_secs(args.duration.unwrap_or(10)),
                writes_duration: Duration::from_secs(args.duration.unwrap_or(10)),
            };
            print!("{}", bench::all::run(&config).await?);
            return Ok(());
        }
        _ => {}
    }
    let config = bench::BenchConfig {
        database_url: args.db.database_url,
        relay_url: args.relay_url,
        scenario: args.scenario,
        subscribers: args.subscribers,
        rows: args.rows,
        rate: args.rate,
        duration: Duration::from_secs(args.duration.unwrap_or(20)),
        payload_bytes: args.payload,
        writers: args.writers.unwrap_or(4),
        statement_rows: args.statement_rows,
        batch: args.batch,
        baseline: args.baseline,
        peers: bench::peers::parse(
            &args.peers,
            &args.peer_protocols,
            &args.peer_sends,
            &args.peer_ids,
        )?,
        capture: pgrelay::capture::Mode::parse(&args.capture)
            .ok_or_else(|| anyhow::anyhow!("--capture must be notify or poll"))?,
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

/// `pgrelay bench --scenario writes`: a markdown report (or JSON) on stdout, progress on stderr.
async fn run_bench_writes(args: BenchArgs) -> anyhow::Result<()> {
    let config = bench::writes::WritesConfig {
        database_url: args.db.database_url,
        workloads: args.workload,
        writers: args.writers.unwrap_or(8),
        duration: Duration::from_secs(args.duration.unwrap_or(10)),
        runs: args.runs,
        lock_timeout: args.lock_timeout,
        synchronous_commit: args.synchronous_commit,
        relay: !args.no_relay,
    };
    let report = bench::writes::run(&config).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", bench::writes::render(&report));
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

/// Close codes after which `tail` connects again (resuming): the relay went away or asked
/// the client to come back later. Every other close is a refusal, and final.
const TAIL_RETRY_CODES: [u16; 5] = [1000, 1001, 1011, 1013, 4008];

async fn tail(
    url: &str,
    table: &str,
    snapshot: bool,
    since: Option<i64>,
    token: Option<&str>,
) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
    let mut position = since;
    let mut want_snapshot = snapshot && since.is_none();
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        // `table` may carry query keys: `items?price=gt.10`.
        let mut target = format!("{}/ws/{}", url.trim_end_matches('/'), table);
        let mut add = |key: &str| {
            target.push(if target.contains('?') { '&' } else { '?' });
            target.push_str(key);
        };
        if let Some(seq) = position {
            add(&format!("since={seq}"));
        }
        if want_snapshot || (snapshot && position.is_none()) {
            add("snapshot=true");
        }
        let mut request = target
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad relay URL {target}"))?;
        if let Some(token) = token {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {token}")
                    .parse()
                    .context("the token cannot be sent in a header")?,
            );
        }
        let mut socket = match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => socket,
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status();
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                if status.as_u16() == 503 || status.as_u16() == 429 {
                    eprintln!("relay busy ({status}): {body}; retrying in {backoff:?}");
                } else {
                    anyhow::bail!("the relay refused {table}: {status}: {body}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                continue;
            }
            Err(err) => {
                eprintln!("cannot reach the relay ({err}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                continue;
            }
        };
        backoff = std::time::Duration::from_millis(200);
        want_snapshot = false;
        while let Some(message) = socket.next().await {
            let message = match message {
                Ok(message) => message,
                Err(err) => {
                    eprintln!("connection lost ({err}); reconnecting");
                    break;
                }
            };
            match message {
                Message::Text(text) => {
                    println!("{}", text.as_str());
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(text.as_str()) else {
                        continue;
                    };
                    if value["type"] == "reset" {
                        // The copy is stale: start over with the current rows.
                        position = None;
                        want_snapshot = true;
                        break;
                    }
                    if let Some(seq) = value["seq"].as_i64() {
                        position = Some(seq);
                    }
                }
                Message::Close(frame) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    if !TAIL_RETRY_CODES.contains(&code) {
                        anyhow::bail!("the relay closed the socket: {code} {reason}");
                    }
                    eprintln!("closed: {code} {reason}; reconnecting");
                    break;
                }
                _ => {}
            }
        }
    }
}
