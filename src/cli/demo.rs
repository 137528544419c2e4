//! `pgrelay demo`: a database, a demo table, a writer changing it, and the relay serving it on
//! loopback, until Ctrl-C.
//!
//! Without `--database-url` the demo starts a throwaway PostgreSQL cluster from the local
//! server binaries in a temporary directory, as `scripts/test.sh` does (as the `postgres` user
//! when run as root), and removes it on the way out: on Ctrl-C, SIGTERM or SIGHUP, when the
//! relay fails, and on any error once the directory exists ([`Throwaway`] removes it when
//! dropped). With `--database-url` it uses that database and creates nothing there but schema
//! `pgrelay_demo` (its table) and capture's own schema `pgrelay`, which it leaves in place.
//! `DATABASE_URL` is deliberately not read: a variable set for other tools must not quietly
//! point the demo at a real database.
//!
//! The relay is [`pgrelay::run`], exactly as `serve` runs it: loopback only, no
//! authentication, capture installed at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgrelay::TableName;
use pgrelay::error::chain;
use pgrelay::sql::{quote_ident, quote_table};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod cluster;
mod writer;

use cluster::{Throwaway, find_bindir, on_path};
use writer::{MAX_ROWS, Statements, Writer};

/// The demo table's name.
const TABLE: &str = "items";
/// The schema of the demo table in a database the user names (never their own `items`).
const OWN_SCHEMA: &str = "pgrelay_demo";
/// Login role and database of the throwaway cluster: not a superuser, so the relay runs as
/// the README recommends (and does not warn about a superuser connection).
const DEMO_ROLE: &str = "demo";
/// How long the relay may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the relay and the writer get to stop before they are abandoned.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// `pgrelay demo` options.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Use this database instead of a throwaway one: the demo creates its table there as
    /// `pgrelay_demo.items` if it is absent, and leaves it in place. Only this option selects
    /// a database: `DATABASE_URL` is not read.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Address to serve on. Loopback only (the demo has no authentication); port 0 picks a
    /// free port, and the demo prints it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Writes per second of the demo's writer (0: no writer).
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Directory of PostgreSQL's server binaries (initdb, pg_ctl, postgres) for the
    /// throwaway cluster. Default: `pg_config --bindir`, then `initdb` on PATH, then the
    /// newest /usr/lib/postgresql/*/bin or /usr/pgsql-*/bin, then /usr/local/pgsql/bin.
    #[arg(long)]
    pub pgbin: Option<PathBuf>,
}

/// Runs the demo until Ctrl-C (SIGINT), SIGTERM or SIGHUP, then removes what it started.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !(args.rate.is_finite() && (0.0..=1000.0).contains(&args.rate)) {
        bail!("--rate must be between 0 and 1000 writes a second");
    }
    // First of all: from here on a signal is the demo's to handle, so whatever it starts is
    // removed before the process exits (a second signal only skips the waiting).
    let stop = CancellationToken::new();
    let hurry = CancellationToken::new();
    watch_signals(stop.clone(), hurry.clone())?;

    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| {
            format!(
                "Cannot listen on {} (is another program using it? --listen 127.0.0.1:0 picks a free port)",
                args.listen
            )
        })?;
    let address = listener.local_addr()?;
    if !address.ip().is_loopback() {
        bail!(
            "The demo serves without authentication, so only on a loopback address (127.0.0.1, [::1]), not {address}; to expose tables to others, use `pgrelay serve` with authentication"
        );
    }

    let (cluster, database_url, table) = match &args.database_url {
        Some(url) => {
            say(&format!(
                "pgrelay demo: using the database at {}",
                pgrelay::sql::describe_target(url)
            ));
            let table = TableName {
                schema: OWN_SCHEMA.to_owned(),
                table: TABLE.to_owned(),
            };
            (None, url.clone(), table)
        }
        None => {
            let bindir = find_bindir(args.pgbin.as_deref())?;
            say(&format!(
                "pgrelay demo: starting a throwaway PostgreSQL from {}",
                bindir.display()
            ));
            let cluster = match Throwaway::start(bindir).await {
                Ok(cluster) => cluster,
                // Ctrl-C on a terminal interrupts initdb and pg_ctl too: a stop, not a failure
                // (the directory is gone already).
                Err(_) if stop.is_cancelled() => {
                    say("pgrelay demo: stopped; removed the throwaway PostgreSQL");
                    return Ok(());
                }
                Err(err) => return Err(err),
            };
            say(&format!(
                "pgrelay demo: {} started in {}, port {} (removed when the demo stops)",
                cluster.version,
                cluster.dir.display(),
                cluster.port
            ));
            let url = cluster.url(DEMO_ROLE, DEMO_ROLE);
            let table = TableName {
                schema: "public".to_owned(),
                table: TABLE.to_owned(),
            };
            (Some(cluster), url, table)
        }
    };

    let mut tasks = Tasks::default();
    let demo = Demo {
        args: &args,
        address,
        database_url: &database_url,
        table: &table,
        cluster: cluster.as_ref(),
        stop: &stop,
    };
    let outcome = demo.run(listener, &mut tasks).await;
    stop.cancel();
    tasks.finish(&hurry).await;
    match cluster {
        Some(mut cluster) => {
            cluster.remove();
            say(&format!(
                "pgrelay demo: stopped; removed the throwaway PostgreSQL ({})",
                cluster.dir.display()
            ));
        }
        None => say(&format!(
            "pgrelay demo: stopped; {table} and capture's schema pgrelay stay in the database (to remove the table: drop schema {OWN_SCHEMA} cascade)"
        )),
    }
    outcome
}

