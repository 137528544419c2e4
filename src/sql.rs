//! Everything that talks SQL besides capture: install/uninstall, the catalog, the pool.
//!
//! Values are always bound as `$n`; identifiers go through [`quote_ident`] and come from the
//! catalog, never from a request.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::config::TableName;

/// The capture schema, log table, trigger function and install functions.
pub const INSTALL_SQL: &str = include_str!("../sql/install.sql");

/// Serializes concurrent installs (two relays starting with `--install` at once).
const INSTALL_LOCK: &str = "select pg_advisory_xact_lock(hashtext('pgrelay.install'))";

/// A catalog, install or query failure, sorted by what the caller does with it.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The table does not exist.
    #[error("Table {0} does not exist")]
    NoSuchTable(TableName),
    /// The table has no primary key, so rows cannot be identified.
    #[error("Table {0} has no primary key; pgrelay needs one to identify rows")]
    NoPrimaryKey(TableName),
    /// The table cannot be captured (a partition, an inheritance parent): the message says why.
    #[error("{0}")]
    Unsupported(String),
    /// Capture is not installed on the table (or its triggers are disabled).
    #[error("Capture is not installed on table {0}; run `pgrelay install` or pass --install")]
    NotInstalled(TableName),
    /// The capture mode is not `notify` or `poll`.
    #[error("Capture mode must be notify or poll, not {0:?}")]
    BadMode(String),
    /// Could not get a pooled connection.
    #[error("No database connection available: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Could not build the pool.
    #[error("Cannot build the connection pool: {0}")]
    BuildPool(#[from] deadpool_postgres::BuildError),
    /// The connection string or its TLS settings cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Any other database error.
    #[error("Database error: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Quotes an identifier for SQL text: the only way names enter a query string.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"schema"."table"`.
pub fn quote_table(table: &TableName) -> String {
    format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.table)
    )
}

/// How pgrelay captures a table (see `pgrelay.classify` in `sql/install.sql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// A plain table: statement-level triggers.
    Plain,
    /// A partitioned table: a row trigger on the root, cloned to every partition.
    Partitioned,
    /// An inheritance child: row triggers.
    Child,
}

impl TableKind {
    /// The capture triggers a table of this kind has when installed, as `name:tgenabled`:
    /// `A` fires always, `O` in ordinary sessions only, `R` under
    /// `session_replication_role = replica` only (where the statement triggers do not fire).
    /// Any other state loses events or sends them twice.
    pub fn triggers(self) -> &'static [&'static str] {
        match self {
            TableKind::Plain => &[
                "pgrelay_capture_before:A",
                "pgrelay_capture_delete:O",
                "pgrelay_capture_insert:O",
                "pgrelay_capture_replica:R",
                "pgrelay_capture_truncate:A",
                "pgrelay_capture_update:O",
            ],
            TableKind::Partitioned | TableKind::Child => &[
                "pgrelay_capture_before:A",
                "pgrelay_capture_row:A",
                "pgrelay_capture_truncate:A",
            ],
        }
    }
}

/// An exposed table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// The table's oid (stable across renames; new when it is re-created).
    pub relid: u32,
    /// How it is captured.
    pub kind: TableKind,
    /// Schema and name.
    pub name: TableName,
    /// Subscriber-facing name.
    pub resource: String,
    /// Primary key columns, in key order.
    pub key_columns: Vec<String>,
    /// Every column, in table order, with how its values compare.
    pub columns: Vec<crate::filter::Column>,
}

const COLUMNS: &str = "
    select a.attname::text, format_type(a.atttypid, -1), base.typname::text, base.typtype::text,
           coalesce(not coll.collisdeterministic, false), base.typcategory::text
      from pg_attribute a
      join pg_type t on t.oid = a.atttypid
      join pg_type base on base.oid = case when t.typtype = 'd' then t.typbasetype else t.oid end
      left join pg_collation coll on coll.oid = a.attcollation
     where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped
     order by a.attnum";

/// The columns of a table (by name), for filters and projections.
pub async fn describe_columns(
    client: &Client,
    table: &TableName,
) -> Result<Vec<crate::filter::Column>, SqlError> {
    let row = client
        .query_opt(DESCRIBE, &[&table.schema, &table.table])
        .await?
        .ok_or_else(|| SqlError::NoSuchTable(table.clone()))?;
    columns(client, row.get("oid")).await
}

/// The columns of a table (by oid), for filters and projections.
pub async fn columns(client: &Client, oid: u32) -> Result<Vec<crate::filter::Column>, SqlError> {
    Ok(client
        .query(COLUMNS, &[&oid])
        .await?
        .iter()
        .map(|r| crate::filter::Column {
            name: r.get(0),
            sql_type: r.get(1),
            kind: crate::filter::Kind::from_catalog(r.get(2), r.get(3), r.get(5)),
            nondeterministic: r.get(4),
        })
        .collect())
}

