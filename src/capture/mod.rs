//! The capture task: the one dedicated connection that LISTENs, decodes and publishes.
//!
//! Flow: `listen::Listener` owns the connection (a driver task turns `poll_message` into a
//! channel of payloads); this module decodes each payload, reads pointer rows from
//! `pgrelay.changes` in batches, and publishes events to the hub in notification order, which
//! is commit order.
//!
//! Nothing lost across reconnects (DESIGN.md guarantee 2): capture keeps an xid *horizon* `H`
//! such that every transaction with xid < `H` that committed while the relay listened has been
//! handled. A new horizon is taken as `pg_snapshot_xmin(pg_current_snapshot())` on the capture
//! connection, then a marker is NOTIFYed; it takes effect when the marker comes back, because
//! by then every notification committed before it has been handled (NOTIFY order is commit
//! order). After a reconnect, capture LISTENs first, then reads every log row with
//! xid >= `H` and publishes those it has not published yet. Seq is assigned at insert, so
//! "seq > last seen" would miss late committers; the horizon does not. De-duplication keeps,
//! per transaction at or above the horizon, the highest seq published (a transaction's
//! statements log increasing seqs and notify in that order).

mod decode;
mod listen;

pub use decode::{DecodeError, Payload, decode};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::event::ChangeEvent;
use crate::hub::Hub;
use crate::metrics::Metrics;
use listen::Listener;

/// Widest seq window read from the log per query (pointers and catch-up).
const FETCH_BATCH: i64 = 1000;

// Log reads scan a bounded window of seqs (`$1 ..= $2`, at most FETCH_BATCH wide), never
// "order by seq limit n" over an open range: with stale statistics the planner may render
// every row of a huge statement to JSON before sorting and cutting (seen: 1.3 s per batch).

// Log rows are read as plain columns and assembled in Rust: rendering each row to one JSON
// document in PostgreSQL (pgrelay.event_json) costs it about four times as much.

const FETCH_POINTER: &str = "
    select c.seq, c.xid::text, to_json(c.ts)::text, c.schema_name, c.table_name, c.op,
           c.id::text, c.data::text, c.old::text
      from pgrelay.changes c
     where c.seq between $1 and $2 and c.xid = $3::text::xid8
     order by c.seq";

const CATCH_UP_RANGE: &str = "
    select min(seq), max(seq) from pgrelay.changes where xid >= $1::text::xid8";

const CATCH_UP: &str = "
    select c.seq, c.xid::text, to_json(c.ts)::text, c.schema_name, c.table_name, c.op,
           c.id::text, c.data::text, c.old::text
      from pgrelay.changes c
     where c.seq between $1 and $2 and c.xid >= $3::text::xid8
     order by c.seq";

/// Window queries kept in flight at once (pipelined on the capture connection), so the
/// relay decodes one window while PostgreSQL reads the next.
const PIPELINE: usize = 3;

const REPORT_RELAY: &str = "
    insert into pgrelay.relays (instance, horizon, last_seq, last_ts, seen_at)
    values ($1, $2::text::xid8, $3, $4::text::timestamptz, now())
    on conflict (instance) do update set horizon = excluded.horizon,
        last_seq = coalesce(excluded.last_seq, relays.last_seq),
        last_ts = coalesce(excluded.last_ts, relays.last_ts), seen_at = now()";

const FORGET_RELAY: &str = "delete from pgrelay.relays where instance = $1";

const TAKE_HORIZON: &str = "select pg_snapshot_xmin(pg_current_snapshot())::text";

/// Why a capture session ended (it reconnects after each of these).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The connection failed or a query on it did.
    #[error("Capture connection error: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The connection closed.
    #[error("Capture connection closed")]
    Closed,
    /// The log returned something the decoder rejects (a broken invariant).
    #[error("Log row could not be decoded: {0}")]
    BadLogRow(#[from] DecodeError),
}

