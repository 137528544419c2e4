//! One poll of the log: the rows of every transaction that became visible since the last
//! poll, published to the hub as one batch.
//!
//! State between polls is one snapshot, `handled`: every transaction visible in it has been
//! published (or committed before the relay first listened, which is not promised). The
//! candidates of the next poll are the transactions `handled` saw in progress (minus those
//! still in progress) and those that started after it; the poll reads, in one snapshot `S`,
//! the log rows of those that `S` sees committed, and `S` becomes `handled`. Nothing depends
//! on notifications having arrived, or on their order, or on their content.
//!
//! Order: a batch publishes whole transactions ordered by their highest seq, each
//! transaction's events in (statement, seq) order. Seqs are drawn when a statement's capture
//! trigger runs, while the statement holds its row locks, so a transaction that changes a row
//! after another committed it draws higher seqs: every row's changes keep their commit order,
//! and so does every chain of transactions where one wrote what it read from another. Within
//! a transaction, a statement's seq is drawn when it starts, so a nested statement (a user
//! trigger writing the same table) comes after the statement that fired it.
//!
//! Every relay reads the chunk headers of every table (bodies only for the tables it
//! exposes), so transaction keys and batch positions mean the same on relays that expose
//! different tables, and a client can resume on any of them.
//!
//! A poll that finds more than a few chunks reads them in a REPEATABLE READ transaction,
//! group by group, publishing as it goes (bounded memory). If the connection drops
//! mid-batch, [`Interrupted`] remembers how far it got, in O(1) space: the next poll first
//! finishes that batch (same snapshot, same batch id, skipping what was published), then
//! goes on.

use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use tokio_postgres::Client;

use super::{CaptureError, Progress};
use serde_json::value::RawValue;

use super::order::{self, Link, State, Tracker};
use crate::event::{LogEvent, LogOp, Op, key_of, parse_body};
use crate::hub::{Change, Hub};
use crate::metrics::Metrics;
use crate::row::Fields;
use crate::snapshot::Snapshot;

/// Chunks read by the single-statement poll; more means the batched path.
const SMALL_POLL: i64 = 64;

/// Chunks per read in the batched path (a chunk holds at most 1000 events or ~1 MiB). With
/// `PIPELINE` reads in flight, their rows wait in the capture connection's read buffer: 8
/// made it 11.7 MB at the peak of a 200k-row burst (heaptrack), 4 takes 2-3 MiB off the
/// relay's peak RSS at the same delivery time (BENCHMARKS.md).
const GROUP_CHUNKS: i64 = 4;

/// Group reads in flight at once.
const PIPELINE: usize = 3;

// The candidates of a poll, as two index range scans (an `or` of the two would make
// PostgreSQL walk the whole log): the transactions the last snapshot saw in progress that are
// no longer running (one index lookup each: a lateral subquery that `offset 0` keeps from
// being flattened into a join the planner may answer with a sequential scan), and those
// that started after it. `$1` xip, `$2` xmax, `$3` exposed relids (only their bodies are read).
const FINISHED: &str = "unnest($1::text[]::xid8[]) as d(x)
      cross join lateral (select * from pgrelay.changes c where c.xid = d.x offset 0) as c
      where coalesce(pg_xact_status(d.x), 'committed') <> 'in progress'";
const STARTED_AFTER: &str = "pgrelay.changes c where c.xid >= $2::text::xid8";

/// The columns every read returns (after the snapshot text or a null in its place).
const COLUMNS: &str = "c.xid::text, c.seq, c.last_seq, c.stmt, c.relid, to_json(c.ts)::text,
    c.keys, case when c.relid = any($3::oid[]) then c.body::text end";

/// The chunks of the candidates, at most `$4` of each kind (more means the batched path),
/// with the snapshot they were read in (one row with nulls when there are none). Public for
/// the test that checks its plan stays index-only however long the log grows.
pub fn small_poll() -> String {
    format!(
        "with snap as (select pg_current_snapshot() as s)
         select snap.s::text, {COLUMNS}
           from snap left join lateral (
                (select c.* from {FINISHED} limit $4)
                union all
                (select c.* from {STARTED_AFTER} order by c.xid, c.stmt, c.seq limit $4)) as c on true"
    )
}

