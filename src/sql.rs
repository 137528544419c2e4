//! Everything that talks SQL besides capture: install/uninstall, the catalog, the pool.
//!
//! Values are always bound as `$n`; identifiers go through [`quote_ident`] and come from the
//! catalog, never from a request.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

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
    /// The table is partitioned (writes to partitions would bypass capture).
    #[error("Table {0} is partitioned; pgrelay cannot capture it yet (expose its partitions)")]
    Partitioned(TableName),
    /// Capture is not installed on the table.
    #[error("Capture is not installed on table {0}; run `pgrelay install` or pass --install")]
    NotInstalled(TableName),
    /// Could not get a pooled connection.
    #[error("No database connection available: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Could not build the pool.
    #[error("Cannot build the connection pool: {0}")]
    BuildPool(#[from] deadpool_postgres::BuildError),
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

/// An exposed table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
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
    select a.attname::text, format_type(a.atttypid, -1), base.typname::text, base.typtype = 'e'
      from pg_attribute a
      join pg_type t on t.oid = a.atttypid
      join pg_type base on base.oid = case when t.typtype = 'd' then t.typbasetype else t.oid end
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
            kind: crate::filter::Kind::from_type_name(r.get(2), r.get(3)),
        })
        .collect())
}

/// Parses a connection string and names the connection (visible in `pg_stat_activity`)
/// unless the string already sets `application_name`.
pub fn pg_config(
    database_url: &str,
    application_name: &str,
) -> Result<tokio_postgres::Config, SqlError> {
    let mut config: tokio_postgres::Config = database_url.parse()?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    Ok(config)
}

/// Opens a plain connection and drives it on a task (for commands and setup).
pub async fn connect(database_url: &str) -> Result<Client, SqlError> {
    let (client, connection) = pg_config(database_url, "pgrelay")?.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "database connection closed");
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
    let manager = Manager::from_config(
        pg_config(database_url, "pgrelay")?,
        NoTls,
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
        Some(code) if *code == SqlState::FEATURE_NOT_SUPPORTED => {
            SqlError::Partitioned(table.clone())
        }
        _ => SqlError::Db(err),
    }
}

/// Installs (or refreshes) the capture schema and the triggers of `tables`. Idempotent.
///
/// Safe while writers run: the schema step locks nothing writers use once it exists, every
/// table is checked (exists, has a primary key) before any trigger is created, and each
/// table's triggers are created in a transaction of their own, so the installer never holds
/// one table's lock while waiting for another's (a writer could otherwise deadlock with it).
pub async fn install(client: &mut Client, tables: &[TableName]) -> Result<(), SqlError> {
    let tx = client.transaction().await?;
    tx.batch_execute(INSTALL_LOCK).await?;
    tx.batch_execute(INSTALL_SQL).await?;
    tx.commit().await?;
    for table in tables {
        let row = client
            .query_opt(DESCRIBE, &[&table.schema, &table.table])
            .await?
            .ok_or_else(|| SqlError::NoSuchTable(table.clone()))?;
        if row.get::<_, Option<Vec<String>>>("keys").is_none() {
            return Err(SqlError::NoPrimaryKey(table.clone()));
        }
    }
    for table in tables {
        let tx = client.transaction().await?;
        tx.batch_execute(INSTALL_LOCK).await?;
        tx.execute(
            "select pgrelay.install($1, $2)",
            &[&table.schema, &table.table],
        )
        .await
        .map_err(|e| table_error(e, table))?;
        tx.commit().await?;
    }
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
           (select count(*) from pg_trigger t
             where t.tgrelid = c.oid and t.tgname in
                   ('pgrelay_capture_insert', 'pgrelay_capture_update', 'pgrelay_capture_delete')
           ) as triggers
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')";

/// Looks the tables up in the catalog and checks that capture is installed on each.
pub async fn describe(client: &Client, tables: &[TableName]) -> Result<Vec<TableInfo>, SqlError> {
    let mut infos = Vec::with_capacity(tables.len());
    for table in tables {
        let row = client
            .query_opt(DESCRIBE, &[&table.schema, &table.table])
            .await?
            .ok_or_else(|| SqlError::NoSuchTable(table.clone()))?;
        let keys: Option<Vec<String>> = row.get("keys");
        let keys = keys.ok_or_else(|| SqlError::NoPrimaryKey(table.clone()))?;
        let triggers: i64 = row.get("triggers");
        if triggers != 3 {
            return Err(SqlError::NotInstalled(table.clone()));
        }
        let oid: u32 = row.get("oid");
        infos.push(TableInfo {
            name: table.clone(),
            resource: table.resource(),
            key_columns: keys,
            columns: columns(client, oid).await?,
        });
    }
    Ok(infos)
}

/// One line of `pgrelay status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableStatus {
    /// `schema.table`.
    pub table: String,
    /// Whether all three capture triggers are present.
    pub installed: bool,
    /// Rows in the log for this table.
    pub log_rows: i64,
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
}

const RELAY_STATUS: &str = "
    select r.instance, r.last_seq,
           coalesce(extract(epoch from greatest(interval '0',
               (select max(ts) from pgrelay.changes) - r.last_ts))::float8, 0),
           extract(epoch from now() - r.seen_at)::float8
      from pgrelay.relays r order by r.instance";

/// Capture status of every table that has capture triggers or log rows, and of the relays.
pub async fn status(client: &Client) -> Result<(Vec<TableStatus>, Vec<RelayStatus>), SqlError> {
    let schema_exists: bool = client
        .query_one("select to_regclass('pgrelay.changes') is not null", &[])
        .await?
        .get(0);
    if !schema_exists {
        return Ok((Vec::new(), Vec::new()));
    }
    let rows = client
        .query(
            "with installed as (
                 select n.nspname::text as schema_name, c.relname::text as table_name
                   from pg_trigger t
                   join pg_class c on c.oid = t.tgrelid
                   join pg_namespace n on n.oid = c.relnamespace
                  where t.tgname = 'pgrelay_capture_insert'),
             logged as (
                 select schema_name, table_name, count(*) as n, min(seq) as lo, max(seq) as hi
                   from pgrelay.changes group by 1, 2)
             select coalesce(i.schema_name, l.schema_name) || '.' ||
                    coalesce(i.table_name, l.table_name),
                    i.table_name is not null, coalesce(l.n, 0), l.lo, l.hi
               from installed i full join logged l using (schema_name, table_name)
              order by 1",
            &[],
        )
        .await?;
    let relays = client
        .query(RELAY_STATUS, &[])
        .await?
        .iter()
        .map(|r| RelayStatus {
            instance: r.get(0),
            last_seq: r.get(1),
            lag_secs: r.get(2),
            seen_secs_ago: r.get(3),
        })
        .collect();
    let tables = rows
        .iter()
        .map(|r| TableStatus {
            table: r.get(0),
            installed: r.get(1),
            log_rows: r.get(2),
            oldest_seq: r.get(3),
            newest_seq: r.get(4),
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