/// What the demo runs on, once the database is there.
struct Demo<'a> {
    args: &'a DemoArgs,
    /// Where the relay listens.
    address: SocketAddr,
    database_url: &'a str,
    table: &'a TableName,
    /// The throwaway cluster, if the demo started one.
    cluster: Option<&'a Throwaway>,
    /// Cancelled on the first signal: everything stops.
    stop: &'a CancellationToken,
}

/// The demo's long-lived tasks, stopped in order by [`Tasks::finish`].
#[derive(Default)]
struct Tasks {
    /// The relay ([`pgrelay::run`]); `None` once it has returned (or was never started).
    relay: Option<JoinHandle<pgrelay::Result<()>>>,
    /// The writer; stops when the stop token is cancelled.
    writer: Option<JoinHandle<()>>,
}

impl Demo<'_> {
    /// Creates the table, starts the relay and the writer, prints how to use them, and waits
    /// for the stop signal (or the relay's failure).
    async fn run(
        &self,
        listener: tokio::net::TcpListener,
        tasks: &mut Tasks,
    ) -> anyhow::Result<()> {
        let Some(prepared) =
            until_stopped(self.stop, prepare_table(self.database_url, self.table)).await
        else {
            return Ok(());
        };
        let prepared = prepared?;

        let mut config = pgrelay::Config::new(self.database_url, vec![self.table.clone()]);
        config.install = true;
        let shutdown = self.stop.clone().cancelled_owned();
        tasks.relay = Some(tokio::spawn(pgrelay::run(config, listener, shutdown)));
        if !wait_ready(self.address, &mut tasks.relay, self.stop).await? {
            return Ok(());
        }
        if self.args.rate > 0.0 {
            let writer = Writer {
                database_url: self.database_url.to_owned(),
                statements: Statements::for_table(self.table),
                period: Duration::from_secs_f64(1.0 / self.args.rate),
                stop: self.stop.clone(),
            };
            tasks.writer = Some(tokio::spawn(writer.run()));
        }
        self.print_ready(&prepared);

        let Some(relay) = tasks.relay.as_mut() else {
            return Ok(());
        };
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => Ok(()),
            result = relay => {
                tasks.relay = None;
                Err(relay_ended(result))
            }
        }
    }

    /// What is running, and how to look at it and change it.
    fn print_ready(&self, prepared: &Prepared) {
        let table = self.table;
        let resource = table.resource();
        let place = match self.cluster {
            Some(_) => format!("table {resource} in database {DEMO_ROLE}"),
            None => format!("table {table}"),
        };
        if prepared.created {
            say(&format!(
                "pgrelay demo: created {place} ({} rows) and installed capture on it",
                prepared.rows
            ));
        } else {
            say(&format!(
                "pgrelay demo: using the existing {place} ({} rows); capture installed",
                prepared.rows
            ));
        }
        if self.args.rate > 0.0 {
            say(&format!(
                "pgrelay demo: a writer inserts, updates and deletes rows of {resource}, {} a second ({MAX_ROWS} rows at most)",
                self.args.rate
            ));
        }
        let address = self.address;
        say(&format!("pgrelay demo: dashboard at http://{address}/"));
        say("");
        let url = if address.to_string() == "127.0.0.1:8080" {
            String::new()
        } else {
            format!(" --url ws://{address}")
        };
        let psql = psql_command(self.database_url, self.cluster);
        say(&format!(
            "  the rows:        curl http://{address}/api/{resource}"
        ));
        say(&format!(
            "  their changes:   {} tail{url} --snapshot {resource}",
            own_command()
        ));
        say(&format!(
            "  write yourself:  {psql} -c \"insert into {resource}(name, price) values ('fig', 3)\""
        ));
        say("");
        say("Ctrl-C to stop.");
    }
}

