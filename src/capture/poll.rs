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
//! transaction's events in seq order. Seqs are drawn when a statement's capture trigger
//! runs, while the statement holds its row locks, so a transaction that changes a row after
//! another committed it draws higher seqs: every row's changes keep their commit order, and
//! so does every chain of transactions where one wrote what it read from another.
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
use crate::event::{LogOp, parse_body};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// Chunks read by the single-statement poll; more means the batched path.
const SMALL_POLL: i64 = 64;

/// Chunks per read in the batched path (a chunk holds at most 1000 events or ~1 MiB).
const GROUP_CHUNKS: i64 = 16;

/// Group reads in flight at once.
const PIPELINE: usize = 3;

// The candidates of a poll, as two index range scans (an `or` of the two would make
// PostgreSQL walk the whole log): the transactions the last snapshot saw in progress that are
// no longer running (one index lookup each: a lateral subquery that `offset 0` keeps from
// being flattened into a join the planner may answer with a sequential scan), and those
// that started after it. `$1` xip, `$2` xmax, `$3` relids.
const FINISHED: &str = "unnest($1::text[]::xid8[]) as d(x)
      cross join lateral (select * from pgrelay.changes c
                           where c.xid = d.x and c.relid = any($3::oid[]) offset 0) as c
      where coalesce(pg_xact_status(d.x), 'committed') <> 'in progress'";
const STARTED_AFTER: &str =
    "pgrelay.changes c where c.xid >= $2::text::xid8 and c.relid = any($3::oid[])";

/// The chunks of the candidates, at most `$4` of each kind (more means the batched path),
/// with the snapshot they were read in (one row with nulls when there are none). Public for
/// the test that checks its plan stays index-only however long the log grows.
pub fn small_poll() -> String {
    format!(
        "with snap as (select pg_current_snapshot() as s)
         select snap.s::text, c.xid::text, c.seq, c.last_seq, c.relid, to_json(c.ts)::text, c.body::text
           from snap left join lateral (
                (select c.* from {FINISHED} limit $4)
                union all
                (select c.* from {STARTED_AFTER} order by c.xid, c.seq limit $4)) as c on true"
    )
}

/// The candidate transactions, in publishing order.
fn list_transactions() -> String {
    format!(
        "select c.xid::text, max(c.last_seq), count(*) from (
             select c.xid, c.last_seq from {FINISHED}
             union all
             select c.xid, c.last_seq from {STARTED_AFTER}) as c
          group by c.xid order by 2, 1"
    )
}

const GROUP_ROWS: &str = "
    select null::text, c.xid::text, c.seq, c.last_seq, c.relid, to_json(c.ts)::text, c.body::text
      from pgrelay.changes c
     where c.xid = any($1::text[]::xid8[]) and c.relid = any($2::oid[])
     order by c.xid, c.seq";

const TXN_WINDOW: &str = "
    select null::text, c.xid::text, c.seq, c.last_seq, c.relid, to_json(c.ts)::text, c.body::text
      from pgrelay.changes c
     where c.xid = $1::text::xid8 and c.relid = any($2::oid[]) and c.seq > $3
     order by c.seq limit $4";

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
            group: client.prepare(GROUP_ROWS).await?,
            window: client.prepare(TXN_WINDOW).await?,
        })
    }
}

/// A transaction's place in a batch: by its highest seq, then its xid.
pub type TxnKey = (i64, u64);

/// A batch the connection dropped in the middle of.
#[derive(Debug, Clone)]
pub struct Interrupted {
    /// The batch's snapshot: its transactions are those visible here.
    pub snapshot: Arc<Snapshot>,
    /// The batch's id in the hub (still open).
    pub batch: u64,
    /// The last transaction published from (at least partly) and its last published seq.
    pub last: Option<(TxnKey, i64)>,
    /// Highest seq published in the batch.
    pub max_seq: i64,
}

impl Interrupted {
    /// Whether an event of transaction `key` with `seq` was already published.
    fn published(&self, key: TxnKey, seq: i64) -> bool {
        match self.last {
            None => false,
            Some((last, last_seq)) => key < last || (key == last && seq <= last_seq),
        }
    }
}

