//! The dedicated capture connection: a driver task polls `Connection::poll_message`, turns
//! notifications on `pgrelay` into coalesced wake-ups and reports the connection's end; the
//! client half runs capture's own queries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::poll_fn;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{AsyncMessage, Client};

use crate::metrics::Metrics;

/// The payload of the notification a relay sends when it stops sleeping.
pub const AWAKE: &str = "awake";

/// A connected capture connection. Dropping it stops the driver and closes the connection.
pub struct Listener {
    /// Capture's queries run here.
    pub client: Client,
    /// One pending wake-up at most: a notification that finds one pending adds nothing (the
    /// poll it asks for will see everything committed until then).
    pub wake_rx: mpsc::Receiver<()>,
    /// Why the connection ended (an error, or `None` when it simply closed).
    pub ended_rx: oneshot::Receiver<Option<tokio_postgres::Error>>,
    /// Set when a relay announced that it stopped sleeping (payload [`AWAKE`]): writers no
    /// longer notify for it, so relays that slept on its behalf must poll (see `Sleep`).
    pub released: Arc<AtomicBool>,
    driver: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Connects and starts the driver. Not pooled: a pool drives connections itself and drops
    /// notifications.
    pub async fn connect(
        target: &crate::tls::Target,
        metrics: Arc<Metrics>,
    ) -> Result<Self, tokio_postgres::Error> {
        let (client, mut connection) = target.config.connect(target.tls.clone()).await?;
        let (wake_tx, wake_rx) = mpsc::channel(1);
        let (ended_tx, ended_rx) = oneshot::channel();
        let released = Arc::new(AtomicBool::new(false));
        let released_tx = Arc::clone(&released);
        // The driver keeps reading the socket whatever capture is doing, so PostgreSQL's
        // notification queue never fills up behind a busy relay.
        let driver = tokio::spawn(async move {
            let ended = loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if n.channel() != "pgrelay" {
                            continue;
                        }
                        metrics.inc(&metrics.wakes);
                        if n.payload() == AWAKE {
                            released_tx.store(true, Ordering::Relaxed);
                        } else if !n.payload().is_empty() {
                            // Not from a capture trigger: a wake-up all the same (it is
                            // harmless: polls read the log, never the payload).
                            metrics.inc(&metrics.bad_payloads);
                            tracing::debug!(
                                payload_bytes = n.payload().len(),
                                "unexpected payload on channel pgrelay"
                            );
                        }
                        let _ = wake_tx.try_send(());
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        tracing::info!(notice = %notice, "capture connection notice");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => break Some(err),
                    None => break None,
                }
            };
            let _ = ended_tx.send(ended);
        });
        Ok(Listener {
            client,
            wake_rx,
            ended_rx,
            released,
            driver,
        })
    }

    /// The client half, for queries on the same connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Drops a pending wake-up (a poll is about to run anyway).
    pub fn clear_wake(&mut self) {
        while self.wake_rx.try_recv().is_ok() {}
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.driver.abort();
    }
}
