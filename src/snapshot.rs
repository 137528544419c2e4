//! Initial data: a table's rows as of one snapshot, and which events that snapshot already
//! contains (DESIGN.md guarantee 3).

use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::{Sink, SinkExt};
use tokio_postgres::IsolationLevel;
use tokio_postgres::types::ToSql;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::event::control;
use crate::sql::{SqlError, TableInfo, quote_ident, quote_table};
use crate::subscription::Shape;

/// Largest `initial` message, in bytes of row JSON (a message may exceed it by one row).
const INITIAL_MESSAGE_BYTES: usize = 1 << 20;

/// A `pg_current_snapshot()`: which transactions' effects it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// Transactions in progress when the snapshot was taken (sorted).
    xip: Vec<u64>,
}

impl Snapshot {
    /// Parses the text form `xmin:xmax:xip1,xip2,…`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let mut xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        if parts.next().is_some() {
            return None;
        }
        xip.sort_unstable();
        Some(Snapshot { xmin, xmax, xip })
    }

    /// Whether a committed transaction's changes are in the snapshot (`pg_visible_in_snapshot`).
    pub fn contains(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// Whether every transaction `other` sees as finished, this one sees as finished too
    /// (capture's `handled` covering a snapshot: everything committed in it is published).
    pub fn covers(&self, other: &Snapshot) -> bool {
        other.xmax <= self.xmax
            && self
                .xip
                .iter()
                .all(|x| *x >= other.xmax || other.xip.binary_search(x).is_ok())
    }

    /// The oldest transaction in progress (every xid below it is finished).
    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    /// The first xid not yet assigned when the snapshot was taken.
    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    /// The transactions in progress, as text (for `$n::text[]::xid8[]`).
    pub fn xip_text(&self) -> Vec<String> {
        self.xip.iter().map(u64::to_string).collect()
    }

    /// The text form (`xmin:xmax:xip,…`), as `pg_snapshot` reads it.
    #[allow(clippy::inherent_to_string)]
    pub fn to_string(&self) -> String {
        let xip: Vec<String> = self.xip_text();
        format!("{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }

    /// The first xid not yet assigned, as text.
    pub fn xmax_text(&self) -> String {
        self.xmax.to_string()
    }
}

/// Why the initial data could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The database failed.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// The client went away.
    #[error("Socket closed while sending initial data")]
    Socket(#[source] WsError),
    /// The client stopped reading.
    #[error("The client stopped reading the initial data")]
    Stalled,
    /// The client stopped answering pings.
    #[error("The client stopped answering pings")]
    PeerSilent,
    /// The snapshot text did not parse (a broken invariant).
    #[error("Unexpected snapshot text {0:?}")]
    BadSnapshot(String),
}

impl From<tokio_postgres::Error> for SnapshotError {
    fn from(err: tokio_postgres::Error) -> Self {
        SnapshotError::Sql(SqlError::Db(err))
    }
}

/// What the socket needs between two initial messages (the initial data may take longer
/// than a heartbeat interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upkeep {
    /// Nothing.
    Nothing,
    /// Send a ping now.
    Ping,
    /// The peer has not been heard from for too long: give up.
    PeerSilent,
}

/// Where initial data goes, and how it stays alive while it streams.
pub struct Target<'a, S> {
    /// The socket.
    pub sink: &'a mut S,
    /// Asked between messages.
    pub upkeep: &'a mut (dyn FnMut() -> Upkeep + Send),
    /// A message not taken within this long means the client stopped reading.
    pub write_timeout: Duration,
}