/// The candidate transactions, in publishing order, as a cursor of the batched read's
/// transaction: a backlog of millions of transactions is listed page by page, never held.
fn list_transactions() -> String {
    format!(
        "declare pgrelay_transactions no scroll cursor for
         select c.xid::text, max(c.last_seq), count(*) from (
             select c.xid, c.last_seq from {FINISHED}
             union all
             select c.xid, c.last_seq from {STARTED_AFTER}) as c
          group by c.xid order by 2, 1"
    )
}

/// Transactions listed per page of the batched read.
const LIST_PAGE: i64 = 4096;

fn group_rows() -> String {
    format!(
        "select null::text, {COLUMNS} from pgrelay.changes c
          where c.xid = any($1::text[]::xid8[]) and $2::int8 is not null
          order by c.xid, c.stmt, c.seq"
    )
}

fn txn_window() -> String {
    format!(
        "select null::text, {COLUMNS} from pgrelay.changes c
          where c.xid = $1::text::xid8 and (c.stmt, c.seq) > ($4, $5) and $2::int8 is not null
          order by c.stmt, c.seq limit $6"
    )
}

/// The poll's statements, prepared once per connection (one round trip per poll).
pub struct Statements {
    small: tokio_postgres::Statement,
    list: tokio_postgres::Statement,
    group: tokio_postgres::Statement,
    window: tokio_postgres::Statement,
}

impl Statements {
    /// Prepares them on the capture connection.
    pub async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Statements {
            small: client.prepare(&small_poll()).await?,
            list: client.prepare(&list_transactions()).await?,

            group: client.prepare(&group_rows()).await?,
            window: client.prepare(&txn_window()).await?,
        })
    }
}

/// A transaction's place in a batch: by its highest seq, then its xid.
pub type TxnKey = (i64, u64);

/// A chunk's place in its transaction.
type ChunkPos = (i64, i64);

/// A batch the connection dropped in the middle of.
#[derive(Debug, Clone)]
pub struct Interrupted {
    /// The batch's snapshot: its transactions are those visible here.
    pub snapshot: Arc<Snapshot>,
    /// The batch's id in the hub (still open).
    pub batch: u64,
    /// The last transaction published from (at least partly) and its last chunk published.
    pub last: Option<(TxnKey, ChunkPos)>,
    /// Highest seq published in the batch.
    pub max_seq: i64,
}

impl Interrupted {
    /// Whether the chunk at `pos` of transaction `key` was already published.
    fn published(&self, key: TxnKey, pos: ChunkPos) -> bool {
        match self.last {
            None => false,
            Some((last, last_pos)) => key < last || (key == last && pos <= last_pos),
        }
    }
}

/// A log row (chunk) as read.
struct Chunk {
    xid: u64,
    seq: i64,
    last_seq: i64,
    stmt: i64,
    relid: u32,
    ts: String,
    keys: Option<Vec<String>>,
    /// `None` for a table this relay does not expose.
    body: Option<String>,
}

impl Chunk {
    fn pos(&self) -> ChunkPos {
        (self.stmt, self.seq)
    }
}

/// One thing a chunk tells subscribers, decoded.
struct Item<'a> {
    /// The chunk it came from (its table, transaction and capture time).
    chunk: usize,
    seq: i64,
    relid: u32,
    what: What<'a>,
}

enum What<'a> {
    Change {
        op: Op,
        id: String,
        data: Option<&'a RawValue>,
        old: Option<&'a RawValue>,
    },
    Truncate {
        /// Only a partition of the table was truncated.
        partition: bool,
    },
}

impl<'a> Item<'a> {
    /// The item as [`order`] sees it.
    fn link(&self) -> Link<'_> {
        fn row<'b>(r: &Option<&'b RawValue>) -> State<'b> {
            r.map_or(State::Any, |r| State::Row(r.get()))
        }
        match &self.what {
            What::Change { op, id, data, old } => Link {
                relid: self.relid,
                id,
                before: match op {
                    Op::Create => State::Absent,
                    Op::Update | Op::Delete => row(old),
                },
                after: match op {
                    Op::Delete => State::Absent,
                    Op::Create | Op::Update => row(data),
                },
                barrier: false,
            },
            What::Truncate { .. } => Link {
                relid: self.relid,
                id: "",
                before: State::Any,
                after: State::Any,
                barrier: true,
            },
        }
    }
}

