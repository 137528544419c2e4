//! `pgrelay bench --scenario writes`: what capture costs the writers, as ratios within one run.
//!
//! Four variants of the same table, each measured in a database of its own, created for the
//! measurement (named after this process, the workload, the variant and the run) and dropped
//! right after, also when the measurement fails or is interrupted:
//! - `none`: no trigger;
//! - `bare`: a bare row-level AFTER trigger, `perform pg_notify('bench', row_to_json(new)::text)`;
//! - `notify`: pgrelay's capture in notify mode, installed by [`pgrelay::sql::install`] (what
//!   `pgrelay install` does);
//! - `poll`: the same in poll mode (the log is written the same way, no NOTIFY).
//!
//! Measurements are interleaved round robin (none, bare, notify, poll, none, …) so that the
//! machine's noise hits every variant alike, and the median per variant is reported.
//!
//! In the pgrelay variants a relay follows the table, as in real use: the bench starts one
//! (this binary, `serve`) on the measurement's database once capture is installed, before the
//! writers start, and kills it once it has captured every event they wrote. What the writers
//! pay then includes what a relay does on the same server (poll mode's polls, the wake-ups of
//! notify mode), and the relay's own CPU time, and its capture backend's, are reported apart.
//! The bare variant's notifications are read by a session that LISTENs to them, so that it
//! too pays for delivery. With `relay: false` (`--no-relay`) nobody follows any table or
//! LISTENs (the method before the relay was added).
//!
//! With a lock timeout, each transaction is `BEGIN; write; COMMIT` under that `lock_timeout`,
//! and a writer a lock timeout cancels stops; it is counted by where it struck: at COMMIT, in
//! pgrelay's capture functions (the error's context names one), or in the write itself (the
//! table's own locks).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use pgrelay::capture::Mode;
use pgrelay::sql::quote_ident;

use super::LocalRelay;

mod report;
pub use report::{render, targets};

/// The bench table's name (the old `bench/triggers.sh` used the same).
const TABLE: &str = "bench_items";

/// Rows the `update` workload's table starts with (ids 1 to this).
const UPDATE_ROWS: i32 = 100_000;

/// `application_name` of the writer connections: their backends can be found in
/// `pg_stat_activity` (to profile one, say).
pub const WRITER_APP: &str = "pgrelay-bench-writer";

const CREATE_TABLE: &str = "create table bench_items (id bigserial primary key, name text, \
                            price numeric, created timestamptz default now())";

const FILL_TABLE: &str = "insert into bench_items (name, price) \
                          select 'item-' || g, g / 10.0 from generate_series(1, $1::int) as g";

const BARE_NOTIFY: &str = "
create function bench_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('bench', row_to_json(new)::text);
    return null;
end
$$;
create trigger bench_notify after insert or update on bench_items
    for each row execute function bench_notify();
";

const SETTINGS: &str = "select string_agg(name || '=' || current_setting(name), ', ' order by name)
                          from pg_settings where name in ('shared_buffers', 'synchronous_commit',
                          'fsync', 'full_page_writes', 'wal_level', 'max_wal_size')";