/// Session settings every relay connection pins: they shape how PostgreSQL renders values as
/// JSON, and the capture triggers pin the same ones, so initial data, REST and events render
/// a value identically (and timestamps in UTC).
const RENDERING: &str =
    "-c TimeZone=UTC -c extra_float_digits=1 -c bytea_output=hex -c IntervalStyle=postgres";

/// Parses a connection string (TLS settings included, see [`crate::tls`]), pins the rendering
/// settings, and names the connection (visible in `pg_stat_activity`) unless the string
/// already sets `application_name`.
pub fn target(database_url: &str, application_name: &str) -> Result<crate::tls::Target, SqlError> {
    let mut target = crate::tls::target(database_url)?;
    let config = &mut target.config;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    let options = match config.get_options() {
        Some(own) if !own.trim().is_empty() => format!("{own} {RENDERING}"),
        _ => RENDERING.to_owned(),
    };
    config.options(&options);
    Ok(target)
}

/// Where a connection string points, for messages: `host:port/dbname` (no credentials).
pub fn describe_target(database_url: &str) -> String {
    let Ok(target) = target(database_url, "pgrelay") else {
        return "the database".to_owned();
    };
    let config = &target.config;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let port = config
                .get_ports()
                .get(i)
                .or_else(|| config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    format!(
        "{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// Whether a failure to connect is the database not being there yet (refused, unreachable,
/// starting up, out of connection slots), worth trying again, rather than a setting that
/// will not work (a password, a certificate, a database that does not exist).
pub fn is_unavailable(err: &SqlError) -> bool {
    let SqlError::Db(err) = err else {
        return false;
    };
    if let Some(db) = err.as_db_error() {
        return matches!(
            db.code().code(),
            "57P01" | "57P02" | "57P03" | "53300" | "08001" | "08004" | "08006"
        );
    }
    std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::PermissionDenied
            )
        })
}

/// Opens a plain connection and drives it on a task (for commands and setup).
pub async fn connect(database_url: &str) -> Result<Client, SqlError> {
    let target = target(database_url, "pgrelay")?;
    let (client, connection) = target.config.connect(target.tls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %crate::error::chain(&err), "database connection closed");
        }
    });
    Ok(client)
}

/// Builds the query pool (snapshots, REST). `wait` bounds the wait for a free connection,
/// `connect` the opening or check of one, so a database that is down fails requests quickly.
pub fn pool(
    database_url: &str,
    size: usize,
    wait: Duration,
    connect: Duration,
) -> Result<Pool, SqlError> {
    let target = target(database_url, "pgrelay")?;
    let manager = Manager::from_config(
        target.config,
        target.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(connect))
        .recycle_timeout(Some(connect))
        .build()?)
}

fn table_error(err: tokio_postgres::Error, table: &TableName) -> SqlError {
    match err.code() {
        Some(code) if *code == SqlState::UNDEFINED_TABLE => SqlError::NoSuchTable(table.clone()),
        Some(code) if *code == SqlState::INVALID_TABLE_DEFINITION => {
            SqlError::NoPrimaryKey(table.clone())
        }
        // pgrelay.classify's own message, which names the table and says why.
        Some(code) if *code == SqlState::FEATURE_NOT_SUPPORTED => {
            SqlError::Unsupported(err.as_db_error().map_or_else(
                || format!("Table {table} cannot be captured"),
                |e| e.message().to_owned(),
            ))
        }
        _ => SqlError::Db(err),
    }
}

/// Installs (or refreshes) the capture schema and the triggers of `tables`, in capture mode
/// `mode` (`notify` or `poll`). Idempotent.
///
/// Safe while writers run: the schema step locks nothing writers use once it exists, every
/// table is checked (exists, has a primary key) before any trigger is created, and each
/// table's triggers are created in a transaction of their own, so the installer never holds
/// one table's lock while waiting for another's (a writer could otherwise deadlock with it).
pub async fn install(
    client: &mut Client,
    tables: &[TableName],
    mode: &str,
) -> Result<(), SqlError> {
    if mode != "notify" && mode != "poll" {
        return Err(SqlError::BadMode(mode.to_owned()));
    }
    let tx = client.transaction().await?;
    tx.batch_execute(INSTALL_LOCK).await?;
    tx.batch_execute(INSTALL_SQL).await?;
    tx.commit().await?;
    for table in tables {
        client
            .execute(
                "select pgrelay.classify(c.oid, $3) from pg_class c join pg_namespace n on n.oid = c.relnamespace
                  where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
                &[&table.schema, &table.table, &table.to_string()],
            )
            .await
            .map_err(|e| table_error(e, table))
            .and_then(|n| match n {
                0 => Err(SqlError::NoSuchTable(table.clone())),
                _ => Ok(()),
            })?;
    }
    for table in tables {
        install_one(client, table, mode).await?;
    }
    Ok(())
}