/// Decodes one chunk's events; an update that changed the key becomes a delete of the old
/// key and a create of the new one. An error names what is wrong with the chunk.
fn decode<'a>(
    index: usize,
    chunk: &Chunk,
    events: &[LogEvent<'a>],
) -> Result<Vec<Item<'a>>, &'static str> {
    let keys = chunk.keys.as_deref();
    let key = |row: Option<&RawValue>| -> Result<String, &'static str> {
        let keys = keys.ok_or("the table had no primary key")?;
        let row = row.ok_or("an event lacks its row")?;
        let fields = Fields::parse(row.get()).map_err(|_| "a row is not a JSON object")?;
        key_of(&fields, keys).ok_or("a row lacks a key column")
    };
    let mut items = Vec::with_capacity(events.len());
    let mut push = |seq: i64, what: What<'a>| {
        items.push(Item {
            chunk: index,
            seq,
            relid: chunk.relid,
            what,
        })
    };
    for event in events {
        match event.op {
            LogOp::Change(Op::Create) => push(
                event.seq,
                What::Change {
                    op: Op::Create,
                    id: key(event.data)?,
                    data: event.data,
                    old: None,
                },
            ),
            LogOp::Change(Op::Delete) => push(
                event.seq,
                What::Change {
                    op: Op::Delete,
                    id: key(event.old)?,
                    data: None,
                    old: event.old,
                },
            ),
            LogOp::Change(Op::Update) => {
                let new_id = key(event.data)?;
                // Without the old row (over PostgreSQL's size limit), an update is taken to
                // keep its key.
                let old_id = match event.old {
                    Some(_) => key(event.old)?,
                    None => new_id.clone(),
                };
                if old_id == new_id {
                    push(
                        event.seq,
                        What::Change {
                            op: Op::Update,
                            id: new_id,
                            data: event.data,
                            old: event.old,
                        },
                    );
                } else {
                    let create_seq = event
                        .seq2
                        .ok_or("a key-changing update lacks its second seq")?;
                    push(
                        event.seq,
                        What::Change {
                            op: Op::Delete,
                            id: old_id,
                            data: None,
                            old: event.old,
                        },
                    );
                    push(
                        create_seq,
                        What::Change {
                            op: Op::Create,
                            id: new_id,
                            data: event.data,
                            old: None,
                        },
                    );
                }
            }
            LogOp::Truncate => push(event.seq, What::Truncate { partition: false }),
            LogOp::PartitionTruncate => push(event.seq, What::Truncate { partition: true }),
            LogOp::Marker => {}
        }
    }
    Ok(items)
}

/// A change as [`decode`] reads it from a chunk body: `(seq, op, id, data, old)`, or `None`
/// for a truncate.
pub(crate) type Decoded<'a> = Option<(i64, Op, String, Option<&'a RawValue>, Option<&'a RawValue>)>;

/// Decodes one chunk body of a table keyed by `keys` as the poll loop does (fuzzing: the
/// same [`parse_body`] and [`decode`], without a database); the error is what the loop logs.
pub(crate) fn decode_body<'a>(
    body: &'a str,
    keys: Option<Vec<String>>,
) -> Result<Vec<Decoded<'a>>, String> {
    let chunk = Chunk {
        xid: 1,
        seq: 1,
        last_seq: 1,
        stmt: 0,
        relid: 1,
        ts: String::new(),
        keys,
        body: None,
    };
    let events = parse_body(body).map_err(|err| err.to_string())?;
    let items = decode(0, &chunk, &events).map_err(str::to_owned)?;
    Ok(items
        .into_iter()
        .map(|item| match item.what {
            What::Change { op, id, data, old } => Some((item.seq, op, id, data, old)),
            What::Truncate { .. } => None,
        })
        .collect())
}

fn chunk(row: &tokio_postgres::Row) -> Result<Option<Chunk>, CaptureError> {
    let Some(xid) = row.get::<_, Option<&str>>(1) else {
        return Ok(None);
    };
    let ts: &str = row.get(6);
    Ok(Some(Chunk {
        xid: xid
            .parse()
            .map_err(|_| CaptureError::Invariant("xid is not a number"))?,
        seq: row.get(2),
        last_seq: row.get(3),
        stmt: row.get(4),
        relid: row.get(5),
        ts: ts.trim_matches('"').to_owned(),
        keys: row.get(7),
        body: row.get(8),
    }))
}

/// What one poll did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Polled {
    /// Events published.
    pub events: u64,
}