/// What the writers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Single-row INSERT transactions, `writers` connections.
    Insert,
    /// Single-row UPDATE transactions by random id of a 100,000-row table, `writers` connections.
    Update,
    /// 1,000-row `INSERT … SELECT` statements, one connection.
    #[value(name = "bulk1000")]
    Bulk1000,
    /// Two 200,000-row `INSERT … SELECT` statements, one connection.
    #[value(name = "bulk200k")]
    Bulk200k,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Insert => "insert",
            Workload::Update => "update",
            Workload::Bulk1000 => "bulk1000",
            Workload::Bulk200k => "bulk200k",
        }
    }

    /// Writer connections for `writers` asked for: the bulk workloads use one.
    fn writers(self, writers: usize) -> usize {
        match self {
            Workload::Insert | Workload::Update => writers.max(1),
            Workload::Bulk1000 | Workload::Bulk200k => 1,
        }
    }

    fn rows_per_transaction(self) -> u64 {
        match self {
            Workload::Insert | Workload::Update => 1,
            Workload::Bulk1000 => 1_000,
            Workload::Bulk200k => 200_000,
        }
    }

    /// Transactions per writer, for a workload that is not timed.
    fn count(self) -> Option<u64> {
        match self {
            Workload::Bulk200k => Some(2),
            _ => None,
        }
    }

    fn statement(self) -> &'static str {
        match self {
            Workload::Insert => {
                "insert into bench_items (name, price) values ('item-' || $1::int, $1::int / 10.0)"
            }
            Workload::Update => "update bench_items set price = price + 1 where id = $1::int8",
            Workload::Bulk1000 | Workload::Bulk200k => FILL_TABLE,
        }
    }

    fn label(self, writers: usize) -> String {
        match self {
            Workload::Insert => format!("single-row INSERT ({writers} writers)"),
            Workload::Update => format!("single-row UPDATE ({writers} writers)"),
            Workload::Bulk1000 => "1,000-row INSERT … SELECT (1 writer)".into(),
            Workload::Bulk200k => "200,000-row INSERT … SELECT (1 writer, 2 statements)".into(),
        }
    }
}

/// What the table carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// No trigger.
    None,
    /// A bare row-level `pg_notify(row_to_json(new)::text)` trigger.
    Bare,
    /// pgrelay's capture, notify mode.
    Notify,
    /// pgrelay's capture, poll mode.
    Poll,
}

impl Variant {
    const ALL: [Variant; 4] = [Variant::None, Variant::Bare, Variant::Notify, Variant::Poll];

    fn name(self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::Bare => "bare",
            Variant::Notify => "notify",
            Variant::Poll => "poll",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::None => "no capture",
            Variant::Bare => "bare row-level pg_notify",
            Variant::Notify => "pgrelay, notify mode",
            Variant::Poll => "pgrelay, poll mode",
        }
    }

    /// The capture mode `pgrelay install` is given, for the pgrelay variants.
    fn capture(self) -> Option<Mode> {
        match self {
            Variant::Notify => Some(Mode::Notify),
            Variant::Poll => Some(Mode::Poll),
            Variant::None | Variant::Bare => None,
        }
    }
}

/// Settings of one writes run.
#[derive(Debug, Clone)]
pub struct WritesConfig {
    /// The server's connection string; its database is only used to create and drop the
    /// bench's own.
    pub database_url: String,
    /// Workloads, measured one after another.
    pub workloads: Vec<Workload>,
    /// Writer connections of the single-row workloads.
    pub writers: usize,
    /// How long each timed measurement writes.
    pub duration: Duration,
    /// Measurements per workload and variant.
    pub runs: usize,
    /// `lock_timeout` of the writers (e.g. `1ms`): explicit transactions, cancellations counted.
    pub lock_timeout: Option<String>,
    /// `synchronous_commit` of the writers (e.g. `off`); the server's when `None`.
    pub synchronous_commit: Option<String>,
    /// A relay follows the table in the pgrelay variants (`false`: nobody does).
    pub relay: bool,
}

/// Writers a lock timeout cancelled, by where it struck.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Cancelled {
    /// In the write itself: the table's own locks.
    pub write: u64,
    /// Inside pgrelay's capture functions.
    pub trigger: u64,
    /// At COMMIT (NOTIFY's commit-time lock).
    pub commit: u64,
}

impl Cancelled {
    fn add(&mut self, other: Cancelled) {
        self.write += other.write;
        self.trigger += other.trigger;
        self.commit += other.commit;
    }

    /// All writers cancelled.
    pub fn total(&self) -> u64 {
        self.write + self.trigger + self.commit
    }
}

/// What one measurement found.
#[derive(Debug, Clone, Default)]
struct Measurement {
    transactions: u64,
    secs: f64,
    writers: usize,
    cancelled: Cancelled,
    /// Where each cancellation struck and the error's context, with how many.
    contexts: BTreeMap<String, u64>,
    /// CPU seconds the writers' backends used, all together (a server on this machine only).
    backend_cpu_secs: Option<f64>,
    /// CPU seconds the relay used from the writers' start until it had captured every event
    /// they wrote (the pgrelay variants with a relay only).
    relay_cpu_secs: Option<f64>,
    /// The same for the relay's capture connection's backend (and a server on this machine).
    relay_backend_cpu_secs: Option<f64>,
}