/// Installs capture on one table, in a transaction of its own.
pub async fn install_one(
    client: &mut Client,
    table: &TableName,
    mode: &str,
) -> Result<(), SqlError> {
    let tx = client.transaction().await?;
    tx.batch_execute(INSTALL_LOCK).await?;
    tx.execute(
        "select pgrelay.install($1, $2, $3)",
        &[&table.schema, &table.table, &mode],
    )
    .await
    .map_err(|e| table_error(e, table))?;
    tx.commit().await?;
    Ok(())
}

/// Removes the triggers of `tables` (the log stays).
pub async fn uninstall(client: &mut Client, tables: &[TableName]) -> Result<(), SqlError> {
    let tx = client.transaction().await?;
    tx.batch_execute(INSTALL_LOCK).await?;
    let installed: bool = tx
        .query_one(
            "select to_regprocedure('pgrelay.uninstall(text,text)') is not null",
            &[],
        )
        .await?
        .get(0);
    if !installed {
        return Ok(());
    }
    for table in tables {
        tx.execute(
            "select pgrelay.uninstall($1, $2)",
            &[&table.schema, &table.table],
        )
        .await
        .map_err(|e| table_error(e, table))?;
    }
    tx.commit().await?;
    Ok(())
}

const DESCRIBE: &str = "
    select c.oid,
           (select array_agg(a.attname::text order by k.ord)
              from pg_index i
              cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
              join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
             where i.indrelid = c.oid and i.indisprimary) as keys,
           c.relkind::text as relkind,
           c.relispartition,
           exists (select 1 from pg_inherits h where h.inhparent = c.oid) as has_children,
           exists (select 1 from pg_inherits h where h.inhrelid = c.oid) as is_child,
           coalesce((select array_agg(t.tgname::text || ':' || t.tgenabled::text order by t.tgname)
                       from pg_trigger t
                      where t.tgrelid = c.oid and t.tgname like 'pgrelay\\_capture\\_%'), '{}') as triggers,
           -- Every partition has the root's row trigger, enabled always (a clone can be
           -- disabled on one partition alone).
           not exists (select 1 from pg_partition_tree(c.oid) p
                        where p.relid <> c.oid
                          and not exists (select 1 from pg_trigger t
                                           where t.tgrelid = p.relid and t.tgname = 'pgrelay_capture_row'
                                             and t.tgenabled = 'A')) as partitions_installed
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')";

/// What the catalog says of one table, as capture needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// The table's oid.
    pub relid: u32,
    /// Primary key columns, if any.
    pub keys: Option<Vec<String>>,
    /// How it would be captured, or why it cannot be.
    pub kind: Result<TableKind, String>,
    /// Whether every capture trigger of its kind is present and enabled.
    pub installed: bool,
}

/// Looks one table up in the catalog (`None`: no such table).
pub async fn describe_one(
    client: &Client,
    table: &TableName,
) -> Result<Option<Described>, SqlError> {
    let Some(row) = client
        .query_opt(DESCRIBE, &[&table.schema, &table.table])
        .await?
    else {
        return Ok(None);
    };
    let relkind: String = row.get("relkind");
    let kind = if row.get::<_, bool>("relispartition") {
        Err(format!(
            "Table {table} is a partition; expose its partitioned table instead"
        ))
    } else if relkind == "p" {
        Ok(TableKind::Partitioned)
    } else if row.get::<_, bool>("has_children") {
        Err(format!(
            "Table {table} has inheritance children; pgrelay cannot capture writes to them through it (expose the children)"
        ))
    } else if row.get::<_, bool>("is_child") {
        Ok(TableKind::Child)
    } else {
        Ok(TableKind::Plain)
    };
    let triggers: Vec<String> = row.get("triggers");
    let installed = row.get::<_, bool>("partitions_installed")
        && kind
            .as_ref()
            .is_ok_and(|k| k.triggers().iter().all(|t| triggers.iter().any(|x| x == t)));
    Ok(Some(Described {
        relid: row.get("oid"),
        keys: row.get("keys"),
        kind,
        installed,
    }))
}

/// Looks the tables up in the catalog and checks that capture is installed on each.
pub async fn describe(client: &Client, tables: &[TableName]) -> Result<Vec<TableInfo>, SqlError> {
    let mut infos = Vec::with_capacity(tables.len());
    for table in tables {
        infos.push(describe_table(client, table).await?);
    }
    Ok(infos)
}

