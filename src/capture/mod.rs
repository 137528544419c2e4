//! The capture task: the one dedicated connection that reads the change log and publishes.
//!
//! Flow: `listen::Listener` owns the connection (a driver task turns notifications into
//! coalesced wake-ups); on every wake-up, and on a timer, [`poll::poll`] reads the log rows of
//! the transactions that committed since the last poll and publishes them to the hub.
//!
//! - **Notify mode** (default): capture triggers send an empty `pg_notify` per transaction
//!   while a relay sleeps; each one wakes a poll at once (lowest latency). A timer polls too
//!   (`poll_max`), so a notification that never comes (a trigger installed in poll mode)
//!   costs latency, not data. Under load (more than `notify_busy_rate` notifications a
//!   second) the relay stops sleeping and polls as poll mode does, and writers skip NOTIFY
//!   and its commit-time lock until the writes pause: see `Sleep` below.
//! - **Poll mode**: triggers never NOTIFY (no commit-time lock); capture polls adaptively:
//!   again right away while polls find rows, backing off to `poll_max` when idle.
//!
//! Nothing lost across reconnects (DESIGN.md guarantee 2): the state that survives a session
//! is the snapshot every published transaction is visible in (`Progress::handled`); the first
//! poll of the next session reads everything that committed since. The first snapshot is
//! taken before the first LISTEN, so transactions visible in it (committed before the relay
//! started) are never replayed. The state is one snapshot whatever the load, so a long
//! transaction elsewhere costs one `pg_xact_status` call per poll, nothing more; it does hold
//! back the horizon the relay reports (retention keeps log rows above it), which capture
//! notices and reports with the pid that holds it.

mod listen;
mod order;
pub mod poll;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// `application_name` of the capture connection, unless the connection string sets one: its
/// backend can be found in `pg_stat_activity` (the writes bench reads its CPU time).
pub const APPLICATION_NAME: &str = "pgrelay capture";
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use listen::Listener;
use poll::Interrupted;

/// How capture learns that something committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Triggers NOTIFY; every notification wakes a poll.
    Notify,
    /// Triggers never NOTIFY; capture polls adaptively.
    Poll,
}

impl Mode {
    /// The name `pgrelay install` and the triggers use.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Notify => "notify",
            Mode::Poll => "poll",
        }
    }

    /// Parses `notify` or `poll`.
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "notify" => Some(Mode::Notify),
            "poll" => Some(Mode::Poll),
            _ => None,
        }
    }
}

/// Held in exclusive mode, for its session, by a notify-mode relay that sleeps until notified;
/// capture triggers try it in share mode for their transaction and notify only when they
/// cannot have it (sql/install.sql, "Waking relays"). 'pgrelay' 01.
pub const SLEEP_LOCK: i64 = 8_099_568_234_784_717_057;

/// Held in exclusive mode by the relay that holds [`SLEEP_LOCK`], so that other relays can tell
/// it from writers (who hold `SLEEP_LOCK` in share mode) and sleep too. They probe it in share
/// mode, so that two probes never take one another for a sleeping relay (probes in exclusive
/// mode did: a relay that probed while another did followed no one, and waited for its timer).
/// 'pgrelay' 02.
pub const SLEEPER_LOCK: i64 = 8_099_568_234_784_717_058;

/// Falls asleep if it may: holds the sleep lock (no writer is between its trigger and its
/// commit, and from now on every writer notifies), follows a relay that holds it (writers
/// notify for it), or stays awake (writers in flight skipped their notification: poll again).
/// A relay holds no advisory lock when it runs this. (One that takes the sleep lock while
/// another probes the sleeper lock gives it back and stays awake: it tries again soon.)
const TRY_SLEEP: &str = "
    select case
        when pg_try_advisory_lock($1) then
            case when pg_try_advisory_lock($2) then 'holds'
                 when pg_advisory_unlock($1) then 'awake'
                 else 'awake' end
        when pg_try_advisory_lock_shared($2) then
            case when pg_advisory_unlock_shared($2) then 'awake' else 'awake' end
        else 'follows' end";

