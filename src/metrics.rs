//! Process-wide counters and gauges, rendered for Prometheus at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters and gauges; all relaxed atomics, read only for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events published to the hub.
    pub events_captured: AtomicU64,
    /// NOTIFY payloads that could not be decoded and were skipped.
    pub bad_payloads: AtomicU64,
    /// Times the capture connection was lost.
    pub capture_reconnects: AtomicU64,
    /// WebSocket connections open now (gauge).
    pub ws_connections: AtomicU64,
    /// Frames written to WebSockets.
    pub frames_sent: AtomicU64,
    /// Connections closed with 4008.
    pub slow_consumers: AtomicU64,
    /// Log rows deleted by retention.
    pub pruned_rows: AtomicU64,
    /// Rows a pointer announced that were no longer in the log when read.
    pub missing_log_rows: AtomicU64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts one from a gauge.
    pub fn dec(&self, gauge: &AtomicU64) {
        gauge.fetch_sub(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self, listening: bool) -> String {
        let mut out = String::new();
        let rows: [(&str, &str, &str, u64); 9] = [
            (
                "pgrelay_events_captured_total",
                "counter",
                "Events published to subscribers' topics.",
                self.events_captured.load(Ordering::Relaxed),
            ),
            (
                "pgrelay_bad_payloads_total",
                "counter",
                "NOTIFY payloads skipped as undecodable.",
                self.bad_payloads.load(Ordering::Relaxed),
            ),
            (
                "pgrelay_capture_reconnects_total",
                "counter",
                "Capture connection losses.",
                self.capture_reconnects.load(Ordering::Relaxed),
            ),
            (
                "pgrelay_ws_connections",
                "gauge",
                "Open WebSocket connections.",
                self.ws_connections.load(Ordering::Relaxed),
            ),
            (
                "pgrelay_frames_sent_total",
                "counter",
                "Frames written to WebSockets.",
                self.frames_sent.load(Ordering::Relaxed),
            ),
            (
                "pgrelay_slow_consumers_total",
                "counter",
                "Connections closed with 4008.",
                self.slow_consumers.load(Ordering::Relaxed),
            ),
            (
                "pgrelay_pruned_rows_total",
                "counter",
                "Log rows deleted by retention.",
                self.pruned_rows.load(Ordering::Relaxed),
            ),
            (
                "pgrelay_missing_log_rows_total",
                "counter",
                "Announced log rows gone before capture read them.",
                self.missing_log_rows.load(Ordering::Relaxed),
            ),
            (
                "pgrelay_capture_listening",
                "gauge",
                "1 while capture LISTENs.",
                u64::from(listening),
            ),
        ];
        for (name, kind, help, value) in rows {
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
    }
}
