//! `pgrelay bench`: drives writes through a real relay to real WebSocket subscribers and
//! reports delivery rate, latency percentiles, loss and duplication, and CPU/RSS.
//!
//! The bench owns a table, `pgrelay_bench` (dropped and recreated, capture installed), and
//! by default starts its own relay as a child process (this same binary, `serve`), so the
//! relay's CPU time and peak RSS can be read from `/proc`. Subscribers are plain
//! tokio-tungstenite clients; they do not parse frames as JSON, only find the row id (and,
//! for latency, the capture time) in the text, so the load generator stays cheap.
//!
//! What capture costs the writers themselves (no subscribers; in the pgrelay variants a relay
//! follows the table) is [`writes`].
//!
//! Steady runs can also measure other relays (pg_eventserv, broadcaster, PostGraphile…) in the
//! same transactions with the same subscriber code: [`peers`].
//!
//! Steady runs can write, with `PGRELAY_BENCH_TRACE=<file>` set, one CSV line per row (id,
//! commit time since the start, commit to the first subscriber's receipt, to the baseline's
//! and to each peer's): where in the run the tail sits, e.g. a stall at a period of the
//! relay's. The receiving side (subscribers, the LISTEN client, the trace) is [`receive`].

pub mod all;
pub mod peers;
mod receive;
mod report;
pub mod writes;

pub use report::{Percentiles, Report, Target, median, render, render_targets};

use receive::{
    Reader, commit_latencies, first_arrivals, gather, listen_baseline, receive, subscribe, trace,
};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Steady latency percentiles leave out rows committed in this first stretch of the run.
const WARMUP: Duration = Duration::from_secs(1);

/// Name of the bench's own table.
pub const TABLE: &str = "pgrelay_bench";

/// Table (and NOTIFY channel) of the steady scenario's baseline: no pgrelay capture, a bare
/// row-level `pg_notify` trigger, read by a plain LISTEN client (see [`BenchConfig::baseline`]).
pub const BASELINE_TABLE: &str = "pgrelay_bench_baseline";

/// The baseline's table and trigger: the same row as the bench table's, sent whole as the
/// payload (as `bench --scenario writes` calls its `bare` variant).
const BASELINE_SETUP: &str = "
drop table if exists pgrelay_bench_baseline;
drop function if exists pgrelay_bench_baseline_notify();
create table pgrelay_bench_baseline(id bigint primary key, payload text not null);
create function pgrelay_bench_baseline_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('pgrelay_bench_baseline', row_to_json(new)::text);
    return null;
end
$$;
create trigger pgrelay_bench_baseline_notify after insert on pgrelay_bench_baseline
    for each row execute function pgrelay_bench_baseline_notify();
";

const BASELINE_DROP: &str = "drop table if exists pgrelay_bench_baseline;
drop function if exists pgrelay_bench_baseline_notify()";

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One `rows`-row INSERT statement; time until every subscriber has every row.
    Burst,
    /// Single-row transactions at `rate`/s for `duration`; latency percentiles.
    Steady,
    /// Writes as fast as they go for `duration`; frames delivered per second.
    Fanout,
    /// `subscribers` idle connections; relay memory per connection.
    Idle,
    /// What capture costs the writers: throughput with and without it, in both capture modes.
    Writes,
    /// Every scenario of issue 11 in both capture modes, each target met or missed.
    All,
}

/// Settings of one bench run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// PostgreSQL connection string.
    pub database_url: String,
    /// A running relay that exposes `pgrelay_bench` (`ws://host:port`); `None` starts one.
    pub relay_url: Option<String>,
    /// Scenario.
    pub scenario: Scenario,
    /// WebSocket subscribers.
    pub subscribers: usize,
    /// Rows of the burst statement.
    pub rows: usize,
    /// Transactions per second for `steady` (0: as fast as one connection goes).
    pub rate: u32,
    /// How long `steady` and `fanout` write.
    pub duration: Duration,
    /// Bytes of text per row.
    pub payload_bytes: usize,
    /// Writer connections for `fanout` and `steady`.
    pub writers: usize,
    /// Rows per INSERT statement for `fanout`.
    pub statement_rows: usize,
    /// Subscribe with `batch=true`.
    pub batch: bool,
    /// Capture mode installed on the bench table and used by the bench's own relay.
    pub capture: pgrelay::capture::Mode,
    /// Steady: every transaction also inserts its row into [`BASELINE_TABLE`] (one statement,
    /// so one commit), whose bare `pg_notify` trigger a plain LISTEN client in the bench
    /// reads. Its commit-to-receive latency, measured like the subscribers', is what
    /// PostgreSQL and the machine cost a notification without the relay, in the same run.
    pub baseline: bool,
    /// Steady: other relays measured in the same run, fed by the baseline's notifications
    /// (so peers imply `baseline`), each with `subscribers` sockets (see [`peers`]).
    pub peers: Vec<peers::Peer>,
}