/// Stops sleeping: writers stop notifying, and relays that slept on this one's behalf are told
/// (their capture polls again: see [`listen::AWAKE`]).
const WAKE: &str = "select pg_advisory_unlock_all(), pg_notify('pgrelay', 'awake')";

/// Tells relays that followed this one that it does not sleep (after a reconnect: the lost
/// session may have held the sleep lock).
const RELEASE: &str = "select pg_notify('pgrelay', 'awake')";

/// Notify mode's sleep protocol. Writers notify only while some relay sleeps (holds
/// [`SLEEP_LOCK`]); a writer that skipped its notification holds that lock in share mode
/// until it commits, so a relay can fall asleep only once every such writer is visible to
/// the poll that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sleep {
    /// Polls on its own: soon again after a poll found rows, and tries to sleep after one
    /// that found none.
    Awake,
    /// Holds the sleep lock and waits for notifications; lets go when they come faster
    /// than `notify_busy_rate`.
    Holds,
    /// Another relay holds the sleep lock: waits for notifications, until that relay says it
    /// is awake (or the timer, should it have vanished without a word).
    Follows,
}

/// How long notifications are counted before a sleeping relay judges their rate.
const BUSY_WINDOW: Duration = Duration::from_millis(50);

const REPORT_RELAY: &str = "
    insert into pgrelay.relays (instance, horizon, last_seq, last_ts, seen_at, pid, held_by, snapshot)
    values ($1, $2::text::xid8, $3, $4::text::timestamptz, now(), pg_backend_pid(), $5,
            $6::text::pg_snapshot)
    on conflict (instance) do update set horizon = excluded.horizon,
        last_seq = coalesce(excluded.last_seq, relays.last_seq),
        last_ts = coalesce(excluded.last_ts, relays.last_ts), seen_at = now(),
        pid = excluded.pid, held_by = excluded.held_by, snapshot = excluded.snapshot";

const FORGET_RELAY: &str = "delete from pgrelay.relays where instance = $1";

/// The snapshot before the first LISTEN, and the highest seq drawn by then.
const START: &str = "
    select pg_current_snapshot()::text,
           (select case when is_called then last_value else 0 end from pgrelay.changes_seq)";

/// A relay's start marker: a log event of no table, so that the relay has a position to
/// give initial data even before any table changes (see `hub::Hub::position`).
const MARKER: &str = "
    insert into pgrelay.changes (seq, last_seq, stmt, relid, n, body)
    select s, s, s, 0, 1, json_build_array(json_build_array(s, 'm', null, null, null))
      from (select nextval('pgrelay.changes_seq') as s) as x";

/// Settings of the capture connection. Its only writes are the progress row and the start
/// marker, which need not wait for a WAL flush (losing the last report in a crash is
/// harmless). Its reads are index lookups by transaction: the log's statistics (one huge
/// transaction can make an xid look like it matches every row) must never talk the planner
/// into a sequential scan of the log, which grows with retention.
///
/// The poll's statements are prepared once and run with a generic plan, planned once: with
/// sequential scans priced out and no parallel workers (the reads are small lookups; workers
/// only add start-up cost), a plan chosen without the parameters (which xids, how many) is
/// still the index lookups, however stale the log's statistics (a parallel scan hundreds of
/// times slower was what a generic plan once chose here, before both settings). Planning
/// every run anew with its parameters was half of what reading a notified transaction cost
/// (0.17 ms p50 against 0.02 ms to execute; BENCHMARKS.md 0e).
///
/// Timeouts a role or database may set for ordinary sessions do not apply here: a poll of a
/// large batch is one long read, and capture must not fail on it forever.
///
/// No JIT: `enable_seqscan = off` prices a sequential scan at 10^10, so a read of a one-row
/// table (`pgrelay.pruned`, `pgrelay.changes_seq`) looks costly enough to be compiled, with
/// inlining and optimisation: 85-130 ms of CPU for a query that runs in 0.02 ms, once a second
/// in the progress report, during which capture could not poll (it was the whole tail of the
/// steady bench's commit-to-receive latency, BENCHMARKS.md 0d). Capture's reads are index
/// lookups; JIT never pays for itself here.
pub const SESSION_SETTINGS: &str = "set synchronous_commit = off; set enable_seqscan = off;
    set jit = off;
    set plan_cache_mode = force_generic_plan; set max_parallel_workers_per_gather = 0;
    set statement_timeout = 0; set lock_timeout = 0; set idle_in_transaction_session_timeout = 0";

