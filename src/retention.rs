//! Pruning of `pgrelay.changes` by age and/or row count, in small batches.
//!
//! Each batch is its own short statement, so pruning never holds locks for long and never
//! blocks writers. Age pruning looks only at the oldest `batch` rows by seq (log time grows
//! with seq), so a round costs the same however large the log is.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sql::SqlError;

/// Rows deleted per statement.
const BATCH: i64 = 5000;

// Rows at or above the horizon of a relay seen in the last five minutes are kept whatever
// their age or count: that relay may still have to read them (a pointer it has not followed
// yet, or a catch-up after a reconnect). Both deletes end with this condition.

const PRUNE_BY_AGE: &str = "
    delete from pgrelay.changes where seq in (
        select seq from (select seq, ts, xid from pgrelay.changes order by seq limit $2) as oldest
         where ts < now() - make_interval(secs => $1))
       and xid < coalesce((select min(horizon) from pgrelay.relays
                            where seen_at > now() - interval '5 minutes'),
                          '18446744073709551615'::xid8)";

const ROWS_CUTOFF: &str = "select seq from pgrelay.changes order by seq desc offset $1 limit 1";

const PRUNE_UP_TO: &str = "
    delete from pgrelay.changes where seq in (
        select seq from pgrelay.changes where seq <= $1 order by seq limit $2)
       and xid < coalesce((select min(horizon) from pgrelay.relays
                            where seen_at > now() - interval '5 minutes'),
                          '18446744073709551615'::xid8)";

const PRUNE_RELAYS: &str = "delete from pgrelay.relays where seen_at < now() - interval '1 day'";

/// How much of the log to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Delete events older than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many events (the newest).
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

/// One pruning round; returns the rows deleted.
pub async fn prune(
    pool: &Pool,
    retention: &Retention,
    token: &CancellationToken,
) -> Result<u64, SqlError> {
    let client = pool.get().await?;
    let mut deleted = 0;
    if let Some(age) = retention.max_age {
        let secs = age.as_secs_f64();
        loop {
            let n = client.execute(PRUNE_BY_AGE, &[&secs, &BATCH]).await?;
            deleted += n;
            if n < BATCH as u64 || token.is_cancelled() {
                break;
            }
        }
    }
    if let Some(rows) = retention.max_rows
        && let Some(row) = client.query_opt(ROWS_CUTOFF, &[&rows]).await?
    {
        let cutoff: i64 = row.get(0);
        loop {
            let n = client.execute(PRUNE_UP_TO, &[&cutoff, &BATCH]).await?;
            deleted += n;
            if n < BATCH as u64 || token.is_cancelled() {
                break;
            }
        }
    }
    client.execute(PRUNE_RELAYS, &[]).await?;
    Ok(deleted)
}