/// One workload and variant over every run.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Workload.
    pub workload: Workload,
    /// Variant.
    pub variant: Variant,
    /// Writer connections per measurement.
    pub writers: usize,
    /// Transactions per second of each run, in run order.
    pub tps: Vec<f64>,
    /// Their median.
    pub median_tps: f64,
    /// Rows written per second at the median.
    pub rows_per_sec: f64,
    /// Median throughput against the `none` variant's.
    pub vs_none: f64,
    /// Median throughput against the `bare` variant's.
    pub vs_bare: f64,
    /// Writers started, all runs together.
    pub clients: usize,
    /// Writers a lock timeout cancelled, all runs together.
    pub cancelled: Cancelled,
    /// Their errors' contexts (`step: context`), with how many, all runs together.
    pub contexts: BTreeMap<String, u64>,
    /// Median over the runs of the writers' backends' CPU time per transaction, in
    /// microseconds (a server on this machine only): less swayed by other load than
    /// throughput.
    pub backend_cpu_us_per_tx: Option<f64>,
    /// Median over the runs of the relay's CPU time per transaction, in microseconds, from
    /// the writers' start until it had captured every event they wrote (the pgrelay variants
    /// with a relay only).
    pub relay_cpu_us_per_tx: Option<f64>,
    /// The same for the backend of the relay's capture connection (found in
    /// `pg_stat_activity` by its `application_name`, so not when the connection string sets
    /// one; a server on this machine only).
    pub relay_backend_cpu_us_per_tx: Option<f64>,
}

/// What a writes run measured.
#[derive(Debug, Clone, Serialize)]
pub struct WritesReport {
    /// `pgrelay bench …` as it was run.
    pub command: String,
    /// When it ran (the server's clock, UTC).
    pub date: String,
    /// Server version, CPUs and the settings that shape write cost.
    pub server: String,
    /// First 12 hex digits of the SHA-256 of the capture SQL this binary installs.
    pub install_sql_sha256: String,
    /// Seconds per timed measurement.
    pub duration_secs: f64,
    /// Runs per workload and variant.
    pub runs: usize,
    /// The writers' lock timeout, if any.
    pub lock_timeout: Option<String>,
    /// The writers' `synchronous_commit`, if set.
    pub synchronous_commit: Option<String>,
    /// Whether a relay followed the table in the pgrelay variants.
    pub relay: bool,
    /// One row per workload and variant, in that order.
    pub rows: Vec<Row>,
    /// Sanity checks that failed (the log holding other than one event per row written).
    pub warnings: Vec<String>,
    /// Seconds the whole run took.
    pub elapsed_secs: f64,
}

impl WritesReport {
    /// The row of `workload` and `variant`, if measured.
    pub fn row(&self, workload: Workload, variant: Variant) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.workload == workload && r.variant == variant)
    }
}

