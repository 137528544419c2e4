//! The demo's writer: inserts, updates and deletes rows of the demo table at a steady rate.

use std::time::Duration;

use anyhow::Context;
use pgrelay::TableName;
use pgrelay::error::chain;
use pgrelay::sql::quote_table;
use tokio_util::sync::CancellationToken;

use super::CONNECT_TIMEOUT;

/// Most rows the writer lets the table hold.
pub(super) const MAX_ROWS: i64 = 50;
/// Below this many rows the writer only inserts.
const MIN_ROWS: i64 = 3;
/// What the writer names the rows it inserts.
const NAMES: &[&str] = &[
    "apple",
    "banana",
    "cherry",
    "damson",
    "elderberry",
    "fig",
    "grape",
    "kiwi",
    "lemon",
    "mango",
    "nectarine",
    "orange",
    "pear",
    "quince",
    "raspberry",
    "strawberry",
];

/// The writer's statements for one table (its name quoted once; every value bound).
pub(super) struct Statements {
    count: String,
    insert: String,
    reprice: String,
    restock: String,
    rename: String,
    delete_one: String,
    trim: String,
}

impl Statements {
    pub(super) fn for_table(table: &TableName) -> Self {
        let t = quote_table(table);
        let any_row = format!("(select id from {t} order by random() limit 1)");
        Statements {
            count: format!("select count(*) from {t}"),
            insert: format!(
                "insert into {t} (name, price, in_stock) values ($1, round($2::float8::numeric, 2), $3)"
            ),
            reprice: format!(
                "update {t} set price = least(999, greatest(0.1, round((coalesce(price, 1) * $1::float8)::numeric, 2))),
                                updated_at = now()
                  where id = {any_row}"
            ),
            restock: format!(
                "update {t} set in_stock = not in_stock, updated_at = now() where id = {any_row}"
            ),
            rename: format!("update {t} set name = $1, updated_at = now() where id = {any_row}"),
            delete_one: format!("delete from {t} where id = {any_row}"),
            trim: format!(
                "delete from {t} where id in (select id from {t} order by id limit $1)"
            ),
        }
    }
}

/// One write of the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Insert,
    /// A price change.
    Reprice,
    /// `in_stock` flipped.
    Restock,
    Rename,
    /// A random row deleted.
    Delete,
    /// The oldest rows deleted, this many, to bring the table under [`MAX_ROWS`].
    Trim(i64),
}

/// The next change for a table of `rows` rows, given a roll of 0..100: the table stays
/// between [`MIN_ROWS`] and [`MAX_ROWS`] rows (writers other than the demo's aside).
fn choose(rows: i64, roll: u32) -> Change {
    if rows >= MAX_ROWS {
        return Change::Trim(rows - MAX_ROWS + 1);
    }
    if rows < MIN_ROWS {
        return Change::Insert;
    }
    match roll {
        0..30 => Change::Insert,
        30..60 => Change::Reprice,
        60..72 => Change::Restock,
        72..80 => Change::Rename,
        _ => Change::Delete,
    }
}

/// Inserts, updates and deletes rows of the demo table at a steady rate on a connection of
/// its own, connecting again when it fails; it logs its errors and never ends the demo.
pub(super) struct Writer {
    pub(super) database_url: String,
    pub(super) statements: Statements,
    /// Time between writes.
    pub(super) period: Duration,
    /// Cancelled when the demo stops.
    pub(super) stop: CancellationToken,
}

impl Writer {
    pub(super) async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let connected = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                connected = self.connect() => connected,
            };
            let client = match connected {
                Ok(client) => client,
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), retry_in = ?backoff, "demo writer cannot connect");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            let mut ticks = tokio::time::interval(self.period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                if let Err(err) = self.write_once(&client).await {
                    tracing::warn!(error = %chain(&err), "demo writer: a write failed");
                    if client.is_closed() {
                        break;
                    }
                }
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let target = pgrelay::sql::target(&self.database_url, "pgrelay demo writer")?;
        let (client, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, target.config.connect(target.tls))
                .await
                .context("no answer")??;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %chain(&err), "demo writer connection closed");
            }
        });
        Ok(client)
    }

    async fn write_once(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        let s = &self.statements;
        let rows: i64 = client.query_one(&s.count, &[]).await?.get(0);
        // Drawn before any await: the thread's generator is not `Send`.
        let roll = rand::random_range(0..100);
        let name = NAMES[rand::random_range(0..NAMES.len())];
        let price: f64 = rand::random_range(0.5..20.0);
        let factor: f64 = rand::random_range(0.8..1.25);
        let in_stock = rand::random_bool(0.8);
        match choose(rows, roll) {
            Change::Insert => {
                client
                    .execute(&s.insert, &[&name, &price, &in_stock])
                    .await?
            }
            Change::Reprice => client.execute(&s.reprice, &[&factor]).await?,
            Change::Restock => client.execute(&s.restock, &[]).await?,
            Change::Rename => client.execute(&s.rename, &[&name]).await?,
            Change::Delete => client.execute(&s.delete_one, &[]).await?,
            Change::Trim(n) => client.execute(&s.trim, &[&n]).await?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_keeps_the_table_between_its_bounds() {
        for roll in 0..100 {
            assert_eq!(choose(0, roll), Change::Insert);
            assert_eq!(choose(MIN_ROWS - 1, roll), Change::Insert);
            assert_eq!(choose(MAX_ROWS, roll), Change::Trim(1));
            assert_eq!(choose(MAX_ROWS + 9, roll), Change::Trim(10));
        }
        let middle: Vec<Change> = (0..100).map(|roll| choose(20, roll)).collect();
        for change in [
            Change::Insert,
            Change::Reprice,
            Change::Restock,
            Change::Rename,
            Change::Delete,
        ] {
            assert!(middle.contains(&change), "{change:?} is never chosen");
        }
    }
}
