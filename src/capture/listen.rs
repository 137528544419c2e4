//! The dedicated LISTEN connection: a driver task polls `Connection::poll_message` and hands
//! notification payloads over in order; the client half runs capture's own queries.

use futures_util::future::poll_fn;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// A connected capture connection. Dropping it stops the driver and closes the connection.
pub struct Listener {
    client: Client,
    /// Payloads in arrival order; an `Err` (then the end) when the connection fails.
    payloads_rx: mpsc::UnboundedReceiver<Result<String, tokio_postgres::Error>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Connects and starts the driver. Not pooled: a pool drives connections itself and drops
    /// notifications.
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Self, tokio_postgres::Error> {
        let (client, mut connection) = config.connect(NoTls).await?;
        // Unbounded on purpose: the driver must keep reading the socket whatever capture is
        // doing, or PostgreSQL's notification queue would fill up instead; capture drains it
        // without waiting on any subscriber.
        let (payloads_tx, payloads_rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if n.channel() == "pgrelay"
                            && payloads_tx.send(Ok(n.payload().to_owned())).is_err()
                        {
                            return;
                        }
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        tracing::info!(notice = %notice, "capture connection notice");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        let _ = payloads_tx.send(Err(err));
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(Listener {
            client,
            payloads_rx,
            driver,
        })
    }

    /// The client half, for queries on the same connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The next payload; `None` when the connection is gone.
    pub async fn next(&mut self) -> Option<Result<String, tokio_postgres::Error>> {
        self.payloads_rx.recv().await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}