/// Runs every workload in every variant, `config.runs` times, interleaved.
pub async fn run(config: &WritesConfig) -> anyhow::Result<WritesReport> {
    let started = Instant::now();
    let server = pgrelay::tls::target(&config.database_url)?;
    let admin = connect(&server, None, "pgrelay-bench").await?;
    // Ctrl-C ends the run after dropping the database of the measurement under way.
    let interrupted = CancellationToken::new();
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.cancel();
            }
        });
    }
    let mut results: BTreeMap<(Workload, Variant), Vec<Measurement>> = BTreeMap::new();
    let mut warnings = Vec::new();
    for &workload in &config.workloads {
        eprintln!("{}", workload.label(workload.writers(config.writers)));
        for run in 1..=config.runs.max(1) {
            for variant in Variant::ALL {
                if interrupted.is_cancelled() {
                    bail!("interrupted");
                }
                let name = format!(
                    "pgrelay_bench_{}_{}_{}_{run}",
                    std::process::id(),
                    workload.name(),
                    variant.name()
                );
                let measurement = in_database(&admin, &name, &interrupted, async {
                    measure(
                        config,
                        &server,
                        &admin,
                        &name,
                        workload,
                        variant,
                        &mut warnings,
                    )
                    .await
                })
                .await
                .with_context(|| format!("{} {} run {run}", workload.name(), variant.name()))?;
                eprintln!(
                    "  {:<8} {:<6} run {run}: {:>10.1} tps{}",
                    workload.name(),
                    variant.name(),
                    tps(&measurement),
                    match measurement.cancelled.total() {
                        0 => String::new(),
                        n => format!(" ({n} writers cancelled by the lock timeout)"),
                    }
                );
                results
                    .entry((workload, variant))
                    .or_default()
                    .push(measurement);
            }
        }
    }
    let rows = config
        .workloads
        .iter()
        .flat_map(|&w| Variant::ALL.map(|v| (w, v)))
        .filter_map(|key| {
            let runs = results.get(&key)?;
            let baseline = |variant| {
                results
                    .get(&(key.0, variant))
                    .map_or(f64::NAN, |m| median(&m.iter().map(tps).collect::<Vec<_>>()))
            };
            let tps: Vec<f64> = runs.iter().map(tps).collect();
            let median_tps = median(&tps);
            let mut cancelled = Cancelled::default();
            let mut contexts = BTreeMap::new();
            for m in runs {
                cancelled.add(m.cancelled);
                for (context, n) in &m.contexts {
                    *contexts.entry(context.clone()).or_default() += n;
                }
            }
            Some(Row {
                workload: key.0,
                variant: key.1,
                writers: runs.first().map_or(0, |m| m.writers),
                rows_per_sec: median_tps * key.0.rows_per_transaction() as f64,
                vs_none: median_tps / baseline(Variant::None),
                vs_bare: median_tps / baseline(Variant::Bare),
                median_tps,
                tps,
                clients: runs.iter().map(|m| m.writers).sum(),
                cancelled,
                contexts,
                backend_cpu_us_per_tx: per_tx_median(runs, |m| m.backend_cpu_secs),
                relay_cpu_us_per_tx: per_tx_median(runs, |m| m.relay_cpu_secs),
                relay_backend_cpu_us_per_tx: per_tx_median(runs, |m| m.relay_backend_cpu_secs),
            })
        })
        .collect();
    let version: String = admin.query_one("show server_version", &[]).await?.get(0);
    let settings: Option<String> = admin.query_one(SETTINGS, &[]).await?.get(0);
    let date: String = admin
        .query_one(
            "select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"')",
            &[],
        )
        .await?
        .get(0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(pgrelay::sql::INSTALL_SQL.as_bytes())
    };
    Ok(WritesReport {
        command: std::iter::once("pgrelay".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        date,
        server: format!(
            "PostgreSQL {version}, {cpus} CPUs, {}",
            settings.unwrap_or_default()
        ),
        install_sql_sha256: digest[..6].iter().map(|b| format!("{b:02x}")).collect(),
        duration_secs: config.duration.as_secs_f64(),
        runs: config.runs.max(1),
        lock_timeout: config.lock_timeout.clone(),
        synchronous_commit: config.synchronous_commit.clone(),
        relay: config.relay,
        rows,
        warnings,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

fn tps(m: &Measurement) -> f64 {
    m.transactions as f64 / m.secs.max(1e-9)
}

/// The median over `runs` of `cpu` (seconds) per transaction, in microseconds; `None` if a
/// run lacks it.
fn per_tx_median(runs: &[Measurement], cpu: impl Fn(&Measurement) -> Option<f64>) -> Option<f64> {
    runs.iter()
        .map(|m| cpu(m).map(|secs| secs * 1e6 / m.transactions.max(1) as f64))
        .collect::<Option<Vec<f64>>>()
        .map(|per_tx| median(&per_tx))
}

/// `database_url` pointing at database `dbname` instead of its own, for a relay started on
/// one of the bench's databases (it takes a connection string, not a parsed config). The
/// rest (host, user, TLS settings, …) stays as written: a URL gets a `dbname` query
/// parameter, a key=value string a `dbname` pair, which override the database named before
/// them (in libpq and tokio-postgres alike).
fn with_dbname(database_url: &str, dbname: &str) -> String {
    let url = database_url.trim();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let separator = match url.find('?') {
            None => "?",
            Some(_) if url.ends_with('?') || url.ends_with('&') => "",
            Some(_) => "&",
        };
        let dbname =
            percent_encoding::utf8_percent_encode(dbname, percent_encoding::NON_ALPHANUMERIC);
        format!("{url}{separator}dbname={dbname}")
    } else {
        let quoted = dbname.replace('\\', "\\\\").replace('\'', "\\'");
        format!("{url} dbname='{quoted}'").trim_start().to_owned()
    }
}

/// The median (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Opens a connection to `server`, to database `dbname` if given, named `application_name`.
async fn connect(
    server: &pgrelay::tls::Target,
    dbname: Option<&str>,
    application_name: &str,
) -> anyhow::Result<Client> {
    let mut config = server.config.clone();
    if let Some(dbname) = dbname {
        config.dbname(dbname);
    }
    config.application_name(application_name);
    let (client, connection) = config
        .connect(server.tls.clone())
        .await
        .with_context(|| format!("connecting to database {}", dbname.unwrap_or("(admin)")))?;
    tokio::spawn(async move {
        // Ends with an error when the bench drops the database under it: nothing to report.
        let _ = connection.await;
    });
    Ok(client)
}

/// Creates database `name`, runs `work`, and drops the database whatever `work` returned (or
/// when `interrupted` fires first).
async fn in_database<T>(
    admin: &Client,
    name: &str,
    interrupted: &CancellationToken,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    admin
        .batch_execute(&format!(
            "create database {} template template0",
            quote_ident(name)
        ))
        .await
        .with_context(|| format!("creating database {name}"))?;
    let result = tokio::select! {
        biased;
        _ = interrupted.cancelled() => Err(anyhow!("interrupted")),
        result = work => result,
    };
    let dropped = admin
        .batch_execute(&format!(
            "drop database if exists {} with (force)",
            quote_ident(name)
        ))
        .await
        .with_context(|| format!("dropping database {name}"));
    let value = result?;
    dropped?;
    Ok(value)
}

/// What one writer did.
#[derive(Debug, Default)]
struct Writer {
    /// Transactions committed.
    transactions: u64,
    /// Where a lock timeout stopped it, if one did.
    cancelled: Cancelled,
    /// That error's step and context.
    context: Option<String>,
    /// CPU seconds its backend used while it wrote (a server on this machine only).
    backend_cpu_secs: Option<f64>,
}

/// CPU seconds of a PostgreSQL backend of this machine (`None` if `pid` is no postgres
/// process here).
fn backend_cpu_secs(pid: &str) -> Option<f64> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !cmdline.starts_with(b"postgres") {
        return None;
    }
    super::cpu_secs(pid)
}

/// Where a transaction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Write,
    Commit,
}