/// A log row (chunk) as read.
struct Chunk {
    xid: u64,
    relid: u32,
    ts: String,
    body: String,
}

fn chunk(row: &tokio_postgres::Row) -> Result<Option<Chunk>, CaptureError> {
    let Some(xid) = row.get::<_, Option<&str>>(1) else {
        return Ok(None);
    };
    let ts: &str = row.get(5);
    Ok(Some(Chunk {
        xid: xid
            .parse()
            .map_err(|_| CaptureError::Invariant("xid is not a number"))?,
        relid: row.get(4),
        ts: ts.trim_matches('"').to_owned(),
        body: row.get(6),
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
    /// Progress for a new interruption: the transaction and seq last published.
    last: Option<(TxnKey, i64)>,
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

    /// Publishes one transaction's chunks (in seq order).
    fn transaction(&mut self, key: TxnKey, chunks: &[Chunk]) {
        // A partition truncated right after its root in the same transaction adds nothing.
        let mut truncated: Vec<u32> = Vec::new();
        for chunk in chunks {
            let events = match parse_body(&chunk.body) {
                Ok(events) => events,
                Err(err) => {
                    self.metrics.inc(&self.metrics.bad_log_rows);
                    tracing::error!(xid = chunk.xid, relid = chunk.relid, error = %err,
                        "a log row could not be read; its table's subscribers are reset");
                    self.batch();
                    self.hub.publish_reset_relid(chunk.relid, "events_missing");
                    continue;
                }
            };
            for event in &events {
                if self
                    .skip
                    .as_ref()
                    .is_some_and(|s| s.published(key, event.seq))
                {
                    continue;
                }
                match event.op {
                    LogOp::Truncate => truncated.push(chunk.relid),
                    LogOp::PartitionTruncate if truncated.contains(&chunk.relid) => continue,
                    LogOp::Change(_) => truncated.retain(|r| *r != chunk.relid),
                    _ => {}
                }
                let batch = self.batch();
                if self
                    .hub
                    .publish(chunk.relid, batch, chunk.xid, &chunk.ts, event)
                {
                    self.events += 1;
                    self.metrics.inc(&self.metrics.events_captured);
                }
                self.max_seq = self.max_seq.max(event.seq);
                self.last = Some((key, event.seq));
                match &mut self.newest {
                    Some((seq, ts)) => {
                        *seq = event.seq;
                        ts.clone_from(&chunk.ts);
                    }
                    None => self.newest = Some((event.seq, chunk.ts.clone())),
                }
            }
        }
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

/// Groups chunks (sorted by xid, seq) into transactions ordered by [`TxnKey`].
fn transactions(chunks: Vec<Chunk>, last_seqs: &[i64]) -> Vec<(TxnKey, Vec<Chunk>)> {
    let mut txns: Vec<(TxnKey, Vec<Chunk>)> = Vec::new();
    for (chunk, last_seq) in chunks.into_iter().zip(last_seqs) {
        match txns.last_mut() {
            Some(((max, xid), list)) if *xid == chunk.xid => {
                *max = (*max).max(*last_seq);
                list.push(chunk);
            }
            _ => txns.push(((*last_seq, chunk.xid), vec![chunk])),
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
    let relids = relids(hub);
    let handled = Arc::clone(&progress.handled);
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
    let snapshot_text: &str = rows
        .first()
        .map(|r| r.get(0))
        .ok_or(CaptureError::Invariant("poll returned no snapshot"))?;
    let snapshot = Snapshot::parse(snapshot_text)
        .ok_or(CaptureError::Invariant("poll returned a bad snapshot"))?;
    let finished = rows
        .iter()
        .filter(|r| r.get::<_, Option<&str>>(1).is_some())
        .count();
    if finished as i64 >= SMALL_POLL {
        polled.events += batched(client, statements, progress, hub, metrics, None).await?;
        return Ok(polled);
    }
    let mut read = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(chunk) = chunk(row)? {
            read.push((chunk, row.get::<_, i64>(2), row.get::<_, i64>(3)));
        }
    }
    // The two kinds of candidates come separately: in (xid, seq) order for grouping.
    read.sort_by_key(|(c, seq, _)| (c.xid, *seq));
    let (chunks, last_seqs): (Vec<Chunk>, Vec<i64>) =
        read.into_iter().map(|(c, _, last)| (c, last)).unzip();
    // Nothing below awaits: a small batch is published whole or not at all.
    let mut publisher = Publisher::new(hub, metrics, None);
    for (key, chunks) in transactions(chunks, &last_seqs) {
        publisher.transaction(key, &chunks);
    }
    polled.events += publisher.finish(progress);
    progress.handled = Arc::new(snapshot);
    Ok(polled)
}

fn relids(hub: &Hub) -> Vec<u32> {
    let mut relids = hub.relids();
    // Relays' start markers (no table) count for positions.
    relids.push(0);
    relids
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
    let relids = relids(hub);
    let handled = Arc::clone(&progress.handled);
    let listed = client
        .query(
            &statements.list,
            &[&handled.xip_text(), &handled.xmax_text(), &relids],
        )
        .await?;
    let mut txns: Vec<(TxnKey, i64)> = Vec::with_capacity(listed.len());
    for row in &listed {
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
    drop(listed);

    let mut publisher = Publisher::new(hub, metrics, continuing);
    let result = publish_groups(client, statements, &mut publisher, &txns, &relids).await;
    if let Err(err) = result {
        progress.interrupted = publisher.interrupted(&batch_snapshot);
        return Err(err);
    }
    client.batch_execute("commit").await?;
    let events = publisher.finish(progress);
    progress.interrupted = None;
    progress.handled = batch_snapshot;
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
    let read = |group: Vec<(TxnKey, i64)>| async move {
        if group.len() == 1 && group[0].1 > GROUP_CHUNKS {
            return Ok::<_, tokio_postgres::Error>((group, None));
        }
        let xids: Vec<String> = group.iter().map(|((_, x), _)| x.to_string()).collect();
        let rows = client.query(&statements.group, &[&xids, &relids]).await?;
        Ok((group, Some(rows)))
    };
    let mut reads = futures_util::stream::iter(groups)
        .map(read)
        .buffered(PIPELINE);
    while let Some((group, rows)) = reads.try_next().await? {
        match rows {
            Some(rows) => {
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
                        publisher.transaction(*key, &list);
                    }
                }
            }
            None => {
                // One large transaction: read it in windows of its seqs.
                let (key, _) = group[0];
                let xid = key.1.to_string();
                let mut after = i64::MIN;
                loop {
                    let rows = client
                        .query(&statements.window, &[&xid, &relids, &after, &GROUP_CHUNKS])
                        .await?;
                    let mut list = Vec::with_capacity(rows.len());
                    for row in &rows {
                        after = row.get(2);
                        if let Some(c) = chunk(row)? {
                            list.push(c);
                        }
                    }
                    publisher.transaction(key, &list);
                    if (rows.len() as i64) < GROUP_CHUNKS {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(xid: u64) -> Chunk {
        Chunk {
            xid,
            relid: 1,
            ts: String::new(),
            body: String::new(),
        }
    }

    #[test]
    fn transactions_are_ordered_by_their_highest_seq() {
        // xid 7 took seq 1 and 9 (a late statement); xid 8 took seq 5 and committed too.
        let txns = transactions(vec![c(7), c(7), c(8)], &[1, 9, 5]);
        let keys: Vec<TxnKey> = txns.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [(5, 8), (9, 7)]);
        assert_eq!(txns[1].1.len(), 2);
    }

    #[test]
    fn an_interruption_skips_what_it_published() {
        let i = Interrupted {
            snapshot: Arc::new(Snapshot::parse("1:1:").unwrap()),
            batch: 1,
            last: Some(((10, 3), 7)),
            max_seq: 10,
        };
        assert!(i.published((5, 9), 5));
        assert!(i.published((10, 3), 7));
        assert!(!i.published((10, 3), 8));
        assert!(!i.published((11, 1), 1));
    }
}