/// Who holds the horizon back: a session's open transaction, or a prepared one.
const HOLDER: &str = "
    select pid from pg_stat_activity where backend_xid = xid($1::text::xid8)
    union all
    select 0 from pg_prepared_xacts where transaction = xid($1::text::xid8)
    limit 1";

/// How far retention has pruned (see `pgrelay.pruned` in sql/install.sql).
const PRUNED: &str = "select xid::text from pgrelay.pruned";

/// How far retention has pruned, and whether retention has been treating this relay as gone
/// (no report for five minutes: it no longer keeps the rows this relay has not read).
const PRUNED_WHILE_AWAY: &str = "
    select (select xid::text from pgrelay.pruned),
           coalesce((select seen_at < now() - interval '5 minutes' from pgrelay.relays
                      where instance = $1), true)";

/// Reports a horizon may stay put before capture looks for the transaction holding it.
const HELD_AFTER_REPORTS: u32 = 5;

/// Why a capture session ended (it reconnects after each of these).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The connection failed or a query on it did.
    #[error("Capture connection error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The connection closed.
    #[error("Capture connection closed")]
    Closed,
    /// PostgreSQL answered something capture cannot use (a broken invariant).
    #[error("Unexpected answer from the database: {0}")]
    Invariant(&'static str),
}

/// Shared view of capture for readiness checks.
#[derive(Debug)]
pub struct CaptureState {
    /// True while the capture connection is up and caught up. Written only by the capture task.
    listening: watch::Sender<bool>,
    /// Every transaction visible in this snapshot is published (after each poll).
    handled: watch::Sender<Option<Arc<Snapshot>>>,
    /// Asks capture to poll now (the schema watcher, settling before it publishes).
    poke: tokio::sync::Notify,
}

impl Default for CaptureState {
    fn default() -> Self {
        CaptureState {
            listening: watch::channel(false).0,
            handled: watch::channel(None).0,
            poke: tokio::sync::Notify::new(),
        }
    }
}

impl CaptureState {
    /// Whether capture is connected and caught up.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Resolves once capture is connected and caught up.
    pub async fn wait_listening(&self) {
        let mut rx = self.listening.subscribe();
        // The sender lives as long as `self`, so the wait cannot fail while we borrow it.
        let _ = rx.wait_for(|listening| *listening).await;
    }

    fn set_listening(&self, listening: bool) {
        self.listening.send_replace(listening);
    }

    /// Waits until capture has published every transaction `snapshot` sees as committed
    /// (polling now rather than at its next wake-up); false after `limit`.
    pub async fn wait_covers(&self, snapshot: &Snapshot, limit: Duration) -> bool {
        let mut rx = self.handled.subscribe();
        self.poke.notify_one();
        let covered = rx.wait_for(|h| h.as_ref().is_some_and(|h| h.covers(snapshot)));
        matches!(tokio::time::timeout(limit, covered).await, Ok(Ok(_)))
    }
}

/// What capture remembers across sessions.
pub struct Progress {
    /// Every transaction visible in this snapshot has been handled (see `poll`).
    handled: Arc<Snapshot>,
    /// A batch cut short by a lost connection.
    interrupted: Option<Interrupted>,
    /// This relay's id in `pgrelay.relays`.
    instance: String,
    /// Seq and capture time of the last event published, for `pgrelay status`.
    last: Option<(i64, String)>,
    /// The horizon last reported, and since when it has not moved.
    horizon_since: (u64, Instant),
    /// The highest pruned xid already accounted for.
    pruned_seen: u64,
    /// Whether this relay has reported at least once (before that, no row of its own exists).
    reported: bool,
    /// Whether the start marker is in the log (it is written once, when a session first
    /// succeeds in writing it).
    marked: bool,
}

