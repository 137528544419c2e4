//! The exposed tables as the catalog describes them now, and the task that keeps that view
//! current while the relay runs.
//!
//! Every `interval`, the watcher reads the catalog for each configured table (one small
//! query per table) and compares it with what it saw last:
//! - renamed (same oid, new name) or dropped: subscribers get `reset` (`table_renamed`,
//!   `table_dropped`), the name stops resolving, capture stops routing its rows;
//! - re-created (the name is back with a new oid, capture installed, or installed now with
//!   `--install`): picked up again; if the new table lacks a column the old one had (by name
//!   and type), subscriptions that followed the name through its reset and name it end with
//!   an error and the others get `reset` (`table_changed`), as for a column dropped in place;
//!   if only its primary key differs, they all get that `reset`, as for a key changed in place;
//! - capture triggers removed or disabled: `reset` (`table_changed`), and with `--install`
//!   they are put back; without, the table stops resolving until they are;
//! - primary key changed, or partitions attached or detached: `reset` (`table_changed`);
//!   new partitions get their TRUNCATE trigger;
//! - columns added, dropped, renamed or retyped: subscriptions naming a changed column end
//!   with an error, the others get `reset` (`table_changed`: rows the change did not rewrite
//!   differ from their copies now), in stream order. Rows written after the change carry
//!   the new columns anyway (they are rendered by the trigger).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::TableName;
use crate::hub::{ColumnsChanged, Hub};
use crate::snapshot::Snapshot;
use crate::sql::{self, SqlError, TableInfo, TableKind};

/// The exposed tables that resolve now, by resource name.
#[derive(Debug, Default)]
pub struct Tables {
    map: RwLock<HashMap<String, TableInfo>>,
}

impl Tables {
    /// The tables described at start.
    pub fn new(infos: Vec<TableInfo>) -> Self {
        Tables {
            map: RwLock::new(infos.into_iter().map(|t| (t.resource.clone(), t)).collect()),
        }
    }

    /// The exposed table named `resource` (`items`, `shop.orders`), as last read.
    pub fn get(&self, resource: &str) -> Option<TableInfo> {
        // A panic while holding the lock leaves the map itself intact: keep using it.
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(resource).cloned()
    }

    /// Every table that resolves now.
    pub fn all(&self) -> Vec<TableInfo> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.values().cloned().collect()
    }

    fn set(&self, info: TableInfo) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.insert(info.resource.clone(), info);
    }

    fn remove(&self, resource: &str) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.remove(resource);
    }

    /// Re-reads a table's columns from the catalog (a column was added or renamed since the
    /// last check) and returns the table as it is now.
    pub async fn refresh_columns(
        &self,
        client: &Client,
        table: &TableInfo,
    ) -> Result<TableInfo, SqlError> {
        let columns = sql::columns(client, table.relid).await?;
        tracing::info!(table = %table.name, "re-read the table's columns");
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let entry = map
            .entry(table.resource.clone())
            .or_insert_with(|| table.clone());
        entry.columns = columns;
        Ok(entry.clone())
    }
}

/// What the watcher last saw of one configured table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    relid: u32,
    /// `(attnum, name, type)` of every column.
    columns: Columns,
    /// Attnums of the primary key, in key order.
    key: Vec<i16>,
    /// Partitions (and sub-partitioned tables) of a partitioned table.
    partitions: Vec<u32>,
    /// The row versions of its capture triggers and of its partitions': any change (disabled
    /// and enabled again, dropped and re-created) may have let writes through uncaptured in
    /// between.
    triggers: Vec<String>,
    installed: bool,
}

const SIGNATURE: &str = "
    select (select coalesce(array_agg(a.attnum::int4 order by a.attnum), '{}')
              from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped),
           (select coalesce(array_agg(a.attname::text order by a.attnum), '{}')
              from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped),
           (select coalesce(array_agg(format_type(a.atttypid, a.atttypmod) order by a.attnum), '{}')
              from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped),
           (select coalesce(array_agg(k.attnum::int4 order by k.ord), '{}')
              from pg_index i cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
             where i.indrelid = c.oid and i.indisprimary),
           (select coalesce(array_agg(p.relid::oid order by p.relid::oid), '{}')
              from pg_partition_tree(c.oid) p where c.relkind = 'p' and p.relid <> c.oid),
           (select coalesce(array_agg(t.tgrelid::text || ':' || t.tgname || ':' || t.xmin::text
                                      order by t.tgrelid, t.tgname), '{}')
              from pg_trigger t
             where (t.tgrelid = c.oid or t.tgrelid in (select p.relid from pg_partition_tree(c.oid) p))
               and t.tgname like 'pgrelay\\_capture\\_%')
      from pg_class c where c.oid = $1";