/// Sets up `variant` in the fresh database `dbname` and measures `workload` on it.
async fn measure(
    config: &WritesConfig,
    server: &pgrelay::tls::Target,
    admin: &Client,
    dbname: &str,
    workload: Workload,
    variant: Variant,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Measurement> {
    let mut setup = connect(server, Some(dbname), "pgrelay-bench").await?;
    setup.batch_execute(CREATE_TABLE).await?;
    if workload == Workload::Update {
        setup.execute(FILL_TABLE, &[&UPDATE_ROWS]).await?;
        setup.batch_execute("vacuum analyze bench_items").await?;
    }
    match variant.capture() {
        Some(mode) => {
            pgrelay::sql::install(
                &mut setup,
                &[pgrelay::TableName::parse(TABLE)?],
                mode.name(),
            )
            .await
            .context("installing capture")?;
        }
        None if variant == Variant::Bare => setup.batch_execute(BARE_NOTIFY).await?,
        None => {}
    }
    // Backends' CPU time can be read from /proc when the server runs here.
    let local = server.config.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => true,
    });
    // The relay that follows the table; killed on drop, so also when this fails or the run
    // is interrupted.
    let relay = match variant.capture() {
        Some(mode) if config.relay => {
            let url = with_dbname(&config.database_url, dbname);
            let relay = LocalRelay::start(&url, TABLE, mode)
                .await
                .context("starting the relay")?;
            Some(relay)
        }
        _ => None,
    };
    // The bare trigger's consumer, so that it pays for delivery as capture does: a session
    // that LISTENs to its channel and reads every notification.
    let listener = match variant {
        Variant::Bare if config.relay => Some(Listener::start(server, dbname).await?),
        _ => None,
    };
    let relay_backend = match (&relay, local) {
        (Some(_), true) => capture_backend(admin, dbname).await?,
        _ => None,
    };
    // Every measurement starts from the same WAL state (needs the right to checkpoint; the
    // measurement goes on without it).
    let _ = admin.batch_execute("checkpoint").await;

    let writers = workload.writers(config.writers);
    // Every writer connects and prepares, then all start at once.
    let start = Arc::new(tokio::sync::Barrier::new(writers + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let client = connect(server, Some(dbname), WRITER_APP).await?;
        for (name, value) in [
            ("lock_timeout", &config.lock_timeout),
            ("synchronous_commit", &config.synchronous_commit),
        ] {
            if let Some(value) = value {
                client
                    .execute("select set_config($1, $2, false)", &[&name, value])
                    .await
                    .with_context(|| format!("setting {name}"))?;
            }
        }
        let backend = match local {
            true => {
                let pid: i32 = client
                    .query_one("select pg_backend_pid()", &[])
                    .await?
                    .get(0);
                Some(pid.to_string())
            }
            false => None,
        };
        let start = Arc::clone(&start);
        let explicit = config.lock_timeout.is_some();
        let duration = config.duration;
        tasks.spawn(async move {
            let statement = client.prepare(workload.statement()).await?;
            start.wait().await;
            let cpu_before = backend.as_deref().and_then(backend_cpu_secs);
            let end = Instant::now() + duration;
            let mut writer = Writer::default();
            loop {
                match workload.count() {
                    Some(count) if writer.transactions >= count => break,
                    None if Instant::now() >= end => break,
                    _ => {}
                }
                match transaction(&client, &statement, workload, explicit).await {
                    Ok(()) => writer.transactions += 1,
                    Err((step, err)) => match where_cancelled(&err, step, explicit) {
                        Some((cancelled, context)) => {
                            writer.cancelled = cancelled;
                            writer.context = Some(context);
                            break;
                        }
                        None => {
                            return Err(anyhow::Error::new(err)
                                .context(format!("a writer's transaction failed ({step:?})")));
                        }
                    },
                }
            }
            writer.backend_cpu_secs = cpu_before
                .zip(backend.as_deref().and_then(backend_cpu_secs))
                .map(|(before, after)| after - before);
            Ok::<_, anyhow::Error>(writer)
        });
    }
    let relay_pid = relay
        .as_ref()
        .and_then(LocalRelay::pid)
        .map(|pid| pid.to_string());
    let relay_cpu_before = relay_pid.as_deref().and_then(super::cpu_secs);
    let relay_backend_cpu_before = relay_backend.as_deref().and_then(backend_cpu_secs);
    start.wait().await;
    let began = Instant::now();
    let mut measurement = Measurement {
        writers,
        ..Measurement::default()
    };
    let mut writers_cpu_secs = Some(0.0);
    while let Some(result) = tasks.join_next().await {
        let writer = result.context("a writer task failed")??;
        measurement.transactions += writer.transactions;
        measurement.cancelled.add(writer.cancelled);
        if let Some(context) = writer.context {
            *measurement.contexts.entry(context).or_default() += 1;
        }
        writers_cpu_secs = writers_cpu_secs
            .zip(writer.backend_cpu_secs)
            .map(|(a, b)| a + b);
    }
    measurement.backend_cpu_secs = writers_cpu_secs;
    measurement.secs = began.elapsed().as_secs_f64();
    let expected = measurement.transactions * workload.rows_per_transaction();

    if let Some(listener) = listener {
        let received = listener.wait_for(expected).await;
        if received != expected {
            warnings.push(format!(
                "{} {}: the listener received {received} of {expected} notifications within {} s",
                workload.name(),
                variant.name(),
                CATCH_UP.as_secs()
            ));
        }
    }
    if let Some(relay) = relay {
        // The relay's share of the cost: until it has captured every event written.
        let captured = caught_up(&relay, expected).await;
        if captured != Some(expected) {
            warnings.push(format!(
                "{} {}: the relay captured {} of {expected} events within {} s",
                workload.name(),
                variant.name(),
                captured.map_or("(unknown)".to_owned(), |n| n.to_string()),
                CATCH_UP.as_secs()
            ));
        }
        let spent = |before: Option<f64>, after: Option<f64>| {
            before.zip(after).map(|(before, after)| after - before)
        };
        measurement.relay_cpu_secs = spent(
            relay_cpu_before,
            relay_pid.as_deref().and_then(super::cpu_secs),
        );
        measurement.relay_backend_cpu_secs = spent(
            relay_backend_cpu_before,
            relay_backend.as_deref().and_then(backend_cpu_secs),
        );
        relay.stop().await?;
    }

    // Sanity: capture must have logged exactly one event per row written (the relay's start
    // marker, a log row of no table, is not one).
    if variant.capture().is_some() {
        let logged: i64 = setup
            .query_one(
                "select coalesce(sum(n), 0)::int8 from pgrelay.changes \
                 where relid = 'bench_items'::regclass",
                &[],
            )
            .await?
            .get(0);
        if u64::try_from(logged).ok() != Some(expected) {
            warnings.push(format!(
                "{} {}: pgrelay.changes holds {logged} events, expected {expected}",
                workload.name(),
                variant.name()
            ));
        }
    }
    Ok(measurement)
}