/// Prints a line on stdout; a closed terminal (after SIGHUP) is not an error worth a panic.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Cancels `stop` on the first SIGINT, SIGTERM or SIGHUP and `hurry` on the next.
fn watch_signals(stop: CancellationToken, hurry: CancellationToken) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = interrupt.recv() => {}
                    Some(()) = terminate.recv() => {}
                    Some(()) = hangup.recv() => {}
                    else => return,
                }
                signalled(&stop, &hurry);
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            signalled(&stop, &hurry);
        }
    });
    Ok(())
}

/// One stop signal arrived.
fn signalled(stop: &CancellationToken, hurry: &CancellationToken) {
    if stop.is_cancelled() {
        if !hurry.is_cancelled() {
            say("pgrelay demo: not waiting any longer");
        }
        hurry.cancel();
    } else {
        say("\npgrelay demo: stopping (Ctrl-C again to skip waiting for open connections)");
        stop.cancel();
    }
}

/// `fut`'s output, or `None` if `stop` is cancelled first.
async fn until_stopped<T>(stop: &CancellationToken, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        _ = stop.cancelled() => None,
        out = fut => Some(out),
    }
}

impl Tasks {
    /// Waits for the relay to shut down, then for the writer (each at most [`STOP_TIMEOUT`],
    /// or until `hurry`), aborting what does not stop.
    async fn finish(&mut self, hurry: &CancellationToken) {
        if let Some(mut relay) = self.relay.take() {
            tokio::select! {
                biased;
                _ = hurry.cancelled() => relay.abort(),
                result = tokio::time::timeout(STOP_TIMEOUT, &mut relay) => match result {
                    Ok(Ok(Ok(()))) => {}
                    Ok(result) => tracing::warn!(error = %relay_ended(result), "relay shutdown"),
                    Err(_) => {
                        tracing::warn!("the relay did not stop in time; abandoning it");
                        relay.abort();
                    }
                },
            }
        }
        if let Some(mut writer) = self.writer.take() {
            tokio::select! {
                biased;
                _ = hurry.cancelled() => writer.abort(),
                result = tokio::time::timeout(STOP_TIMEOUT, &mut writer) => {
                    if result.is_err() {
                        writer.abort();
                    }
                }
            }
        }
    }
}

/// Why the relay task ended before it was asked to.
fn relay_ended(result: Result<pgrelay::Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    match result {
        Ok(Ok(())) => anyhow::anyhow!("The relay stopped"),
        Ok(Err(err)) => anyhow::anyhow!(chain(&err)),
        Err(err) => anyhow::anyhow!("The relay task failed: {err}"),
    }
}