const NAME_OF: &str = "
    select n.nspname::text, c.relname::text from pg_class c
      join pg_namespace n on n.oid = c.relnamespace where c.oid = $1";

const INSTALL_PARTITION: &str = "select pgrelay.install_partition($1, $2, $3)";
const UNINSTALL_PARTITION: &str = "select pgrelay.uninstall_partition($1)";

/// Keeps [`Tables`] and the hub's routing current (see the module docs).
pub struct Watcher {
    /// The configured tables.
    pub names: Vec<TableName>,
    /// Where the current view goes.
    pub tables: Arc<Tables>,
    /// Where resets go, and how capture routes rows.
    pub hub: Arc<Hub>,
    /// Catalog reads and installs.
    pub pool: Pool,
    /// Reinstall capture where it is missing (`--install`).
    pub install: bool,
    /// Capture mode, for installs.
    pub mode: &'static str,
    /// Time between checks.
    pub interval: Duration,
    /// Capture's progress: a schema change is published only after every event committed
    /// before it (see `Watcher::settle`).
    pub capture: Arc<crate::capture::CaptureState>,
    /// What the tables were when the relay described them at start ([`baseline`]): the first
    /// check compares with it, so a change made before the watcher's first look is seen.
    pub start: Baseline,
}

/// The exposed tables' catalog signatures, read in the same snapshot as the [`TableInfo`]s
/// the relay starts serving with.
#[derive(Debug, Default)]
pub struct Baseline(HashMap<String, Seen>);

/// Reads the signatures of `infos`' tables (call it in the transaction that described
/// them). A table whose signature cannot be read is left out: the watcher's first check
/// reads it as new.
pub async fn baseline(client: &Client, infos: &[TableInfo]) -> Baseline {
    let mut seen = HashMap::new();
    for info in infos {
        if let Ok(Some(s)) = signature(client, info.relid, true).await {
            seen.insert(info.resource.clone(), s);
        }
    }
    Baseline(seen)
}

/// How long the watcher waits for capture to publish what committed before a schema change.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

