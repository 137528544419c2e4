//! Pruning of `pgrelay.changes` by age and/or event count, in small batches.
//!
//! Each batch is its own short statement, so pruning never holds locks for long and never
//! blocks writers. Rows are visited in (xid, stmt, seq) order through the log's one index, oldest
//! transactions first.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sql::SqlError;

/// Rows deleted per statement.
const BATCH: i64 = 5000;

// A row is kept, whatever its age or count, while a relay seen in the last five minutes has
// not read it: its transaction is not visible in the snapshot the relay last reported (it
// may still have to read it: a poll it has not made yet, or a catch-up after a reconnect).
// Every delete has this condition. (A transaction left open anywhere in the cluster does not
// hold pruning back, only that transaction's own rows stay.)
const UNREAD: &str = "exists (select 1 from pgrelay.relays r
                               where r.seen_at > now() - interval '5 minutes'
                                 and case when r.snapshot is null then c.xid >= r.horizon
                                          else not pg_visible_in_snapshot(c.xid, r.snapshot) end)";

// Log rows are chunks of events; `n` counts the events of one. Both kinds of retention
// delete a prefix of the log in the order of its index, (xid, stmt, seq): finding where the
// prefix ends walks the index from one end and stops there, and the deletes walk it from the
// start, so a round costs what it deletes (plus what must be kept, for the count), never a
// scan of the whole log.

// Each delete reports how many rows it removed and the highest xid among them, which goes to
// pgrelay.pruned (see sql/install.sql).

/// The first log row, in index order, young enough to keep: it and everything after it stay.
const AGE_CUTOFF: &str = "
    select c.xid::text as cut_xid, c.stmt as cut_stmt, c.seq as cut_seq
      from pgrelay.changes c where c.ts >= now() - make_interval(secs => $1)
     order by c.xid, c.stmt, c.seq limit 1";

/// The newest log row that comes after `$1` newer events: it and everything older goes.
/// (The output names differ from the columns': `order by xid` would otherwise sort the xid's
/// text, and 9 sorts after 10.)
const EVENTS_CUTOFF: &str = "
    select t.xid::text as cut_xid, t.stmt as cut_stmt, t.seq as cut_seq from (
        select c.xid, c.stmt, c.seq,
               sum(c.n) over (order by c.xid desc, c.stmt desc, c.seq desc) - c.n as newer
          from pgrelay.changes c
    ) as t where t.newer >= $1 order by t.xid desc, t.stmt desc, t.seq desc limit 1";

/// Deletes up to `$4` log rows before (`<`, or up to with `<=`) the cutoff `($1, $2, $3)`,
/// oldest first.
fn prune_prefix(inclusive: bool) -> String {
    let op = if inclusive { "<=" } else { "<" };
    format!(
        "with gone as (
             delete from pgrelay.changes where ctid = any(array(
                 select ctid from pgrelay.changes c
                  where (c.xid, c.stmt, c.seq) {op} ($1::text::xid8, $2, $3)
                    and not {UNREAD}
                  order by c.xid, c.stmt, c.seq limit $4))
             returning xid)
         select count(*), max(xid)::text from gone"
    )
}

const RECORD_PRUNED: &str = "
    insert into pgrelay.pruned (xid) values ($1::text::xid8)
    on conflict (one) do update set xid = greatest(pruned.xid, excluded.xid)";

const PRUNE_RELAYS: &str = "delete from pgrelay.relays where seen_at < now() - interval '1 day'";

/// How much of the log to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Delete events older than this.
    pub max_age: Option<Duration>,
    /// Keep at most about this many events (the newest; whole log rows are kept or pruned).
    pub max_rows: Option<i64>,
    /// Time between pruning rounds.
    pub interval: Duration,
}

/// Prunes every `interval` until `token` is cancelled. Failures are logged and retried next
/// round: pruning is housekeeping, never a reason to stop serving.
pub async fn run(
    pool: Pool,
    retention: Retention,
    metrics: std::sync::Arc<Metrics>,
    token: CancellationToken,
) {
    if retention.max_age.is_none() && retention.max_rows.is_none() {
        return;
    }
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(retention.interval) => {}
        }
        match prune(&pool, &retention, &token).await {
            Ok(0) => {}
            Ok(rows) => {
                metrics.add(&metrics.pruned_rows, rows);
                tracing::info!(rows, "pruned the change log");
            }
            Err(err) => {
                tracing::warn!(error = %crate::error::chain(&err), "pruning the change log failed")
            }
        }
    }
}

/// One pruning round; returns the log rows deleted.
pub async fn prune(
    pool: &Pool,
    retention: &Retention,
    token: &CancellationToken,
) -> Result<u64, SqlError> {
    let client = pool.get().await?;
    let mut deleted = 0;
    if let Some(age) = retention.max_age {
        let secs = age.as_secs_f64();
        // Everything is old when no row is young: the cutoff is past the end.
        let cutoff = match client.query_opt(AGE_CUTOFF, &[&secs]).await? {
            Some(row) => (row.get(0), row.get(1), row.get(2), false),
            None => (u64::MAX.to_string(), i64::MAX, i64::MAX, true),
        };
        deleted += prune_before(&client, cutoff, token).await?;
    }
    if let Some(events) = retention.max_rows
        && let Some(row) = client.query_opt(EVENTS_CUTOFF, &[&events]).await?
    {
        let cutoff = (row.get(0), row.get(1), row.get(2), true);
        deleted += prune_before(&client, cutoff, token).await?;
    }
    client.execute(PRUNE_RELAYS, &[]).await?;
    Ok(deleted)
}

/// Deletes, batch by batch, the log rows before the cutoff `(xid, stmt, seq, inclusive)`.
async fn prune_before(
    client: &tokio_postgres::Client,
    (xid, stmt, seq, inclusive): (String, i64, i64, bool),
    token: &CancellationToken,
) -> Result<u64, SqlError> {
    let statement = client.prepare(&prune_prefix(inclusive)).await?;
    let mut deleted = 0;
    loop {
        let n = deleted_rows(client, &statement, &[&xid, &stmt, &seq, &BATCH]).await?;
        deleted += n;
        if n < BATCH as u64 || token.is_cancelled() {
            return Ok(deleted);
        }
    }
}

/// Runs one delete, records the highest xid it removed, and returns how many rows it removed.
async fn deleted_rows(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, SqlError> {
    let row = client.query_one(statement, params).await?;
    let (count, max): (i64, Option<String>) = (row.get(0), row.get(1));
    if let Some(max) = max {
        client.execute(RECORD_PRUNED, &[&max]).await?;
    }
    Ok(u64::try_from(count).unwrap_or(0))
}