/// A session LISTENing to the bare trigger's channel, counting what it receives.
struct Listener {
    received: tokio::sync::watch::Receiver<u64>,
    _client: Client,
}

impl Listener {
    async fn start(server: &pgrelay::tls::Target, dbname: &str) -> anyhow::Result<Listener> {
        let mut config = server.config.clone();
        config.dbname(dbname);
        config.application_name("pgrelay-bench-listener");
        let (client, mut connection) = config
            .connect(server.tls.clone())
            .await
            .context("connecting the bare trigger's listener")?;
        let (tx, received) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            let mut count = 0u64;
            // Ends when the bench drops the listener or the database.
            while let Some(Ok(message)) =
                futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let tokio_postgres::AsyncMessage::Notification(_) = message {
                    count += 1;
                    tx.send_replace(count);
                }
            }
        });
        client.batch_execute("listen bench").await?;
        Ok(Listener {
            received,
            _client: client,
        })
    }

    /// Waits until `expected` notifications came (or [`CATCH_UP`] passed); how many did.
    async fn wait_for(mut self, expected: u64) -> u64 {
        let _ = tokio::time::timeout(CATCH_UP, self.received.wait_for(|n| *n >= expected)).await;
        *self.received.borrow()
    }
}

/// How long the relay may take, once the writers are done, to capture what they wrote.
const CATCH_UP: Duration = Duration::from_secs(60);