/// Publishes chunks of one batch, transaction by transaction.
struct Publisher<'a> {
    hub: &'a Hub,
    metrics: &'a Metrics,
    batch: Option<u64>,
    max_seq: i64,
    events: u64,
    /// Set when continuing an interrupted batch: skip what it published.
    skip: Option<Interrupted>,
    /// Progress for a new interruption: the transaction and chunk last published.
    last: Option<(TxnKey, ChunkPos)>,
    /// Last published (seq, capture time), for `pgrelay status`.
    newest: Option<(i64, String)>,
}

impl<'a> Publisher<'a> {
    fn new(hub: &'a Hub, metrics: &'a Metrics, continuing: Option<Interrupted>) -> Self {
        let (batch, max_seq, last) = match &continuing {
            Some(i) => (Some(i.batch), i.max_seq, i.last),
            None => (None, i64::MIN, None),
        };
        Publisher {
            hub,
            metrics,
            batch,
            max_seq,
            events: 0,
            skip: continuing,
            last,
            newest: None,
        }
    }

    fn batch(&mut self) -> u64 {
        *self.batch.get_or_insert_with(|| self.hub.begin_batch())
    }

    /// Publishes one transaction's chunks (read in (stmt, seq) order), each row's events in
    /// an order its rows agree with (see [`order`]). Runs to the end without awaiting: a
    /// chunk is published whole or not at all. With `tracker`, the chunks are one window of a
    /// transaction too large to hold: they are published in the log's order and checked as
    /// they go.
    fn transaction(&mut self, key: TxnKey, chunks: &[Chunk], tracker: Option<&mut Tracker>) {
        let mut items: Vec<Item<'_>> = Vec::new();
        // Whether some table has events from more than one chunk (else nothing to check).
        let mut tables: Vec<(u32, usize)> = Vec::new();
        let mut several = false;
        for (index, chunk) in chunks.iter().enumerate() {
            if self
                .skip
                .as_ref()
                .is_some_and(|s| s.published(key, chunk.pos()))
            {
                continue;
            }
            // Every chunk counts for positions, exposed or not (see the module docs).
            self.batch();
            self.max_seq = self.max_seq.max(chunk.last_seq);
            self.last = Some((key, chunk.pos()));
            let Some(body) = &chunk.body else { continue };
            let decoded = parse_body(body)
                .map_err(|err| err.to_string())
                .and_then(|events| decode(index, chunk, &events).map_err(str::to_owned));
            match decoded {
                Ok(decoded) => {
                    match tables.iter().find(|(relid, _)| *relid == chunk.relid) {
                        Some((_, first)) => several |= *first != index,
                        None => tables.push((chunk.relid, index)),
                    }
                    items.extend(decoded);
                }
                Err(why) => self.unreadable(chunk, &why),
            }
        }
        // Rows are only checked where they can be out of order: a table with events from
        // more than one chunk, or a transaction published as it is read.
        let (order, unresolved) = match tracker {
            Some(tracker) => {
                let broken = items
                    .iter()
                    .map(Item::link)
                    .filter(|link| !tracker.check(link))
                    .map(|link| link.relid)
                    .collect();
                ((0..items.len()).collect(), broken)
            }
            None if several => {
                let links: Vec<Link<'_>> = items.iter().map(Item::link).collect();
                let (order, unresolved) = order::repair(&links);
                if order.iter().enumerate().any(|(i, o)| i != *o) {
                    tracing::debug!(
                        xid = key.1,
                        "a transaction's events were put back in row order"
                    );
                }
                (order, unresolved)
            }
            None => ((0..items.len()).collect(), Vec::new()),
        };
        let batch = self.batch.unwrap_or_default();
        // A partition truncated right after its root in the same transaction adds nothing.
        let mut truncated: Vec<u32> = Vec::new();
        for i in order {
            let item = &items[i];
            let chunk = &chunks[item.chunk];
            match &item.what {
                What::Change { op, id, data, old } => {
                    truncated.retain(|r| *r != chunk.relid);
                    let change = Change {
                        op: *op,
                        seq: item.seq,
                        id,
                        data: *data,
                        old: *old,
                    };
                    let published =
                        self.hub
                            .publish_change(chunk.relid, batch, chunk.xid, &chunk.ts, &change);
                    self.count(published);
                }
                What::Truncate { partition: true } if truncated.contains(&chunk.relid) => {}
                What::Truncate { partition } => {
                    if !partition {
                        truncated.push(chunk.relid);
                    }
                    let published = self.hub.publish_truncate(
                        chunk.relid,
                        batch,
                        chunk.xid,
                        &chunk.ts,
                        item.seq,
                        *partition,
                    );
                    self.count(published);
                }
            }
            match &mut self.newest {
                Some((seq, ts)) => {
                    *seq = item.seq;
                    ts.clone_from(&chunk.ts);
                }
                None => self.newest = Some((item.seq, chunk.ts.clone())),
            }
        }
        self.hub.wake();
        for relid in unresolved {
            self.metrics.inc(&self.metrics.order_unknown);
            tracing::warn!(
                xid = key.1,
                relid,
                "a transaction changed rows of a table in an order its log does not show (a BEFORE trigger or a function writing the table it is called on); the table's subscribers are reset"
            );
            self.hub.publish_reset_relid(relid, "order_unknown");
        }
    }