impl Watcher {
    /// Checks every `interval` until `token` is cancelled. Failures are logged and retried:
    /// the watcher is never a reason to stop serving.
    pub async fn run(mut self, token: CancellationToken) {
        // What the tables were when the relay described them (not when this task first got
        // to look: a change in between would never be seen).
        let mut seen = std::mem::take(&mut self.start.0);
        // What tables that went (dropped, renamed away, no longer capturable) were, for when
        // the name comes back.
        let mut gone = HashMap::new();
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            let mut client = match self.pool.get().await {
                Ok(client) => client,
                Err(err) => {
                    tracing::debug!(error = %crate::error::chain(&err), "schema check skipped: no database connection");
                    continue;
                }
            };
            for name in &self.names {
                if let Err(err) = self.check(&mut client, name, &mut seen, &mut gone).await {
                    tracing::warn!(table = %name, error = %crate::error::chain(&err), "schema check failed");
                }
            }
        }
    }

    /// Waits until capture has published every transaction committed before now (the
    /// schema change just seen among them), so that a reset never overtakes the events that
    /// came before it: an insert committed with a `drop table` arrives, then the reset.
    async fn settle(&self, client: &Client) -> Result<(), SqlError> {
        let text: String = client
            .query_one("select pg_current_snapshot()::text", &[])
            .await?
            .get(0);
        let Some(now) = Snapshot::parse(&text) else {
            return Ok(());
        };
        if !self.capture.wait_covers(&now, SETTLE_LIMIT).await {
            tracing::warn!(
                "capture did not catch up with a schema change within {SETTLE_LIMIT:?}; publishing it anyway"
            );
        }
        Ok(())
    }

    /// A table that can no longer be captured exactly (it became a partition, gained
    /// inheritance children, lost its primary key, made it DEFERRABLE): its subscribers are
    /// told once, and it is not served until it can be again.
    async fn stop_serving(
        &self,
        client: &Client,
        name: &TableName,
        relid: u32,
        seen: &mut HashMap<String, Seen>,
        gone: &mut HashMap<String, Seen>,
        why: &str,
    ) -> Result<(), SqlError> {
        let resource = name.resource();
        if self.tables.get(&resource).is_some() || seen.contains_key(&resource) {
            tracing::warn!(table = %name, reason = %why,
                "an exposed table can no longer be captured; its subscribers are reset and it is no longer served");
            self.settle(client).await?;
            self.hub.unroute(relid, &resource);
            self.tables.remove(&resource);
            self.hub.publish_reset(&resource, "table_changed");
            if let Some(was) = seen.remove(&resource) {
                gone.insert(resource, was);
            }
        }
        Ok(())
    }

    async fn check(
        &self,
        client: &mut Client,
        name: &TableName,
        seen: &mut HashMap<String, Seen>,
        gone: &mut HashMap<String, Seen>,
    ) -> Result<(), SqlError> {
        let resource = name.resource();
        let previous = seen.get(&resource).cloned();
        let now = sql::describe_one(client, name).await?;

        // The table we were following, or serving since before the watcher first looked at
        // it (a drop right after start): gone, or renamed?
        let followed = previous
            .as_ref()
            .map(|p| p.relid)
            .or_else(|| self.tables.get(&resource).map(|t| t.relid));
        if let Some(relid) = followed
            && now.as_ref().is_none_or(|d| d.relid != relid)
        {
            let renamed_to = client
                .query_opt(NAME_OF, &[&relid])
                .await?
                .map(|r| format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1)));
            let reason = match &renamed_to {
                Some(to) => {
                    tracing::warn!(table = %name, renamed_to = %to, "an exposed table was renamed; its subscribers are reset");
                    "table_renamed"
                }
                None => {
                    tracing::warn!(table = %name, "an exposed table was dropped; its subscribers are reset");
                    "table_dropped"
                }
            };
            self.settle(client).await?;
            // No longer served before anyone hears of it: a client that re-subscribes on the
            // reset must not find the table still there.
            self.hub.unroute(relid, &resource);
            self.tables.remove(&resource);
            self.hub.publish_reset(&resource, reason);
            if let Some(was) = seen.remove(&resource) {
                gone.insert(resource.clone(), was);
            }
        }
        let Some(described) = now else {
            return Ok(());
        };
        // No longer something pgrelay can capture exactly (it became a partition, gained
        // inheritance children, lost its primary key, made it DEFERRABLE): the subscribers
        // are told once, and the table stops being exposed until it can be again.
        let refusal = match (&described.kind, &described.keys) {
            (Err(why), _) => Some(why.clone()),
            (Ok(_), None) => Some(format!("Table {name} has no primary key")),
            _ => None,
        };
        if let Some(why) = refusal {
            return self
                .stop_serving(client, name, described.relid, seen, gone, &why)
                .await;
        }
        let Ok(kind) = described.kind.clone() else {
            return Ok(());
        };
        let previous = seen.get(&resource).cloned();

        // Capture triggers removed or disabled.
        let reinstalled = !described.installed;
        if !described.installed {
            if previous.as_ref().is_some_and(|p| p.installed) {
                tracing::warn!(table = %name, "capture triggers of an exposed table were removed or disabled; its subscribers are reset");
                self.settle(client).await?;
                self.hub.publish_reset(&resource, "table_changed");
                if let Some(p) = seen.get_mut(&resource) {
                    p.installed = false;
                }
            }
            if self.install {
                sql::install_one(client, name, self.mode).await?;
                tracing::info!(table = %name, "capture reinstalled");
            } else {
                self.tables.remove(&resource);
                return Ok(());
            }
        }
        let Some(mut current) = signature(client, described.relid, true).await? else {
            return Ok(());
        };
        if current.key.is_empty() {
            // The primary key went between the two reads (the description still saw it).
            let why = format!("Table {name} has no primary key");
            return self
                .stop_serving(client, name, described.relid, seen, gone, &why)
                .await;
        }
        match previous {
            None => {
                // New to the watcher: re-created (or capture just installed). Subscriptions
                // that followed the name through its `reset` and name a column the new table
                // lacks (or has with another type) end, as if the column had been dropped;
                // the others start over, and so do all when only the key differs (as for a key
                // changed in place). Before the table resolves again, so that those who
                // subscribe to the new table never get it.
                if let Some(was) = gone.remove(&resource) {
                    let changed = columns_not_in(&was.columns, &current.columns);
                    if !changed.is_empty() {
                        tracing::info!(table = %name, changed = ?changed,
                            "a re-created exposed table lacks columns it had; subscriptions naming them end");
                        self.hub.publish_columns_changed(
                            &resource,
                            ColumnsChanged { columns: changed },
                        );
                    } else if key_names(&was) != key_names(&current) {
                        tracing::info!(table = %name,
                            "a re-created exposed table has another primary key; its subscribers start over");
                        self.hub.publish_reset(&resource, "table_changed");
                    }
                }
                let info = sql::describe_table(client, name).await?;
                self.hub.route(info.relid, &resource);
                self.tables.set(info);
                tracing::info!(table = %name, "exposed table picked up");
            }
            Some(prev) => {
                let changed = (!reinstalled
                    && prev.installed
                    && !prev.triggers.is_empty()
                    && prev.triggers != current.triggers)
                    || prev.key != current.key
                    || (kind == TableKind::Partitioned && prev.partitions != current.partitions)
                    || prev.columns != current.columns;
                if changed {
                    self.settle(client).await?;
                }
                // The table as it is now is served before its subscribers are told: those
                // that start over at once (a subscribe, an SSE stream's fresh rows) get its
                // key and columns, not the ones the reset is about.
                if prev.columns != current.columns || prev.key != current.key {
                    let info = sql::describe_table(client, name).await?;
                    self.tables.set(info);
                }
                // Columns first: subscriptions that name a changed column end on it, before
                // anything tells them to start over (their fresh rows would be checked against
                // a table without that column: a refusal, not `subscription_ended`). To the
                // others it is a `reset` already, so the key and trigger resets below are not
                // sent again.
                let columns_changed = prev.columns != current.columns;
                if columns_changed {
                    let changed = changed_columns(&prev.columns, &current.columns);
                    tracing::info!(table = %name, changed = ?changed,
                        "columns of an exposed table changed; its subscribers start over");
                    self.hub
                        .publish_columns_changed(&resource, ColumnsChanged { columns: changed });
                }
                // (Partitions attached or detached change the triggers too: one reset, below.)
                if !reinstalled
                    && !columns_changed
                    && prev.installed
                    && !prev.triggers.is_empty()
                    && prev.triggers != current.triggers
                    && prev.partitions == current.partitions
                {
                    tracing::warn!(table = %name, "capture triggers of an exposed table changed; its subscribers are reset");
                    self.hub.publish_reset(&resource, "table_changed");
                }
                if prev.key != current.key && !columns_changed {
                    tracing::warn!(table = %name, "the primary key of an exposed table changed; its subscribers are reset");
                    self.hub.publish_reset(&resource, "table_changed");
                }
                if kind == TableKind::Partitioned && prev.partitions != current.partitions {
                    let detached = prev
                        .partitions
                        .iter()
                        .filter(|p| !current.partitions.contains(p));
                    for part in detached {
                        if let Err(err) = client.execute(UNINSTALL_PARTITION, &[part]).await {
                            tracing::debug!(table = %name, partition = part, error = %crate::error::chain(&err),
                                "could not remove the triggers of a detached partition");
                        }
                    }
                    for part in current
                        .partitions
                        .iter()
                        .filter(|p| !prev.partitions.contains(p))
                    {
                        if let Err(err) = client
                            .execute(INSTALL_PARTITION, &[part, &described.relid, &self.mode])
                            .await
                        {
                            tracing::warn!(table = %name, partition = part, error = %crate::error::chain(&err),
                                "could not install the TRUNCATE trigger of a new partition");
                        }
                    }
                    // The triggers just installed are not a change to report next time.
                    if let Some(after) = signature(client, described.relid, true).await? {
                        current.triggers = after.triggers;
                    }
                    tracing::info!(table = %name, "partitions of an exposed table changed; its subscribers are reset");
                    self.hub.publish_reset(&resource, "table_changed");
                }
                if self.tables.get(&resource).is_none() {
                    let info = sql::describe_table(client, name).await?;
                    self.hub.route(info.relid, &resource);
                    self.tables.set(info);
                }
            }
        }
        current.installed = true;
        seen.insert(resource, current);
        Ok(())
    }
}