/// Waits until `relay` has captured `expected` events (or [`CATCH_UP`] has passed); returns
/// how many it had captured then, if its metrics answered.
async fn caught_up(relay: &LocalRelay, expected: u64) -> Option<u64> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let captured = relay.events_captured().await;
        if captured.is_some_and(|n| n >= expected) || Instant::now() >= deadline {
            return captured;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid of the backend of the relay's capture connection on database `dbname`, found by
/// its `application_name` (`None` unless there is exactly one: the connection string may
/// name every connection the same).
async fn capture_backend(admin: &Client, dbname: &str) -> anyhow::Result<Option<String>> {
    let pids: Vec<i32> = admin
        .query(
            "select pid from pg_stat_activity where datname = $1 and application_name = $2",
            &[&dbname, &pgrelay::capture::APPLICATION_NAME],
        )
        .await
        .context("finding the relay's capture backend")?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok(match pids.as_slice() {
        [pid] => Some(pid.to_string()),
        _ => None,
    })
}

/// One transaction of `workload`: the statement alone (autocommit), or `BEGIN; statement;
/// COMMIT` when `explicit`. Errors say which step failed.
async fn transaction(
    client: &Client,
    statement: &tokio_postgres::Statement,
    workload: Workload,
    explicit: bool,
) -> Result<(), (Step, tokio_postgres::Error)> {
    if explicit {
        client
            .batch_execute("begin")
            .await
            .map_err(|e| (Step::Write, e))?;
    }
    let written = match workload {
        Workload::Insert => {
            let p: i32 = rand::random_range(1..=100_000);
            client.execute(statement, &[&p]).await
        }
        Workload::Update => {
            let id = i64::from(rand::random_range(1..=UPDATE_ROWS));
            client.execute(statement, &[&id]).await
        }
        Workload::Bulk1000 | Workload::Bulk200k => {
            // At most 200,000: fits an i32.
            let rows = workload.rows_per_transaction() as i32;
            client.execute(statement, &[&rows]).await
        }
    };
    written.map_err(|e| (Step::Write, e))?;
    if explicit {
        client
            .batch_execute("commit")
            .await
            .map_err(|e| (Step::Commit, e))?;
    }
    Ok(())
}

/// Where a lock timeout cancelled a writer, if `err` is one and lock timeouts are counted,
/// with the step and the error's context as text (for the report).
fn where_cancelled(
    err: &tokio_postgres::Error,
    step: Step,
    counted: bool,
) -> Option<(Cancelled, String)> {
    if !counted || err.code() != Some(&SqlState::LOCK_NOT_AVAILABLE) {
        return None;
    }
    // The error's context lists the functions it passed through, e.g. "PL/pgSQL function
    // pgrelay.capture() line 52 at SQL statement".
    let context = err.as_db_error().and_then(|e| e.where_());
    let in_pgrelay = context.is_some_and(|context| context.contains("pgrelay."));
    let described = format!(
        "{}: {}",
        match step {
            Step::Write => "write",
            Step::Commit => "COMMIT",
        },
        context.map_or("(no context)".to_owned(), |c| c.replace('\n', " / "))
    );
    let cancelled = match step {
        Step::Commit => Cancelled {
            commit: 1,
            ..Cancelled::default()
        },
        Step::Write if in_pgrelay => Cancelled {
            trigger: 1,
            ..Cancelled::default()
        },
        Step::Write => Cancelled {
            write: 1,
            ..Cancelled::default()
        },
    };
    Some((cancelled, described))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn with_dbname_points_a_connection_string_at_another_database_and_keeps_the_rest() {
        let name = "pgrelay_bench_1_insert_poll_1";
        for url in [
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgresql://u:p%40ss@db:5433/app?sslmode=disable&application_name=x",
            "postgres://u@db/app?",
            "postgres://u@db",
            "host=127.0.0.1 port=5433 dbname=postgres sslmode=disable",
            "  host=db user='a b' ",
        ] {
            let derived = with_dbname(url, name);
            let config = pgrelay::tls::target(&derived)
                .unwrap_or_else(|e| panic!("{derived}: {e}"))
                .config;
            assert_eq!(config.get_dbname(), Some(name), "{derived}");
            let original = pgrelay::tls::target(url).unwrap().config;
            assert_eq!(config.get_hosts(), original.get_hosts(), "{derived}");
            assert_eq!(config.get_ports(), original.get_ports(), "{derived}");
            assert_eq!(config.get_user(), original.get_user(), "{derived}");
            assert_eq!(
                config.get_application_name(),
                original.get_application_name(),
                "{derived}"
            );
        }
        // Characters a URL or a quoted value would read otherwise are escaped.
        for url in ["postgres://u@db/app", "host=db"] {
            let derived = with_dbname(url, "a b'c\\d&e");
            let config = pgrelay::tls::target(&derived).unwrap().config;
            assert_eq!(config.get_dbname(), Some("a b'c\\d&e"), "{derived}");
        }
    }
}