    fn count(&mut self, published: bool) {
        if published {
            self.events += 1;
            self.metrics.inc(&self.metrics.events_captured);
        }
    }

    /// A chunk that cannot be turned into events: its table's subscribers are reset, the
    /// rest goes on.
    fn unreadable(&mut self, chunk: &Chunk, why: &str) {
        self.metrics.inc(&self.metrics.bad_log_rows);
        tracing::error!(
            xid = chunk.xid,
            relid = chunk.relid,
            seq = chunk.seq,
            error = why,
            "a log row could not be read; its table's subscribers are reset"
        );
        self.batch();
        self.hub.publish_reset_relid(chunk.relid, "events_missing");
    }

    /// Ends the batch, if one was opened.
    fn finish(self, progress: &mut Progress) -> u64 {
        if let Some(batch) = self.batch {
            self.hub.end_batch(batch, self.max_seq);
        }
        if let Some(newest) = self.newest {
            progress.last = Some(newest);
        }
        self.events
    }

    fn interrupted(&self, snapshot: &Arc<Snapshot>) -> Option<Interrupted> {
        self.batch.map(|batch| Interrupted {
            snapshot: Arc::clone(snapshot),
            batch,
            last: self.last,
            max_seq: self.max_seq,
        })
    }
}

/// Groups chunks (sorted by xid, stmt, seq) into transactions ordered by [`TxnKey`].
fn transactions(chunks: Vec<Chunk>) -> Vec<(TxnKey, Vec<Chunk>)> {
    let mut txns: Vec<(TxnKey, Vec<Chunk>)> = Vec::new();
    for chunk in chunks {
        match txns.last_mut() {
            Some(((max, xid), list)) if *xid == chunk.xid => {
                *max = (*max).max(chunk.last_seq);
                list.push(chunk);
            }
            _ => txns.push(((chunk.last_seq, chunk.xid), vec![chunk])),
        }
    }
    txns.sort_by_key(|(key, _)| *key);
    txns
}

/// Polls once: finishes an interrupted batch first, then reads what is new.
pub async fn poll(
    client: &Client,
    statements: &Statements,
    progress: &mut Progress,
    hub: &Hub,
    metrics: &Metrics,
) -> Result<Polled, CaptureError> {
    let mut polled = Polled::default();
    tracing::trace!(interrupted = progress.interrupted.is_some(), "poll");
    if let Some(interrupted) = progress.interrupted.clone() {
        polled.events += batched(
            client,
            statements,
            progress,
            hub,
            metrics,
            Some(interrupted),
        )
        .await?;
    }
    let handled = Arc::clone(&progress.handled);
    // The exposed tables must be read after the poll's snapshot is taken: a table exposed
    // meanwhile (re-created, say) would have its rows in the snapshot but not read. They are
    // checked after it instead, and the poll runs again if they changed.
    let rows = loop {
        let relids = hub.relids();
        let rows = client
            .query(
                &statements.small,
                &[
                    &handled.xip_text(),
                    &handled.xmax_text(),
                    &relids,
                    &SMALL_POLL,
                ],
            )
            .await?;
        if hub.relids() == relids {
            break rows;
        }
    };
    let snapshot_text: &str = rows
        .first()
        .map(|r| r.get(0))
        .ok_or(CaptureError::Invariant("poll returned no snapshot"))?;
    let snapshot = Snapshot::parse(snapshot_text)
        .ok_or(CaptureError::Invariant("poll returned a bad snapshot"))?;
    let found = rows
        .iter()
        .filter(|r| r.get::<_, Option<&str>>(1).is_some())
        .count();
    if found as i64 >= SMALL_POLL {
        tracing::trace!(found, "poll: batched read");
        polled.events += batched(client, statements, progress, hub, metrics, None).await?;
        tracing::trace!(events = polled.events, "poll: batched read done");
        return Ok(polled);
    }
    let mut chunks = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(chunk) = chunk(row)? {
            chunks.push(chunk);
        }
    }
    // The two kinds of candidates come separately: in (xid, stmt, seq) order for grouping.
    chunks.sort_by_key(|c| (c.xid, c.stmt, c.seq));
    // Nothing below awaits: a small batch is published whole or not at all.
    let mut publisher = Publisher::new(hub, metrics, None);
    for (key, chunks) in transactions(chunks) {
        publisher.transaction(key, &chunks, None);
    }
    polled.events += publisher.finish(progress);
    progress.handled = Arc::new(snapshot);
    Ok(polled)
}