/// The catalog signature of a table (`None` once it is gone).
async fn signature(client: &Client, relid: u32, installed: bool) -> Result<Option<Seen>, SqlError> {
    let Some(row) = client.query_opt(SIGNATURE, &[&relid]).await? else {
        return Ok(None);
    };
    let attnums: Vec<i32> = row.get(0);
    let names: Vec<String> = row.get(1);
    let types: Vec<String> = row.get(2);
    let key: Vec<i32> = row.get(3);
    let to_i16 = |n: i32| i16::try_from(n).unwrap_or(i16::MAX);
    Ok(Some(Seen {
        relid,
        columns: attnums
            .into_iter()
            .zip(names)
            .zip(types)
            .map(|((a, n), t)| (to_i16(a), n, t))
            .collect(),
        key: key.into_iter().map(to_i16).collect(),
        partitions: row.get(4),
        triggers: row.get(5),
        installed,
    }))
}

/// `(attnum, name, type)` of a table's columns.
type Columns = Vec<(i16, String, String)>;

/// The names of a table's key columns, in key order (attnums mean nothing across tables).
fn key_names(seen: &Seen) -> Vec<&str> {
    seen.key
        .iter()
        .filter_map(|k| seen.columns.iter().find(|(a, _, _)| a == k))
        .map(|(_, name, _)| name.as_str())
        .collect()
}