/// Shared view of capture for readiness checks.
#[derive(Debug)]
pub struct CaptureState {
    /// True while LISTEN is active and catch-up is done. Written only by the capture task.
    listening: watch::Sender<bool>,
}

impl Default for CaptureState {
    fn default() -> Self {
        CaptureState {
            listening: watch::channel(false).0,
        }
    }
}

impl CaptureState {
    /// Whether capture is connected and LISTENing.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Resolves once capture LISTENs.
    pub async fn wait_listening(&self) {
        let mut rx = self.listening.subscribe();
        // The sender lives as long as `self`, so the wait cannot fail while we borrow it.
        let _ = rx.wait_for(|listening| *listening).await;
    }

    fn set_listening(&self, listening: bool) {
        self.listening.send_replace(listening);
    }
}

/// What capture remembers across sessions.
struct Progress {
    /// Effective horizon: every transaction below it has been handled.
    horizon: u64,
    /// A horizon waiting for its marker: (marker id, xid).
    pending: Option<(String, u64)>,
    /// Highest seq published per transaction at or above the horizon.
    published: HashMap<u64, i64>,
    /// Distinguishes this relay's markers (and its `pgrelay.relays` row) from other replicas'.
    instance: String,
    markers_sent: u64,
    /// Seq and capture time of the last event published, for `pgrelay status`.
    last: Option<(i64, String)>,
}

impl Progress {
    fn is_new(&self, event: &ChangeEvent) -> bool {
        self.published
            .get(&event.xid)
            .is_none_or(|&seq| event.seq > seq)
    }

    fn record(&mut self, event: &ChangeEvent) {
        if event.xid >= self.horizon {
            let seq = self.published.entry(event.xid).or_insert(event.seq);
            *seq = (*seq).max(event.seq);
        }
    }

    fn advance(&mut self, horizon: u64) {
        if horizon > self.horizon {
            self.horizon = horizon;
            self.published.retain(|&xid, _| xid >= horizon);
        }
    }
}

/// Everything the capture task needs.
pub struct Capture {
    /// Settings of the dedicated LISTEN connection.
    pub pg_config: tokio_postgres::Config,
    /// Where events go.
    pub hub: Arc<Hub>,
    /// Readiness flag shared with `/readyz`.
    pub state: Arc<CaptureState>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// How often the horizon moves.
    pub horizon_interval: Duration,
    /// Cap of the reconnect backoff.
    pub max_backoff: Duration,
}