/// The batched path, in one REPEATABLE READ snapshot: lists the new transactions, then reads
/// and publishes them group by group. With `continuing`, publishes only the rest of that
/// interrupted batch (its transactions are those its snapshot sees).
async fn batched(
    client: &Client,
    statements: &Statements,
    progress: &mut Progress,
    hub: &Hub,
    metrics: &Metrics,
    continuing: Option<Interrupted>,
) -> Result<u64, CaptureError> {
    client
        .batch_execute("begin isolation level repeatable read read only")
        .await?;
    let text: String = client
        .query_one("select pg_current_snapshot()::text", &[])
        .await?
        .get(0);
    let now = Snapshot::parse(&text).ok_or(CaptureError::Invariant("bad snapshot"))?;
    let batch_snapshot = match &continuing {
        Some(i) => Arc::clone(&i.snapshot),
        None => Arc::new(now),
    };
    let relids = hub.relids();
    let handled = Arc::clone(&progress.handled);
    client
        .execute(
            &statements.list,
            &[&handled.xip_text(), &handled.xmax_text()],
        )
        .await?;
    // (Prepared once the cursor exists: that is when its columns are known.)
    let fetch = client
        .prepare(&format!("fetch {LIST_PAGE} from pgrelay_transactions"))
        .await?;
    let mut publisher = Publisher::new(hub, metrics, continuing.clone());
    loop {
        let page = match client.query(&fetch, &[]).await {
            Ok(page) => page,
            Err(err) => {
                progress.interrupted = publisher.interrupted(&batch_snapshot);
                return Err(err.into());
            }
        };
        let mut txns: Vec<(TxnKey, i64)> = Vec::with_capacity(page.len());
        for row in &page {
            let xid: u64 = row
                .get::<_, &str>(0)
                .parse()
                .map_err(|_| CaptureError::Invariant("xid is not a number"))?;
            if continuing.is_some() && !batch_snapshot.contains(xid) {
                continue;
            }
            let key = (row.get::<_, i64>(1), xid);
            if let Some(i) = &continuing
                && i.last.is_some_and(|(last, _)| key < last)
            {
                continue;
            }
            txns.push((key, row.get::<_, i64>(2)));
        }
        tracing::trace!(transactions = txns.len(), "batched read: a page listed");
        if let Err(err) = publish_groups(client, statements, &mut publisher, &txns, &relids).await {
            progress.interrupted = publisher.interrupted(&batch_snapshot);
            return Err(err);
        }
        if (page.len() as i64) < LIST_PAGE {
            break;
        }
    }
    // Everything is published: the state moves on before the read-only transaction ends, so
    // a connection lost at its COMMIT does not send the batch again.
    let events = publisher.finish(progress);
    progress.interrupted = None;
    progress.handled = batch_snapshot;
    client.batch_execute("commit").await?;
    Ok(events)
}