/// Everything the capture task needs.
pub struct Capture {
    /// The dedicated connection's settings and TLS.
    pub target: crate::tls::Target,
    /// Notify or poll.
    pub mode: Mode,
    /// Where events go.
    pub hub: Arc<Hub>,
    /// Readiness flag shared with `/readyz`.
    pub state: Arc<CaptureState>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// How often capture reports its progress (and checks its horizon).
    pub report_interval: Duration,
    /// Shortest wait between polls in poll mode.
    pub poll_min: Duration,
    /// Longest wait between polls (poll mode when idle; notify mode's safety net).
    pub poll_max: Duration,
    /// Notify mode: notifications per second past which a sleeping relay wakes up for good
    /// and polls (0: never).
    pub notify_busy_rate: u64,
    /// Cap of the reconnect backoff.
    pub max_backoff: Duration,
}

impl Capture {
    /// Runs until `token` is cancelled: connect, catch up, stream; reconnect with capped
    /// exponential backoff (with jitter) whenever the connection is lost.
    pub async fn run(self, token: CancellationToken) {
        let mut progress: Option<Progress> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            let result = self.session(&mut progress, &token, &mut backoff).await;
            self.state.set_listening(false);
            match result {
                Ok(()) => return,
                Err(err) => {
                    self.metrics.inc(&self.metrics.capture_reconnects);
                    tracing::warn!(error = %crate::error::chain(&err), retry_in = ?backoff, "capture connection lost");
                }
            }
            let jitter = rand::random_range(0.5..1.0);
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    async fn session(
        &self,
        progress: &mut Option<Progress>,
        token: &CancellationToken,
        backoff: &mut Duration,
    ) -> Result<(), CaptureError> {
        let mut listener = tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(()),
            listener = Listener::connect(&self.target, Arc::clone(&self.metrics)) => listener?,
        };
        listener.client().batch_execute(SESSION_SETTINGS).await?;
        // A session of this relay ran before: it may have held the sleep lock when its
        // connection dropped (the lock went with it, without a word to the relays that followed).
        let reconnected = progress.is_some();
        let row = listener.client().query_one(START, &[]).await?;
        let now =
            Snapshot::parse(row.get(0)).ok_or(CaptureError::Invariant("bad start snapshot"))?;
        let seq_now: i64 = row.get(1);
        // A database whose transaction ids or log positions went back (restored from a backup,
        // or a failover to a replica that was behind) is not the history this relay
        // published: what it held may be gone, and its seqs will be drawn again. Everyone
        // starts over, and no position from before resumes.
        if let Some(p) = progress.as_ref()
            && (now.xmax() < p.handled.xmax() || seq_now < self.hub.max_published())
        {
            tracing::error!(
                xid_now = now.xmax(),
                xid_handled = p.handled.xmax(),
                seq_now,
                seq_published = self.hub.max_published(),
                "the database went back in time (restored, or failed over to a replica that was behind); every subscriber is reset"
            );
            self.hub
                .set_start_seq(seq_now.max(self.hub.max_published()));
            for resource in self.hub.resources() {
                self.hub.publish_reset(&resource, "events_missing");
            }
            *progress = None;
        }
        let first = progress.is_none();
        if first {
            let snapshot = now;
            if self.hub.max_published() == i64::MIN {
                self.hub.set_start_seq(seq_now);
            }
            // Rows pruned before the relay started were never promised to anyone.
            let pruned_seen = listener
                .client()
                .query_opt(PRUNED, &[])
                .await?
                .and_then(|r| r.get::<_, &str>(0).parse().ok())
                .unwrap_or(0);
            *progress = Some(Progress {
                horizon_since: (snapshot.xmin(), Instant::now()),
                handled: Arc::new(snapshot),
                interrupted: None,
                instance: format!("{:016x}", rand::random::<u64>()),
                last: None,
                pruned_seen,
                reported: false,
                marked: false,
            });
        }
        let progress = progress.as_mut().expect("progress was set above");
        if self.mode == Mode::Notify {
            listener.client().batch_execute("listen pgrelay").await?;
            if reconnected {
                // Relays that followed the last session must poll (see `listen::AWAKE`).
                listener.client().batch_execute(RELEASE).await?;
            }
        }
        if !progress.marked {
            listener.client().execute(MARKER, &[]).await?;
            progress.marked = true;
        }
        listener.clear_wake();
        let statements = poll::Statements::prepare(listener.client()).await?;
        let caught_up = self.poll(listener.client(), &statements, progress).await?;
        if caught_up.events > 0 && !first {
            tracing::info!(events = caught_up.events, "capture caught up from the log");
        }
        self.report(listener.client(), progress).await;
        self.state.set_listening(true);
        *backoff = Duration::from_millis(50);
        tracing::info!(
            mode = self.mode.name(),
            horizon = progress.handled.xmin(),
            "capture listening"
        );

        let mut report_tick = tokio::time::interval(self.report_interval);
        report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Poll mode waits `wait` between polls (back to `poll_min` after a poll that found
        // rows, doubling while polls find nothing: up to `busy_cap` while rows came within the
        // last second, so that a pause between commits never leaves the next ones waiting long,
        // and up to `poll_max` once idle). Notify mode's wait comes from its sleep protocol
        // (`Asleep::next`). A deadline, not a sleep per loop turn: progress reports must not
        // keep pushing the next poll back.
        let mut wait = self.poll_min;
        let busy_cap = (self.poll_min * 8).min(self.poll_max);
        let mut rows_at = Instant::now();
        let mut asleep = Asleep::new(busy_cap, self.poll_min);
        let mut next_poll = Instant::now()
            + match self.mode {
                Mode::Notify => {
                    let found = caught_up.events > 0;
                    asleep
                        .next(self, listener.client(), &statements, progress, found, false)
                        .await?
                }
                Mode::Poll => self.poll_max,
            };
        let Listener {
            client,
            wake_rx,
            ended_rx,
            released,
            ..
        } = &mut listener;
        loop {
            tokio::select! {
                biased;
                // priority 1: shutdown
                _ = token.cancelled() => {
                    if asleep.sleep == Sleep::Holds {
                        let _ = client.batch_execute(WAKE).await;
                    }
                    let _ = client.batch_execute("unlisten *").await;
                    let _ = client.execute(FORGET_RELAY, &[&progress.instance]).await;
                    return Ok(());
                }
                // priority 2: the connection ended
                ended = &mut *ended_rx => {
                    return Err(ended.ok().flatten().map_or(CaptureError::Closed, CaptureError::Db));
                }
                // priority 3: progress reports, even while polls never stop finding rows
                _ = report_tick.tick() => self.report(client, progress).await,
                // priority 4: something committed (or the schema watcher asks)
                Some(()) = wake_rx.recv() => {
                    while wake_rx.try_recv().is_ok() {}
                    let polled = self.poll(client, &statements, progress).await?;
                    if self.mode == Mode::Notify {
                        if released.swap(false, Ordering::Relaxed) && asleep.sleep == Sleep::Follows {
                            asleep.sleep = Sleep::Awake;
                        }
                        let found = polled.events > 0;
                        next_poll = Instant::now()
                            + asleep.next(self, client, &statements, progress, found, false).await?;
                    }
                }
                _ = self.state.poke.notified() => {
                    self.poll(client, &statements, progress).await?;
                }
                // priority 5: the timer
                _ = tokio::time::sleep_until(next_poll.into()) => {
                    while wake_rx.try_recv().is_ok() {}
                    let polled = self.poll(client, &statements, progress).await?;
                    if polled.events > 0 {
                        rows_at = Instant::now();
                    }
                    next_poll = Instant::now() + match self.mode {
                        Mode::Notify => {
                            let found = polled.events > 0;
                            asleep.next(self, client, &statements, progress, found, true).await?
                        }
                        Mode::Poll => {
                            wait = poll_wait(wait, polled.events > 0, rows_at.elapsed(), busy_cap, self.poll_min, self.poll_max);
                            wait
                        }
                    };
                }
            }
        }
    }

    /// Retention may have deleted log rows this relay had not read (it was away longer than
    /// retention waits for a relay): subscribers are told (`reset`, events_missing), never
    /// left with a silent gap.
    async fn check_pruned(&self, client: &Client, progress: &mut Progress) {
        let (pruned, away) = match client
            .query_one(PRUNED_WHILE_AWAY, &[&progress.instance])
            .await
        {
            Ok(row) => (
                row.get::<_, Option<&str>>(0)
                    .and_then(|x| x.parse::<u64>().ok()),
                row.get::<_, bool>(1),
            ),
            Err(err) => {
                tracing::debug!(error = %crate::error::chain(&err), "could not read how far retention pruned");
                return;
            }
        };
        let Some(pruned) = pruned.filter(|p| *p > progress.pruned_seen) else {
            return;
        };
        progress.pruned_seen = pruned;
        // While the relay reports, retention prunes only rows every reporting relay has read.
        if away && progress.reported {
            self.metrics.inc(&self.metrics.bad_log_rows);
            tracing::error!(
                pruned_xid = pruned,
                horizon = progress.handled.xmin(),
                "retention deleted log rows this relay may not have read; every subscriber is reset"
            );
            for relid in self.hub.relids() {
                self.hub.publish_reset_relid(relid, "events_missing");
            }
        }
    }

    async fn poll(
        &self,
        client: &Client,
        statements: &poll::Statements,
        progress: &mut Progress,
    ) -> Result<poll::Polled, CaptureError> {
        self.metrics.inc(&self.metrics.polls);
        let polled = poll::poll(client, statements, progress, &self.hub, &self.metrics).await;
        self.state
            .handled
            .send_replace(Some(Arc::clone(&progress.handled)));
        polled
    }

    /// Records this relay's progress for `pgrelay status` and retention, and notices a
    /// horizon held back by a long transaction. Best effort: a failure is logged, never fatal.
    async fn report(&self, client: &Client, progress: &mut Progress) {
        self.check_pruned(client, progress).await;
        let xmin = progress.handled.xmin();
        if xmin != progress.horizon_since.0 {
            progress.horizon_since = (xmin, Instant::now());
        }
        let stuck = progress.horizon_since.1.elapsed();
        self.metrics
            .horizon_stuck_seconds
            .store(stuck.as_secs(), Ordering::Relaxed);
        let horizon = xmin.to_string();
        let mut holder: Option<i32> = None;
        if stuck >= self.report_interval * HELD_AFTER_REPORTS {
            match client.query_opt(HOLDER, &[&horizon]).await {
                Ok(row) => holder = row.map(|r| r.get(0)),
                Err(err) => {
                    tracing::debug!(error = %crate::error::chain(&err), "could not look up the horizon's holder")
                }
            }
            let previous = self.metrics.horizon_holder.swap(
                holder.map_or(0, |p| u64::try_from(p).unwrap_or(0)),
                Ordering::Relaxed,
            );
            if let Some(pid) = holder
                && previous != u64::try_from(pid).unwrap_or(0)
            {
                tracing::warn!(
                    pid,
                    held_secs = stuck.as_secs(),
                    xid = xmin,
                    "an open transaction holds capture's horizon back (the log is kept above it)"
                );
            }
        } else {
            self.metrics.horizon_holder.store(0, Ordering::Relaxed);
        }
        let (seq, ts) = match &progress.last {
            Some((seq, ts)) => (Some(*seq), Some(ts.as_str())),
            None => (None, None),
        };
        let snapshot = progress.handled.to_string();
        if let Err(err) = client
            .execute(
                REPORT_RELAY,
                &[&progress.instance, &horizon, &seq, &ts, &holder, &snapshot],
            )
            .await
        {
            tracing::debug!(error = %crate::error::chain(&err), "could not record relay progress");
        } else {
            progress.reported = true;
        }
    }
}

/// Poll mode's wait before the next poll: `poll_min` after a poll that found rows; after an
/// empty one, twice the last wait, capped at `busy_cap` while rows came within the last
/// second (`since_rows`) and at `poll_max` once idle.
fn poll_wait(
    last: Duration,
    found: bool,
    since_rows: Duration,
    busy_cap: Duration,
    poll_min: Duration,
    poll_max: Duration,
) -> Duration {
    if found {
        return poll_min;
    }
    let cap = if since_rows < Duration::from_secs(1) {
        busy_cap
    } else {
        poll_max
    };
    (last * 2).min(cap).max(poll_min)
}

/// Notify mode's state in its sleep protocol (see [`Sleep`]).
struct Asleep {
    sleep: Sleep,
    /// The wait before the next poll while awake and unable to sleep.
    wait: Duration,
    /// Since when notifications are counted, and the count then (`Metrics::wakes`).
    window: (Instant, u64),
    busy_cap: Duration,
}

impl Asleep {
    fn new(busy_cap: Duration, poll_min: Duration) -> Asleep {
        Asleep {
            sleep: Sleep::Awake,
            wait: poll_min,
            window: (Instant::now(), 0),
            busy_cap,
        }
    }