impl Capture {
    /// Runs until `token` is cancelled: connect, LISTEN, catch up, stream; reconnect with
    /// capped exponential backoff (with jitter) whenever the connection is lost.
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
            listener = Listener::connect(&self.pg_config) => listener?,
        };
        let reconnect = progress.is_some();
        if !reconnect {
            // The first horizon is taken before the first LISTEN: everything from then on
            // is recoverable, everything before is history no live subscriber was promised
            // (so the first session has nothing to catch up).
            let horizon = take_horizon(listener.client()).await?;
            *progress = Some(Progress {
                horizon,
                pending: None,
                published: HashMap::new(),
                instance: format!("{:016x}", rand::random::<u64>()),
                markers_sent: 0,
                last: None,
            });
        }
        let progress = progress.as_mut().expect("progress was set above");
        // The only writes on this connection are the progress row for `pgrelay status`
        // (observability; losing the last one in a crash is harmless). Without this, each
        // one waits for a WAL flush, and notifications queue behind it.
        listener
            .client()
            .batch_execute("set synchronous_commit = off; listen pgrelay")
            .await?;
        if reconnect {
            self.catch_up(listener.client(), progress).await?;
        }
        progress.pending = None;
        self.state.set_listening(true);
        *backoff = Duration::from_millis(50);
        tracing::info!(horizon = progress.horizon, "capture listening");

        let mut horizon_tick = tokio::time::interval(self.horizon_interval);
        horizon_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // priority 1: shutdown
                biased;
                _ = token.cancelled() => {
                    let client = listener.client();
                    let _ = client.batch_execute("unlisten *").await;
                    let _ = client.execute(FORGET_RELAY, &[&progress.instance]).await;
                    return Ok(());
                }
                // priority 2: notifications, in order
                payload = listener.next() => {
                    let payload = payload.ok_or(CaptureError::Closed)??;
                    self.handle(listener.client(), progress, &payload).await?;
                }
                // priority 3: move the horizon
                _ = horizon_tick.tick() => {
                    if progress.pending.is_none() {
                        let xid = take_horizon(listener.client()).await?;
                        progress.markers_sent += 1;
                        let id = format!("{}-{}", progress.instance, progress.markers_sent);
                        let marker = serde_json::json!({"k": "m", "id": id}).to_string();
                        listener.client().execute("select pg_notify('pgrelay', $1)", &[&marker]).await?;
                        progress.pending = Some((id, xid));
                    }
                }
            }
        }
    }

    async fn handle(
        &self,
        client: &Client,
        progress: &mut Progress,
        payload: &str,
    ) -> Result<(), CaptureError> {
        match decode(payload) {
            Ok(Payload::Event(event)) => self.publish(progress, *event),
            Ok(Payload::Pointer {
                xid,
                from,
                to,
                rows: expected,
                table,
            }) => {
                let mut reads = windows(client, FETCH_POINTER, from, to, xid.to_string());
                let mut found = 0i64;
                while let Some(rows) = reads.next().await {
                    let rows = rows?;
                    found += rows.len() as i64;
                    for row in &rows {
                        self.publish(progress, decode_row(row)?);
                    }
                }
                if found < expected {
                    // Rows pruned before the relay read them (a retention shorter than the
                    // relay's lag): never silent.
                    self.metrics
                        .add(&self.metrics.missing_log_rows, (expected - found) as u64);
                    tracing::error!(
                        xid,
                        from,
                        to,
                        expected,
                        found,
                        "log rows of a statement are missing"
                    );
                    let table = table.as_ref().map(|(s, t)| (s.as_str(), t.as_str()));
                    self.hub.publish_gap(table);
                }
            }
            Ok(Payload::Marker(id)) => {
                if let Some((pending_id, xid)) = progress.pending.take() {
                    if pending_id == id {
                        progress.advance(xid);
                        report_progress(client, progress).await;
                    } else {
                        progress.pending = Some((pending_id, xid));
                    }
                }
            }
            Err(err) => {
                self.metrics.inc(&self.metrics.bad_payloads);
                tracing::warn!(channel = "pgrelay", error = %err, payload = %truncate(payload), "skipping bad notification payload");
            }
        }
        Ok(())
    }

    /// Reads every log row at or above the horizon and publishes what is new.
    ///
    /// All in one REPEATABLE READ snapshot: a transaction is then either wholly in the
    /// catch-up (and its notifications are duplicates) or wholly after it (and its
    /// notifications deliver it), which is what the per-transaction dedupe relies on. With a
    /// snapshot per batch, a transaction committing mid-catch-up could have its later rows
    /// replayed and its earlier ones then dropped as duplicates. Notifications wait until
    /// the transaction ends; it only reads.
    async fn catch_up(&self, client: &Client, progress: &mut Progress) -> Result<(), CaptureError> {
        client
            .batch_execute("begin isolation level repeatable read read only")
            .await?;
        let replayed = self.replay(client, progress).await?;
        client.batch_execute("commit").await?;
        if replayed > 0 {
            tracing::info!(replayed, "capture caught up from the log");
        }
        Ok(())
    }

    async fn replay(&self, client: &Client, progress: &mut Progress) -> Result<u64, CaptureError> {
        let horizon = progress.horizon.to_string();
        let range = client.query_one(CATCH_UP_RANGE, &[&horizon]).await?;
        let (Some(first), Some(last)): (Option<i64>, Option<i64>) = (range.get(0), range.get(1))
        else {
            return Ok(0);
        };
        let mut replayed = 0u64;
        let mut reads = windows(client, CATCH_UP, first, last, horizon);
        while let Some(rows) = reads.next().await {
            for row in &rows? {
                let event = decode_row(row)?;
                if progress.is_new(&event) {
                    replayed += 1;
                    self.publish(progress, event);
                }
            }
        }
        Ok(replayed)
    }

    fn publish(&self, progress: &mut Progress, event: ChangeEvent) {
        if !progress.is_new(&event) {
            return;
        }
        progress.record(&event);
        // Reuse the buffer: this runs for every event, the report once a second.
        match &mut progress.last {
            Some((seq, ts)) => {
                *seq = event.seq;
                ts.clear();
                ts.push_str(&event.ts);
            }
            None => progress.last = Some((event.seq, event.ts.clone())),
        }
        self.metrics.inc(&self.metrics.events_captured);
        self.hub.publish(event);
    }
}