/// Reads the transactions' chunks in groups (pipelined) and publishes them in order.
async fn publish_groups(
    client: &Client,
    statements: &Statements,
    publisher: &mut Publisher<'_>,
    txns: &[(TxnKey, i64)],
    relids: &[u32],
) -> Result<(), CaptureError> {
    // Groups: consecutive small transactions up to GROUP_CHUNKS chunks, or one large one.
    let mut groups: Vec<Vec<(TxnKey, i64)>> = Vec::new();
    let mut start = 0;
    let mut chunks = 0;
    for (i, (_, n)) in txns.iter().enumerate() {
        if i > start && chunks + n > GROUP_CHUNKS {
            groups.push(txns[start..i].to_vec());
            start = i;
            chunks = 0;
        }
        chunks += n;
    }
    if start < txns.len() {
        groups.push(txns[start..].to_vec());
    }
    // Small groups are read pipelined; a large transaction is read alone, window by window,
    // once every pipelined read has been answered: the connection answers in order, so a
    // window query sent while earlier answers wait unread would never be answered.
    let mut pending: Vec<Vec<(TxnKey, i64)>> = Vec::new();
    for group in groups {
        if group.len() == 1 && group[0].1 > GROUP_CHUNKS {
            read_groups(
                client,
                statements,
                publisher,
                std::mem::take(&mut pending),
                relids,
            )
            .await?;
            read_large(client, statements, publisher, group[0].0, relids).await?;
        } else {
            pending.push(group);
        }
    }
    read_groups(client, statements, publisher, pending, relids).await
}

/// Reads groups of small transactions, pipelined, and publishes them in order.
async fn read_groups(
    client: &Client,
    statements: &Statements,
    publisher: &mut Publisher<'_>,
    groups: Vec<Vec<(TxnKey, i64)>>,
    relids: &[u32],
) -> Result<(), CaptureError> {
    // (`$2` of the group query is unused but typed, so both queries bind alike.)
    let read = |group: Vec<(TxnKey, i64)>| async move {
        let xids: Vec<String> = group.iter().map(|((_, x), _)| x.to_string()).collect();
        let rows = client
            .query(&statements.group, &[&xids, &0i64, &relids])
            .await?;
        Ok::<_, tokio_postgres::Error>((group, rows))
    };
    let mut reads = futures_util::stream::iter(groups)
        .map(read)
        .buffered(PIPELINE);
    while let Some((group, rows)) = reads.try_next().await? {
        let mut by_xid: Vec<(u64, Vec<Chunk>)> = Vec::new();
        for row in &rows {
            let Some(c) = chunk(row)? else { continue };
            match by_xid.last_mut() {
                Some((xid, list)) if *xid == c.xid => list.push(c),
                _ => by_xid.push((c.xid, vec![c])),
            }
        }
        for (key, _) in &group {
            if let Some(i) = by_xid.iter().position(|(x, _)| *x == key.1) {
                let (_, list) = by_xid.swap_remove(i);
                publisher.transaction(*key, &list, None);
            }
        }
    }
    Ok(())
}

/// Reads one large transaction in windows of its (stmt, seq) order and publishes it.
async fn read_large(
    client: &Client,
    statements: &Statements,
    publisher: &mut Publisher<'_>,
    key: TxnKey,
    relids: &[u32],
) -> Result<(), CaptureError> {
    let xid = key.1.to_string();
    let mut after = (i64::MIN, i64::MIN);
    let mut tracker = Tracker::default();
    loop {
        let rows = client
            .query(
                &statements.window,
                &[&xid, &0i64, &relids, &after.0, &after.1, &GROUP_CHUNKS],
            )
            .await?;
        let mut list = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(c) = chunk(row)? {
                after = c.pos();
                list.push(c);
            }
        }
        publisher.transaction(key, &list, Some(&mut tracker));
        if (rows.len() as i64) < GROUP_CHUNKS {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(xid: u64, last_seq: i64) -> Chunk {
        Chunk {
            xid,
            seq: last_seq,
            last_seq,
            stmt: last_seq,
            relid: 1,
            ts: String::new(),
            keys: None,
            body: None,
        }
    }

    #[test]
    fn transactions_are_ordered_by_their_highest_seq() {
        // xid 7 took seq 1 and 9 (a late statement); xid 8 took seq 5 and committed too.
        let txns = transactions(vec![c(7, 1), c(7, 9), c(8, 5)]);
        let keys: Vec<TxnKey> = txns.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [(5, 8), (9, 7)]);
        assert_eq!(txns[1].1.len(), 2);
    }

    #[test]
    fn an_interruption_skips_what_it_published() {
        let i = Interrupted {
            snapshot: Arc::new(Snapshot::parse("1:1:").unwrap()),
            batch: 1,
            last: Some(((10, 3), (4, 7))),
            max_seq: 10,
        };
        assert!(i.published((5, 9), (1, 5)));
        assert!(i.published((10, 3), (4, 7)));
        assert!(i.published((10, 3), (2, 9)));
        assert!(!i.published((10, 3), (4, 8)));
        assert!(!i.published((11, 1), (1, 1)));
    }
}