/// Sends the table's rows as `initial` messages (the last with `"done":true`; each carries
/// `position`, the seq to resume from) and returns the snapshot they were read in. Reads in a
/// REPEATABLE READ, read-only transaction, with a portal so that a large table is never held
/// in memory whole; rows stay JSON text, so any stored value passes whole.
pub async fn send_initial<S>(
    pool: &Pool,
    table: &TableInfo,
    shape: &Shape,
    batch_rows: usize,
    position: Option<i64>,
    target: Target<'_, S>,
) -> Result<Snapshot, SnapshotError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let Target {
        sink,
        upkeep,
        write_timeout,
    } = target;
    let mut client = pool.get().await.map_err(SqlError::from)?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // The first statement fixes the transaction's snapshot; this one also reports it.
    let text: String = tx
        .query_one("select pg_current_snapshot()::text", &[])
        .await?
        .get(0);
    let snapshot = Snapshot::parse(&text).ok_or(SnapshotError::BadSnapshot(text))?;
    let order: Vec<String> = table.key_columns.iter().map(|k| quote_ident(k)).collect();
    let mut params = Vec::new();
    let query = format!(
        "select to_json(t.*)::text from {} as t where {} order by {}",
        quote_table(&table.name),
        shape.to_sql(&mut params),
        order.join(", ")
    );
    let statement = tx.prepare(&query).await?;
    let refs: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let portal = tx.bind(&statement, &refs).await?;
    let max_rows = i32::try_from(batch_rows).unwrap_or(i32::MAX);
    let mut rows: Vec<String> = Vec::new();
    let mut bytes = 0usize;
    loop {
        let batch = tx.query_portal(&portal, max_rows).await?;
        let finished = batch.len() < batch_rows;
        for row in batch {
            let text: &str = row.get(0);
            let json = shape.project_text(text);
            bytes += json.len();
            rows.push(json);
            if rows.len() >= batch_rows || bytes >= INITIAL_MESSAGE_BYTES {
                let message = control::initial(&table.resource, &rows, false, position);
                send(sink, message, write_timeout, upkeep).await?;
                rows.clear();
                bytes = 0;
            }
        }
        if finished {
            break;
        }
    }
    tx.commit().await?;
    let message = control::initial(&table.resource, &rows, true, position);
    send(sink, message, write_timeout, upkeep).await?;
    Ok(snapshot)
}

/// Sends one message, giving up when the client has not taken it within `limit` (a stalled
/// client must not keep the snapshot's transaction, and its pooled connection, open); pings
/// first when the heartbeat is due.
async fn send<S>(
    sink: &mut S,
    message: String,
    limit: Duration,
    upkeep: &mut (dyn FnMut() -> Upkeep + Send),
) -> Result<(), SnapshotError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    match upkeep() {
        Upkeep::Nothing => {}
        Upkeep::Ping => deliver(sink, Message::Ping(Default::default()), limit).await?,
        Upkeep::PeerSilent => return Err(SnapshotError::PeerSilent),
    }
    deliver(sink, Message::text(message), limit).await
}

async fn deliver<S>(sink: &mut S, message: Message, limit: Duration) -> Result<(), SnapshotError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    match tokio::time::timeout(limit, sink.send(message)).await {
        Ok(result) => result.map_err(SnapshotError::Socket),
        Err(_) => Err(SnapshotError::Stalled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_covers_one_when_it_sees_all_that_one_saw_finished() {
        let s = |t: &str| Snapshot::parse(t).unwrap();
        assert!(s("10:20:12,15").covers(&s("10:18:12,15")));
        assert!(s("10:20:").covers(&s("10:18:12,15")));
        assert!(
            !s("10:20:12,15").covers(&s("10:18:12")),
            "15 finished for the other"
        );
        assert!(!s("10:17:").covers(&s("10:18:")), "17 not yet seen");
        assert!(
            s("10:20:19").covers(&s("10:18:")),
            "19 is past the other's xmax"
        );
        assert!(
            !s("5:20:7").covers(&s("10:18:")),
            "7 finished for the other"
        );
    }

    #[test]
    fn visibility_follows_pg_visible_in_snapshot() {
        let s = Snapshot::parse("100:105:102,101").unwrap();
        assert!(s.contains(99));
        assert!(!s.contains(101));
        assert!(!s.contains(102));
        assert!(s.contains(103));
        assert!(s.contains(104));
        assert!(!s.contains(105));
        assert!(!s.contains(200));
        let empty = Snapshot::parse("7:7:").unwrap();
        assert!(empty.contains(6) && !empty.contains(7));
        assert!(Snapshot::parse("x:1:").is_none());
        assert!(Snapshot::parse("1:2").is_none());
    }
}