/// Waits until the relay answers `/readyz` with 200: `Ok(false)` if stopped first, an error
/// if the relay ends (`relay` is then `None`) or takes longer than [`READY_TIMEOUT`].
async fn wait_ready(
    address: SocketAddr,
    relay: &mut Option<JoinHandle<pgrelay::Result<()>>>,
    stop: &CancellationToken,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ready(address).await {
            return Ok(true);
        }
        let Some(handle) = relay.as_mut() else {
            bail!("The relay is not running");
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(false),
            result = handle => {
                *relay = None;
                return Err(relay_ended(result));
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if Instant::now() > deadline {
            bail!("The relay was not ready after {READY_TIMEOUT:?}");
        }
    }
}

/// Whether `GET /readyz` answers 200.
async fn ready(address: SocketAddr) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request =
            format!("GET /readyz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut status = [0u8; 12];
        stream.read_exact(&mut status).await?;
        Ok::<_, std::io::Error>(&status == b"HTTP/1.1 200")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

// ---------------------------------------------------------------------------------------------
// The demo table

/// What [`prepare_table`] found or made.
struct Prepared {
    /// The demo created the table (else it was there from an earlier run).
    created: bool,
    /// Rows in it now.
    rows: i64,
}

/// Opens a connection, at most [`CONNECT_TIMEOUT`].
async fn connect(database_url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let target = pgrelay::sql::describe_target(database_url);
    tokio::time::timeout(CONNECT_TIMEOUT, pgrelay::sql::connect(database_url))
        .await
        .map_err(|_| {
            anyhow::anyhow!("Cannot connect to {target}: no answer in {CONNECT_TIMEOUT:?}")
        })?
        .map_err(|err| anyhow::anyhow!("Cannot connect to {target}: {}", chain(&err)))
}

/// Creates the demo table with a few rows unless it exists (its schema too), and checks that
/// an existing one has the demo's columns.
async fn prepare_table(database_url: &str, table: &TableName) -> anyhow::Result<Prepared> {
    let mut client = connect(database_url).await?;
    let name = quote_table(table);
    let tx = client.transaction().await?;
    if table.schema != "public" {
        tx.batch_execute(&format!(
            "create schema if not exists {}",
            quote_ident(&table.schema)
        ))
        .await
        .with_context(|| format!("creating schema {}", table.schema))?;
    }
    let exists: bool = tx
        .query_one(
            "select exists (select from pg_catalog.pg_class c
                              join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                             where n.nspname = $1 and c.relname = $2)",
            &[&table.schema, &table.table],
        )
        .await?
        .get(0);
    if !exists {
        tx.batch_execute(&format!(
            "create table {name} (
                 id bigint generated by default as identity primary key,
                 name text not null,
                 price numeric(10,2),
                 in_stock boolean not null default true,
                 updated_at timestamptz not null default now()
             )"
        ))
        .await
        .with_context(|| format!("creating table {table}"))?;
        let names = vec!["apple", "banana", "cherry", "damson", "elderberry"];
        let prices = vec![1.20_f64, 0.35, 4.50, 2.75, 6.10];
        let stock = vec![true, true, false, true, true];
        tx.execute(
            &format!(
                "insert into {name} (name, price, in_stock)
                 select n, round(p::numeric, 2), s
                   from unnest($1::text[], $2::float8[], $3::bool[]) as seed(n, p, s)"
            ),
            &[&names, &prices, &stock],
        )
        .await
        .with_context(|| format!("adding rows to {table}"))?;
    }
    tx.commit().await?;
    if exists {
        client
            .batch_execute(&format!(
                "select id, name, price, in_stock, updated_at from {name} limit 0"
            ))
            .await
            .map_err(|err| {
                anyhow::anyhow!(
                    "{table} exists but is not the demo's table (it needs columns id, name, price, in_stock, updated_at): {}; drop it, or use another database",
                    chain(&err)
                )
            })?;
    }
    let rows: i64 = client
        .query_one(&format!("select count(*) from {name}"), &[])
        .await?
        .get(0);
    Ok(Prepared {
        created: !exists,
        rows,
    })
}

// ---------------------------------------------------------------------------------------------
// Printed commands

/// `text` as one shell word.
fn sh_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@,+%".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// How to run this binary again from the current directory: `pgrelay` when PATH finds this
/// very file, else its path (`./target/release/pgrelay` when it is below the current
/// directory).
fn own_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "pgrelay".to_owned();
    };
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let found = on_path("pgrelay").and_then(|p| std::fs::canonicalize(p).ok());
    if found.as_deref() == Some(exe.as_path()) {
        return "pgrelay".to_owned();
    }
    if let Ok(cwd) = std::env::current_dir().and_then(std::fs::canonicalize)
        && let Ok(relative) = exe.strip_prefix(&cwd)
    {
        // A bare name would be looked up on PATH: `./pgrelay`, not `pgrelay`.
        let relative = Path::new(".").join(relative);
        return sh_quote(&relative.display().to_string());
    }
    sh_quote(&exe.display().to_string())
}

/// A psql command line for the demo's database (its password, if any, left out: psql asks).
fn psql_command(database_url: &str, cluster: Option<&Throwaway>) -> String {
    let program = match (on_path("psql"), cluster) {
        (Some(_), _) => "psql".to_owned(),
        (None, Some(cluster)) if cluster.bindir.join("psql").is_file() => {
            sh_quote(&cluster.bindir.join("psql").display().to_string())
        }
        _ => "psql".to_owned(),
    };
    let Ok(target) = pgrelay::sql::target(database_url, "psql") else {
        return program;
    };
    let config = &target.config;
    let mut words = vec![program];
    if let Some(host) = config.get_hosts().first() {
        let host = match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        };
        words.extend(["-h".to_owned(), sh_quote(&host)]);
    }
    if let Some(port) = config.get_ports().first() {
        words.extend(["-p".to_owned(), port.to_string()]);
    }
    if let Some(user) = config.get_user() {
        words.extend(["-U".to_owned(), sh_quote(user)]);
    }
    if let Some(dbname) = config.get_dbname() {
        words.push(sh_quote(dbname));
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(sh_quote("target/release/pgrelay"), "target/release/pgrelay");
        assert_eq!(sh_quote("/tmp/my dir"), "'/tmp/my dir'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn psql_is_pointed_at_the_database_without_its_password() {
        let line = psql_command("postgres://app:secret@db.example:6543/shop", None);
        assert!(
            line.ends_with("-h db.example -p 6543 -U app shop"),
            "{line}"
        );
        assert!(!line.contains("secret"), "{line}");
    }
}