    /// After a poll (`found`: it published events; `timer`: the timer asked for it): what the
    /// relay does next, and how long until its next poll unless a notification comes first.
    async fn next(
        &mut self,
        capture: &Capture,
        client: &Client,
        statements: &poll::Statements,
        progress: &mut Progress,
        found: bool,
        timer: bool,
    ) -> Result<Duration, CaptureError> {
        let wakes = || capture.metrics.wakes.load(Ordering::Relaxed);
        match self.sleep {
            Sleep::Holds => {
                let (since, count) = self.window;
                let elapsed = since.elapsed();
                if elapsed < BUSY_WINDOW {
                    return Ok(capture.poll_max);
                }
                let now = wakes();
                self.window = (Instant::now(), now);
                let rate = now.saturating_sub(count) as f64 / elapsed.as_secs_f64();
                if capture.notify_busy_rate == 0 || rate < capture.notify_busy_rate as f64 {
                    return Ok(capture.poll_max);
                }
                client.batch_execute(WAKE).await?;
                capture.metrics.inc(&capture.metrics.capture_busy);
                tracing::debug!(rate, "capture polls: writers stop notifying");
                self.sleep = Sleep::Awake;
                self.wait = capture.poll_min;
                Ok(capture.poll_min)
            }
            Sleep::Follows if !timer => Ok(capture.poll_max),
            Sleep::Follows | Sleep::Awake => {
                if found {
                    self.sleep = Sleep::Awake;
                    self.wait = capture.poll_min;
                    return Ok(capture.poll_min);
                }
                let row = client
                    .query_one(TRY_SLEEP, &[&SLEEP_LOCK, &SLEEPER_LOCK])
                    .await?;
                self.sleep = match row.get::<_, &str>(0) {
                    "holds" => Sleep::Holds,
                    "follows" => Sleep::Follows,
                    _ => {
                        // A writer is between its trigger and its commit without having
                        // notified (or no relay that sleeps can be told from one): poll again.
                        self.sleep = Sleep::Awake;
                        self.wait = (self.wait * 2).min(self.busy_cap).max(capture.poll_min);
                        return Ok(self.wait);
                    }
                };
                if self.sleep == Sleep::Holds {
                    capture.metrics.inc(&capture.metrics.capture_sleeps);
                    self.window = (Instant::now(), wakes());
                }
                // Writers notify from now on; this poll reads those that committed without.
                capture.poll(client, statements, progress).await?;
                Ok(capture.poll_max)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_mode_waits_little_while_rows_keep_coming_and_backs_off_when_idle() {
        let ms = Duration::from_millis;
        let (min, cap, max) = (ms(1), ms(8), ms(500));
        assert_eq!(poll_wait(ms(300), true, ms(0), cap, min, max), min);
        // Rows came 200 ms ago: empty polls double the wait up to the busy cap only.
        let mut wait = min;
        for _ in 0..10 {
            wait = poll_wait(wait, false, ms(200), cap, min, max);
        }
        assert_eq!(wait, cap);
        // Idle for two seconds: up to poll_max.
        for _ in 0..20 {
            wait = poll_wait(wait, false, ms(2000), cap, min, max);
        }
        assert_eq!(wait, max);
    }
}