impl BenchConfig {
    /// Whether the writers also write [`BASELINE_TABLE`] (a steady run with a baseline or peers).
    fn feeds_baseline(&self) -> bool {
        self.scenario == Scenario::Steady && (self.baseline || !self.peers.is_empty())
    }
}

/// A relay the bench started; killed on drop (also when the bench fails or is interrupted).
pub(crate) struct LocalRelay {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl LocalRelay {
    /// Starts `pgrelay serve` on `database_url` for `tables` (comma-separated, as
    /// `--tables` takes them) in capture mode `capture`, and waits until it is ready.
    pub(crate) async fn start(
        database_url: &str,
        tables: &str,
        capture: pgrelay::capture::Mode,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--tables", tables, "--listen", &addr.to_string()])
            // Every subscriber comes from this machine's address.
            .args(["--max-connections-per-ip", "1000000"])
            .args(["--capture", capture.name()])
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .context("starting the relay")?;
        let relay = LocalRelay { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(addr, "/readyz").await.map(|(status, _)| status) != Some(200) {
            if Instant::now() > deadline {
                bail!("the relay did not become ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(relay)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Events the relay has captured since it started (`pgrelay_events_captured_total`),
    /// if its `/metrics` answers.
    pub(crate) async fn events_captured(&self) -> Option<u64> {
        let (status, body) = http_get(self.addr, "/metrics").await?;
        if status != 200 {
            return None;
        }
        metric(&body, "pgrelay_events_captured_total")
    }

    /// Kills the relay and waits until it has exited (dropping it only sends the signal).
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("stopping the relay")
    }
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))?
        .trim()
        .parse()
        .ok()
}

/// Status and body of `GET path` (HTTP/1.1, `Connection: close`).
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat`.
pub(crate) fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// A memory figure from `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`), in KiB.
fn status_kib(pid: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs one scenario and returns what it measured.
pub async fn run(config: &BenchConfig) -> anyhow::Result<Report> {
    if matches!(config.scenario, Scenario::Writes | Scenario::All) {
        bail!("the writes and all scenarios have runners of their own");
    }
    if !config.peers.is_empty() && config.scenario != Scenario::Steady {
        bail!("peers are measured by the steady scenario only");
    }
    let (client, connection) = tokio_postgres::connect(&config.database_url, tokio_postgres::NoTls)
        .await
        .context("connecting to the database")?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "drop table if exists {TABLE}; create table {TABLE}(id bigint primary key, payload text not null)"
        ))
        .await?;
    let baseline = config.feeds_baseline();
    if baseline {
        client.batch_execute(BASELINE_SETUP).await?;
    }
    let mut setup = pgrelay::sql::connect(&config.database_url).await?;
    pgrelay::sql::install(
        &mut setup,
        &[pgrelay::TableName::parse(TABLE)?],
        config.capture.name(),
    )
    .await?;

    let local = match &config.relay_url {
        Some(_) => None,
        None => Some(LocalRelay::start(&config.database_url, TABLE, config.capture).await?),
    };
    let base_url = match (&config.relay_url, &local) {
        (Some(url), _) => url.trim_end_matches('/').to_owned(),
        (None, Some(relay)) => format!("ws://{}", relay.addr),
        (None, None) => unreachable!("a local relay is started when no URL is given"),
    };
    let relay_pid = local
        .as_ref()
        .and_then(LocalRelay::pid)
        .map(|p| p.to_string());
    let url = if config.batch {
        format!("{base_url}/ws/{TABLE}?batch=true")
    } else {
        format!("{base_url}/ws/{TABLE}")
    };

    if config.scenario == Scenario::Idle {
        return idle(config, &url, relay_pid.as_deref()).await;
    }

    let mut sockets = Vec::with_capacity(config.subscribers);
    for _ in 0..config.subscribers {
        sockets.push(subscribe(&url).await?);
    }
    let (expected_tx, expected) = tokio::sync::watch::channel(0u64);
    let stop = tokio_util::sync::CancellationToken::new();
    let capacity = match config.scenario {
        Scenario::Burst => config.rows,
        _ => 1 << 16,
    };
    let measure_latency = config.scenario == Scenario::Steady;
    let receivers: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            tokio::spawn(receive(
                socket,
                Reader::relay(),
                expected.clone(),
                capacity,
                measure_latency,
                stop.clone(),
            ))
        })
        .collect();
    let baseline_listener = match baseline {
        true => Some(listen_baseline(&config.database_url, expected.clone(), stop.clone()).await?),
        false => None,
    };
    // Each peer's subscribers, read like the relay's; live once a probe row reached them.
    let mut peer_receivers = Vec::with_capacity(config.peers.len());
    let mut live = Vec::new();
    for peer in &config.peers {
        let mut handles = Vec::with_capacity(config.subscribers);
        for _ in 0..config.subscribers {
            let reader = Reader {
                who: format!("peer {}", peer.name).into(),
                pointer: Some(peer.id_pointer.as_str().into()),
                live: Arc::default(),
            };
            live.push((peer.name.clone(), Arc::clone(&reader.live)));
            let socket = peers::connect(peer).await?;
            handles.push(tokio::spawn(receive(
                socket,
                reader,
                expected.clone(),
                capacity,
                measure_latency,
                stop.clone(),
            )));
        }
        peer_receivers.push(handles);
    }
    peers::await_live(&client, &live).await?;

    let relay_cpu_before = relay_pid.as_deref().and_then(cpu_secs);
    let bench_cpu_before = cpu_secs("self").unwrap_or(0.0);
    let payload = "x".repeat(config.payload_bytes);
    // When each steady row's commit was acknowledged to the writer (index = id).
    let mut commits: Vec<Instant> = Vec::new();
    let started = Instant::now();
    let rows_written = match config.scenario {
        Scenario::Burst => {
            client
                .execute(
                    &format!("insert into {TABLE}(id, payload) select g, $1 from generate_series(1, $2::int8) g"),
                    &[&payload, &(config.rows as i64)],
                )
                .await?;
            config.rows as u64
        }
        Scenario::Steady => steady(config, &payload, &mut commits).await?,
        Scenario::Fanout => fanout(config, &payload).await?,
        Scenario::Idle => unreachable!("handled above"),
        Scenario::Writes | Scenario::All => unreachable!("refused above"),
    };
    let committed = Instant::now();
    expected_tx.send_replace(rows_written);
    // Subscribers finish when they have every row; a lost row would keep them waiting, so
    // give them a generous deadline and count what is missing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60) + config.duration;
    let seen = gather(receivers, deadline, &stop).await?;
    let mut peer_seen = Vec::with_capacity(peer_receivers.len());
    for handles in peer_receivers {
        peer_seen.push(gather(handles, deadline, &stop).await?);
    }
    let baseline_arrivals = match baseline_listener {
        Some((_client, mut handle)) => {
            let result = match tokio::time::timeout_at(deadline, &mut handle).await {
                Ok(result) => result,
                Err(_) => {
                    stop.cancel();
                    handle.await
                }
            };
            Some(result.context("the baseline listener failed")?)
        }
        None => None,
    };
    stop.cancel();
    let finished = Instant::now();
    let relay_cpu_secs = match (relay_pid.as_deref().and_then(cpu_secs), relay_cpu_before) {
        (Some(after), Some(before)) => Some(after - before),
        _ => None,
    };
    let bench_cpu_secs = cpu_secs("self").unwrap_or(0.0) - bench_cpu_before;

    let mut report = Report {
        scenario: format!("{:?}", config.scenario).to_lowercase(),
        subscribers: config.subscribers,
        rows_written,
        relay_cpu_secs,
        relay_peak_rss_mib: relay_pid
            .as_deref()
            .and_then(|p| status_kib(p, "VmHWM:"))
            .map(|k| k / 1024.0),
        bench_cpu_secs,
        ..Report::default()
    };
    let mut last = started;
    let mut completion_ms = Vec::new();
    let mut latencies = Vec::new();
    let mut all_latencies = Vec::new();
    // Steady state: rows committed in the first second (the relay may be waking from
    // idle, e.g. poll mode's backed-off timer) are left out of the percentiles.
    let warm = |id: usize| {
        id.checked_sub(1)
            .and_then(|i| commits.get(i))
            .is_some_and(|c| c.duration_since(started) >= WARMUP)
    };
    for s in &seen {
        report.frames_received += s.frames;
        report.closed_by_relay += u64::from(s.closed);
        let mut missing = 0;
        for id in 1..=rows_written as usize {
            match s.counts.get(id).copied().unwrap_or(0) {
                0 => missing += 1,
                1 => {}
                _ => report.duplicated += 1,
            }
        }
        report.lost += missing;
        let done = s.complete_at.unwrap_or(finished);
        last = last.max(done);
        completion_ms.push(done.duration_since(started).as_secs_f64() * 1000.0);
        latencies.extend(
            s.latencies
                .iter()
                .filter(|(id, _)| warm(*id))
                .map(|(_, l)| *l),
        );
        all_latencies.extend(commit_latencies(&s.arrivals, &commits, warm));
    }
    let first = first_arrivals(seen.iter().map(|s| s.arrivals.as_slice()), commits.len());
    report.first_latency_ms = Percentiles::of(commit_latencies(&first, &commits, warm));
    for (peer, seen) in config.peers.iter().zip(&peer_seen) {
        let summary =
            peers::summarize(peer, seen, config.subscribers, rows_written, &commits, warm);
        report.peers.push(summary);
    }
    if let Ok(path) = std::env::var("PGRELAY_BENCH_TRACE") {
        let mut columns = vec![("first".to_owned(), first.clone())];
        let base = baseline_arrivals.as_deref().unwrap_or_default();
        columns.push(("baseline".to_owned(), first_arrivals([base], commits.len())));
        for (peer, seen) in config.peers.iter().zip(&peer_seen) {
            let arrivals = seen.iter().map(|s| s.arrivals.as_slice());
            columns.push((
                format!("peer_{}", peer.name),
                first_arrivals(arrivals, commits.len()),
            ));
        }
        std::fs::write(path, trace(started, &commits, &columns))?;
    }
    if let Some(arrivals) = &baseline_arrivals {
        report.baseline_latency_ms = Percentiles::of(commit_latencies(arrivals, &commits, warm));
        let mut got = vec![false; rows_written as usize + 1];
        for (id, _) in arrivals {
            if let Some(slot) = got.get_mut(*id) {
                *slot = true;
            }
        }
        report.baseline_lost = Some(got.iter().skip(1).filter(|g| !**g).count() as u64);
    }
    report.lost += (config.subscribers - seen.len()) as u64 * rows_written;
    report.elapsed_secs = last.duration_since(started).as_secs_f64();
    report.write_secs = committed.duration_since(started).as_secs_f64();
    report.after_commit_secs = last.saturating_duration_since(committed).as_secs_f64();
    report.frames_per_sec = report.frames_received as f64 / report.elapsed_secs.max(1e-9);
    report.latency_ms = match config.scenario {
        Scenario::Burst => Percentiles::of(completion_ms),
        _ => Percentiles::of(all_latencies),
    };
    report.capture_latency_ms = Percentiles::of(latencies);
    drop(local);
    client
        .batch_execute(&format!("drop table if exists {TABLE}"))
        .await?;
    if baseline {
        client.batch_execute(BASELINE_DROP).await?;
    }
    Ok(report)
}

/// Single-row transactions at `config.rate` per second for `config.duration` (that is,
/// `rate × duration` rows; with rate 0, as many as the writers manage in `duration`), spread
/// over `config.writers` connections each paced at `rate / writers`, so that the rate is not
/// capped by one connection's commit time. Ids are drawn from one counter, so the rows are
/// 1..=n. Fills `commits[id - 1]` with when each row's commit was acknowledged.
async fn steady(
    config: &BenchConfig,
    payload: &str,
    commits: &mut Vec<Instant>,
) -> anyhow::Result<u64> {
    let writers = config.writers.max(1);
    let total = u64::from(config.rate) * config.duration.as_secs();
    let end = Instant::now() + config.duration;
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (client, connection) =
            tokio_postgres::connect(&config.database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let payload = payload.to_owned();
        let rate = config.rate;
        let next = Arc::clone(&next);
        // With the baseline, one statement writes both rows: one transaction, one commit
        // acknowledgement for the relay's event and the baseline's notification.
        let sql = match config.feeds_baseline() {
            true => format!(
                "with b as (insert into {BASELINE_TABLE}(id, payload) values ($1, $2)) \
                 insert into {TABLE}(id, payload) values ($1, $2)"
            ),
            false => format!("insert into {TABLE}(id, payload) values ($1, $2)"),
        };
        tasks.push(tokio::spawn(async move {
            let statement = client.prepare(&sql).await?;
            let mut ticker = (rate > 0).then(|| {
                let per_writer = f64::from(rate) / writers as f64;
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / per_writer));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut done: Vec<(u64, Instant)> = Vec::new();
            loop {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                } else if Instant::now() >= end {
                    break;
                }
                let id = next.fetch_add(1, Ordering::AcqRel);
                if rate > 0 && id > total {
                    break;
                }
                client
                    .execute(&statement, &[&(id as i64), &payload])
                    .await?;
                done.push((id, Instant::now()));
            }
            Ok::<_, tokio_postgres::Error>(done)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let written = all.len();
    let now = Instant::now();
    commits.clear();
    commits.resize(written, now);
    for (id, at) in all {
        if let Some(slot) = commits.get_mut(id as usize - 1) {
            *slot = at;
        }
    }
    Ok(written as u64)
}

/// `config.writers` connections inserting single rows as fast as they go.
async fn fanout(config: &BenchConfig, payload: &str) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + config.duration;
    let mut writers = Vec::new();
    for _ in 0..config.writers.max(1) {
        let (client, connection) =
            tokio_postgres::connect(&config.database_url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let next = Arc::clone(&next);
        let payload = payload.to_owned();
        let rows = config.statement_rows.max(1) as u64;
        writers.push(tokio::spawn(async move {
            let statement = client
                .prepare(&format!(
                    "insert into {TABLE}(id, payload) select g, $3 from generate_series($1::int8, $2::int8) g"
                ))
                .await?;
            while Instant::now() < end {
                let first = next.fetch_add(rows, Ordering::AcqRel) as i64 + 1;
                let last = first + rows as i64 - 1;
                client.execute(&statement, &[&first, &last, &payload]).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    Ok(next.load(Ordering::Acquire))
}

/// Idle subscribers: relay RSS per connection.
async fn idle(config: &BenchConfig, url: &str, relay_pid: Option<&str>) -> anyhow::Result<Report> {
    let Some(pid) = relay_pid else {
        bail!("the idle scenario measures the relay's memory: run it without --relay-url");
    };
    let before = status_kib(pid, "VmRSS:").unwrap_or(0.0);
    let mut sockets = Vec::with_capacity(config.subscribers);
    let mut failures: HashMap<String, usize> = HashMap::new();
    for _ in 0..config.subscribers {
        match subscribe(url).await {
            Ok(socket) => sockets.push(socket),
            Err(err) => *failures.entry(format!("{err:#}")).or_default() += 1,
        }
    }
    if let Some((err, n)) = failures.iter().next() {
        bail!("{n} connections failed ({err}); raise the open-file limit (ulimit -n)");
    }
    // Let the relay settle (every connection's task has started and parked).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = status_kib(pid, "VmRSS:").unwrap_or(0.0);
    let per = (after - before) / config.subscribers.max(1) as f64;
    drop(sockets);
    Ok(Report {
        scenario: "idle".into(),
        subscribers: config.subscribers,
        relay_peak_rss_mib: status_kib(pid, "VmHWM:").map(|k| k / 1024.0),
        rss_per_connection_kib: Some(per),
        ..Report::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_an_unlabelled_counter_and_no_other() {
        let text = "# HELP pgrelay_events_captured_total Events.\n\
                    # TYPE pgrelay_events_captured_total counter\n\
                    pgrelay_events_captured_total_x 9\n\
                    pgrelay_events_captured_total 42\n";
        assert_eq!(metric(text, "pgrelay_events_captured_total"), Some(42));
        assert_eq!(metric(text, "pgrelay_polls_total"), None);
    }
}
