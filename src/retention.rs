//! Pruning of `pgrelay.changes` by age and/or event count, in small batches.
//!
//! Each batch is its own short statement, so pruning never holds locks for long and never
//! blocks writers. Rows are visited in (xid, seq) order through the log's one index, oldest
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

// Log rows are chunks of events; `n` counts the events of one.

// Each delete reports how many rows it removed and the highest xid among them, which goes to
// pgrelay.pruned (see sql/install.sql).

fn prune_by_age() -> String {
    format!(
        "with gone as (
             delete from pgrelay.changes where ctid = any(array(
                 select ctid from pgrelay.changes c
                  where c.ts < now() - make_interval(secs => $1) and not {UNREAD}
                  order by c.xid, c.seq limit $2))
             returning xid)
         select count(*), max(xid)::text from gone"
    )
}

const RECORD_PRUNED: &str = "
    insert into pgrelay.pruned (xid) values ($1::text::xid8)
    on conflict (one) do update set xid = greatest(pruned.xid, excluded.xid)";

/// The newest log row that comes after `$1` newer events: it and everything older goes.
const EVENTS_CUTOFF: &str = "
    select xid::text, seq from (
        select xid, seq, sum(n) over (order by xid desc, seq desc) - n as newer
          from pgrelay.changes
    ) as t where newer >= $1 order by xid desc, seq desc limit 1";

fn prune_up_to() -> String {
    format!(
        "with gone as (
             delete from pgrelay.changes where ctid = any(array(
                 select ctid from pgrelay.changes c
                  where (c.xid, c.seq) <= ($1::text::xid8, $2) and not {UNREAD}
                  order by c.xid, c.seq limit $3))
             returning xid)
         select count(*), max(xid)::text from gone"
    )
}

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
        let statement = client.prepare(&prune_by_age()).await?;
        loop {
            let n = deleted_rows(&client, &statement, &[&secs, &BATCH]).await?;
            deleted += n;
            if n < BATCH as u64 || token.is_cancelled() {
                break;
            }
        }
    }
    if let Some(events) = retention.max_rows
        && let Some(row) = client.query_opt(EVENTS_CUTOFF, &[&events]).await?
    {
        let (xid, seq): (String, i64) = (row.get(0), row.get(1));
        let statement = client.prepare(&prune_up_to()).await?;
        loop {
            let n = deleted_rows(&client, &statement, &[&xid, &seq, &BATCH]).await?;
            deleted += n;
            if n < BATCH as u64 || token.is_cancelled() {
                break;
            }
        }
    }
    client.execute(PRUNE_RELAYS, &[]).await?;
    Ok(deleted)
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
