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
    /// Frames written to WebSockets, and events written to SSE streams.
    pub frames_sent: AtomicU64,
    /// Connections closed as slow consumers (WebSocket 4008, SSE `slow_consumer`).
    pub slow_consumers: AtomicU64,
    /// Log rows deleted by retention.
    pub pruned_rows: AtomicU64,
    /// Log rows that could not be read (their tables' subscribers were reset).
    pub bad_log_rows: AtomicU64,
    /// Transactions whose row order could not be recovered (their tables were reset).
    pub order_unknown: AtomicU64,
    /// Notifications received on the capture channel.
    pub wakes: AtomicU64,
    /// Polls of the log.
    pub polls: AtomicU64,
    /// Notify mode: times capture fell asleep holding the sleep lock (writers notify).
    pub capture_sleeps: AtomicU64,
    /// Notify mode: times notifications came so fast that capture let go of the sleep lock
    /// and polled (writers stop notifying).
    pub capture_busy: AtomicU64,
    /// Seconds the capture horizon has not moved (gauge).
    pub horizon_stuck_seconds: AtomicU64,
    /// Pid of the backend whose transaction holds the horizon back, 0 if none (gauge).
    pub horizon_holder: AtomicU64,
    /// Initial-data reads running now (gauge).
    pub snapshots_running: AtomicU64,
    /// Requests and sockets refused by a limit (connections, rate, subscriptions, filters,
    /// snapshots).
    pub limited: AtomicU64,
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
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 18] = [
            (
                "pgrelay_snapshots_running",
                "gauge",
                "Initial-data reads running now.",
                load(&self.snapshots_running),
            ),
            (
                "pgrelay_limited_total",
                "counter",
                "Requests and sockets refused by a configured limit.",
                load(&self.limited),
            ),
            (
                "pgrelay_events_captured_total",
                "counter",
                "Events published to subscribers' topics.",
                load(&self.events_captured),
            ),
            (
                "pgrelay_bad_payloads_total",
                "counter",
                "Notifications on the capture channel with a payload no capture trigger sends.",
                load(&self.bad_payloads),
            ),
            (
                "pgrelay_bad_log_rows_total",
                "counter",
                "Log rows that could not be read (their tables' subscribers were reset).",
                load(&self.bad_log_rows),
            ),
            (
                "pgrelay_order_unknown_total",
                "counter",
                "Transactions whose row order could not be recovered from the log (their tables' subscribers were reset).",
                load(&self.order_unknown),
            ),
            (
                "pgrelay_capture_reconnects_total",
                "counter",
                "Capture connection losses.",
                load(&self.capture_reconnects),
            ),
            (
                "pgrelay_capture_wakes_total",
                "counter",
                "Notifications that woke capture.",
                load(&self.wakes),
            ),
            (
                "pgrelay_capture_polls_total",
                "counter",
                "Polls of the change log.",
                load(&self.polls),
            ),
            (
                "pgrelay_capture_sleeps_total",
                "counter",
                "Notify mode: times capture fell asleep waiting for writers' notifications.",
                load(&self.capture_sleeps),
            ),
            (
                "pgrelay_capture_busy_total",
                "counter",
                "Notify mode: times notifications came faster than --notify-busy-rate, so that capture polled and writers stopped notifying.",
                load(&self.capture_busy),
            ),
            (
                "pgrelay_horizon_stuck_seconds",
                "gauge",
                "Seconds capture's horizon has not moved (an open transaction holds it).",
                load(&self.horizon_stuck_seconds),
            ),
            (
                "pgrelay_horizon_holder_pid",
                "gauge",
                "Pid of the backend whose open transaction holds the horizon back (0: none).",
                load(&self.horizon_holder),
            ),
            (
                "pgrelay_ws_connections",
                "gauge",
                "Open WebSocket connections.",
                load(&self.ws_connections),
            ),
            (
                "pgrelay_frames_sent_total",
                "counter",
                "Frames written to WebSockets and events written to SSE streams.",
                load(&self.frames_sent),
            ),
            (
                "pgrelay_slow_consumers_total",
                "counter",
                "Connections closed as slow consumers (WebSocket 4008, SSE slow_consumer).",
                load(&self.slow_consumers),
            ),
            (
                "pgrelay_pruned_rows_total",
                "counter",
                "Log rows deleted by retention.",
                load(&self.pruned_rows),
            ),
            (
                "pgrelay_capture_listening",
                "gauge",
                "1 while capture is connected and caught up.",
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

/// Appends the per-table lines of `/metrics`: subscriptions reading each table now and the
/// events published to it (`stats` from [`crate::hub::Hub::topic_stats`]).
pub fn render_tables(out: &mut String, stats: &[(String, usize, u64)]) {
    out.push_str(
        "# HELP pgrelay_subscriptions Subscriptions reading a table now.\n\
         # TYPE pgrelay_subscriptions gauge\n",
    );
    for (table, readers, _) in stats {
        let table = label(table);
        // Writing to a String cannot fail.
        let _ = writeln!(out, "pgrelay_subscriptions{{table=\"{table}\"}} {readers}");
    }
    out.push_str(
        "# HELP pgrelay_table_events_total Events published to a table's subscribers since the relay started.\n\
         # TYPE pgrelay_table_events_total counter\n",
    );
    for (table, _, events) in stats {
        let table = label(table);
        let _ = writeln!(
            out,
            "pgrelay_table_events_total{{table=\"{table}\"}} {events}"
        );
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_escaped_as_prometheus_label_values() {
        let mut out = String::new();
        render_tables(&mut out, &[("a\"b\\c\nd".to_owned(), 2, 7)]);
        assert!(
            out.contains("pgrelay_subscriptions{table=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("pgrelay_table_events_total{table=\"a\\\"b\\\\c\\nd\"} 7\n"),
            "{out}"
        );
    }
}