/// Records this relay's progress for `pgrelay status`. Best effort: a failure is logged,
/// never fatal (the table is observability only, and may predate an upgrade).
async fn report_progress(client: &Client, progress: &Progress) {
    let horizon = progress.horizon.to_string();
    let (seq, ts) = match &progress.last {
        Some((seq, ts)) => (Some(*seq), Some(ts.as_str())),
        None => (None, None),
    };
    if let Err(err) = client
        .execute(REPORT_RELAY, &[&progress.instance, &horizon, &seq, &ts])
        .await
    {
        tracing::debug!(error = %crate::error::chain(&err), "could not record relay progress");
    }
}

async fn take_horizon(client: &Client) -> Result<u64, CaptureError> {
    let text: String = client.query_one(TAKE_HORIZON, &[]).await?.get(0);
    // pg_snapshot_xmin always renders a decimal xid8.
    Ok(text.parse().unwrap_or(0))
}

/// Reads `query` over the seq windows of `first..=last` (each at most FETCH_BATCH wide, with
/// `arg` as the third parameter), PIPELINE windows in flight, results in window order.
fn windows<'a>(
    client: &'a Client,
    query: &'static str,
    first: i64,
    last: i64,
    arg: String,
) -> impl futures_util::Stream<Item = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + 'a
{
    let starts = (first..=last).step_by(FETCH_BATCH as usize);
    futures_util::stream::iter(starts)
        .map(move |start| {
            let end = last.min(start.saturating_add(FETCH_BATCH - 1));
            let arg = arg.clone();
            async move { client.query(query, &[&start, &end, &arg]).await }
        })
        .buffered(PIPELINE)
}

/// A log row (the columns of FETCH_POINTER / CATCH_UP) as an event.
fn decode_row(row: &tokio_postgres::Row) -> Result<ChangeEvent, CaptureError> {
    let json = |text: Option<&str>| -> Result<Option<serde_json::Value>, CaptureError> {
        text.map(serde_json::from_str)
            .transpose()
            .map_err(|e| CaptureError::BadLogRow(DecodeError::from(e)))
    };
    let bad = |what: &str| {
        CaptureError::BadLogRow(DecodeError::Malformed(serde::de::Error::custom(what)))
    };
    let xid: &str = row.get(1);
    let ts: &str = row.get(2);
    let op = match row.get::<_, &str>(5) {
        "create" => crate::event::Op::Create,
        "update" => crate::event::Op::Update,
        "delete" => crate::event::Op::Delete,
        _ => return Err(bad("unknown op in the log")),
    };
    Ok(ChangeEvent {
        seq: row.get(0),
        xid: xid.parse().map_err(|_| bad("xid is not a number"))?,
        ts: ts.trim_matches('"').to_owned(),
        schema: row.get(3),
        table: row.get(4),
        op,
        id: json(Some(row.get(6)))?.unwrap_or(serde_json::Value::Null),
        data: json(row.get(7))?,
        old: json(row.get(8))?,
    })
}

fn truncate(payload: &str) -> &str {
    let mut end = payload.len().min(200);
    while !payload.is_char_boundary(end) {
        end -= 1;
    }
    &payload[..end]
}