/// One table, checked: it exists, has a primary key, can be captured, and is installed.
pub async fn describe_table(client: &Client, table: &TableName) -> Result<TableInfo, SqlError> {
    let described = describe_one(client, table)
        .await?
        .ok_or_else(|| SqlError::NoSuchTable(table.clone()))?;
    let kind = described.kind.map_err(SqlError::Unsupported)?;
    let keys = described
        .keys
        .ok_or_else(|| SqlError::NoPrimaryKey(table.clone()))?;
    if !described.installed {
        return Err(SqlError::NotInstalled(table.clone()));
    }
    Ok(TableInfo {
        relid: described.relid,
        kind,
        name: table.clone(),
        resource: table.resource(),
        key_columns: keys,
        columns: columns(client, described.relid).await?,
    })
}

/// One line of `pgrelay status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableStatus {
    /// `schema.table` (the oid, for log rows of a table that no longer exists).
    pub table: String,
    /// Whether capture triggers are present.
    pub installed: bool,
    /// Events in the log for this table.
    pub log_events: i64,
    /// Oldest seq in the log for this table.
    pub oldest_seq: Option<i64>,
    /// Newest seq in the log for this table.
    pub newest_seq: Option<i64>,
}

/// One running (or recently running) relay, as it reports itself in `pgrelay.relays`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayStatus {
    /// Random id the relay picked at start.
    pub instance: String,
    /// Seq of the last event it published.
    pub last_seq: Option<i64>,
    /// Capture time of the newest logged event minus that of the last one it published:
    /// how far behind the log the relay is (0 when it has published the newest).
    pub lag_secs: f64,
    /// Seconds since the relay last reported (it reports about once a second).
    pub seen_secs_ago: f64,
    /// The relay's horizon: log rows of transactions below it are no longer needed by it.
    pub horizon: String,
    /// The backend whose open transaction holds the horizon back, if one does.
    pub held_by: Option<i32>,
}

const RELAY_STATUS: &str = "
    select r.instance, r.last_seq,
           coalesce(extract(epoch from greatest(interval '0',
               (select max(ts) from pgrelay.changes) - r.last_ts))::float8, 0),
           extract(epoch from now() - r.seen_at)::float8,
           r.horizon::text, r.held_by
      from pgrelay.relays r order by r.instance";

const TABLE_STATUS: &str = "
    with installed as (
        select distinct t.tgrelid as relid from pg_trigger t
         where t.tgname = 'pgrelay_capture_truncate'),
    logged as (
        select relid, sum(n)::int8 as n, min(seq) as lo, max(last_seq) as hi
          from pgrelay.changes where relid <> 0 group by relid),
    tables as (select relid from installed union select relid from logged)
    select coalesce(ns.nspname || '.' || c.relname, 'oid ' || t.relid::text),
           i.relid is not null, coalesce(l.n, 0), l.lo, l.hi
      from tables t
      left join installed i using (relid)
      left join logged l using (relid)
      left join pg_class c on c.oid = t.relid
      left join pg_namespace ns on ns.oid = c.relnamespace
     order by 1";

/// Capture status of every table that has capture triggers or log rows, and of the relays.
pub async fn status(client: &Client) -> Result<(Vec<TableStatus>, Vec<RelayStatus>), SqlError> {
    let schema_exists: bool = client
        .query_one(
            "select to_regclass('pgrelay.changes') is not null
                and exists (select 1 from pg_attribute where attrelid = to_regclass('pgrelay.changes')
                              and attname = 'relid')",
            &[],
        )
        .await?
        .get(0);
    if !schema_exists {
        return Ok((Vec::new(), Vec::new()));
    }
    let tables = client
        .query(TABLE_STATUS, &[])
        .await?
        .iter()
        .map(|r| TableStatus {
            table: r.get(0),
            installed: r.get(1),
            log_events: r.get(2),
            oldest_seq: r.get(3),
            newest_seq: r.get(4),
        })
        .collect();
    let relays = client
        .query(RELAY_STATUS, &[])
        .await?
        .iter()
        .map(|r| RelayStatus {
            instance: r.get(0),
            last_seq: r.get(1),
            lag_secs: r.get(2),
            seen_secs_ago: r.get(3),
            horizon: r.get(4),
            held_by: r.get(5),
        })
        .collect();
    Ok((tables, relays))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_quotes_doubled() {
        assert_eq!(quote_ident("items"), r#""items""#);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(
            quote_ident(r#"x"; drop table t; --"#),
            r#""x""; drop table t; --""#
        );
        let t = TableName::parse("Shop.Order Items").unwrap();
        assert_eq!(quote_table(&t), r#""Shop"."Order Items""#);
    }
}