/// Columns of `before` that `after`, another table under the same name, does not have with
/// the same type (attnums mean nothing across tables).
fn columns_not_in(
    before: &[(i16, String, String)],
    after: &[(i16, String, String)],
) -> Vec<String> {
    before
        .iter()
        .filter(|(_, name, ty)| !after.iter().any(|(_, n, t)| n == name && t == ty))
        .map(|(_, name, _)| name.clone())
        .collect()
}

/// Names (as they were) of the columns dropped, renamed or retyped between two signatures.
fn changed_columns(
    before: &[(i16, String, String)],
    after: &[(i16, String, String)],
) -> Vec<String> {
    before
        .iter()
        .filter(|(attnum, name, ty)| {
            after
                .iter()
                .find(|(a, _, _)| a == attnum)
                .is_none_or(|(_, n, t)| n != name || t != ty)
        })
        .map(|(_, name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(attnum: i16, name: &str, ty: &str) -> (i16, String, String) {
        (attnum, name.into(), ty.into())
    }

    #[test]
    fn a_recreated_table_is_compared_with_the_one_that_went_by_name_and_type() {
        let before = [
            col(1, "id", "integer"),
            col(2, "name", "text"),
            col(3, "price", "numeric"),
        ];
        let after = [
            col(1, "id", "integer"),
            col(2, "price", "integer"),
            col(4, "name", "text"),
        ];
        assert_eq!(columns_not_in(&before, &after), ["price"]);
        assert!(columns_not_in(&before, &before).is_empty());
    }

    #[test]
    fn dropped_renamed_and_retyped_columns_are_named_as_they_were() {
        let before = [
            col(1, "id", "integer"),
            col(2, "name", "text"),
            col(3, "price", "numeric"),
            col(4, "gone", "text"),
        ];
        let after = [
            col(1, "id", "integer"),
            col(2, "title", "text"),
            col(3, "price", "text"),
            col(5, "added", "text"),
        ];
        assert_eq!(changed_columns(&before, &after), ["name", "price", "gone"]);
        assert!(changed_columns(&before, &before).is_empty());
    }
}
