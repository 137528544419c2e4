//! Issue 11's writer targets judged from a [`WritesReport`], and the report as markdown.

use super::{Row, Variant, Workload, WritesReport};
use crate::bench::{Target, render_targets};

/// Issue 11's writer targets this report can judge.
pub fn targets(report: &WritesReport) -> Vec<Target> {
    let mut targets = Vec::new();
    let ratio = |workload, variant, of: fn(&Row) -> f64| report.row(workload, variant).map(of);
    if report.lock_timeout.is_none() {
        if let Some(r) = ratio(Workload::Insert, Variant::Poll, |r| r.vs_none) {
            targets.push(Target {
                what: format!(
                    "poll mode, single-row INSERT, {} writers: throughput vs no capture",
                    report
                        .row(Workload::Insert, Variant::Poll)
                        .map_or(0, |r| r.writers)
                ),
                target: "≥ 0.75×".into(),
                measured: format!("{r:.2}×"),
                met: r >= 0.75,
            });
        }
        if let Some(r) = ratio(Workload::Insert, Variant::Notify, |r| r.vs_bare) {
            targets.push(Target {
                what: "notify mode, single-row INSERT: cost vs the bare pg_notify trigger".into(),
                target: "≤ 1.1×".into(),
                measured: format!("{:.2}× (throughput {r:.2}×)", 1.0 / r),
                met: 1.0 / r <= 1.1,
            });
        }
        for (workload, what) in [
            (Workload::Bulk1000, "1,000-row INSERT … SELECT"),
            (Workload::Bulk200k, "200,000-row INSERT … SELECT"),
        ] {
            for variant in [Variant::Notify, Variant::Poll] {
                if let Some(r) = ratio(workload, variant, |r| r.vs_bare) {
                    targets.push(Target {
                        what: format!(
                            "{}, {what}: time vs the bare pg_notify trigger",
                            variant.label().trim_start_matches("pgrelay, ")
                        ),
                        target: "≤ 1.0×".into(),
                        measured: format!("{:.2}×", 1.0 / r),
                        met: 1.0 / r <= 1.0,
                    });
                }
            }
        }
    } else if let Some(row) = report.row(Workload::Insert, Variant::Poll) {
        targets.push(Target {
            what: format!(
                "poll mode, single-row INSERT, lock_timeout = {}: writers cancelled at COMMIT or in pgrelay's trigger",
                report.lock_timeout.as_deref().unwrap_or_default()
            ),
            target: "0".into(),
            measured: format!(
                "{} of {} (at COMMIT {}, in the trigger {}; in the write {})",
                row.cancelled.commit + row.cancelled.trigger,
                row.clients,
                row.cancelled.commit,
                row.cancelled.trigger,
                row.cancelled.write
            ),
            met: row.cancelled.commit + row.cancelled.trigger == 0,
        });
    }
    targets
}

/// Who reads the captured changes during the measurements, for the method line.
fn who_follows(relay: bool) -> &'static str {
    match relay {
        true => {
            "a relay follows the table in the pgrelay variants (its CPU is reported apart; \
             a session LISTENs to the bare trigger and reads every notification)"
        }
        false => "nobody LISTENs",
    }
}

/// The report as markdown, for BENCHMARKS.md.
pub fn render(report: &WritesReport) -> String {
    let mut out = format!("### What the writer pays ({})\n\n", report.date);
    out.push_str(&format!(
        "{}; capture SQL (sql/install.sql) sha256 {}.\n",
        report.server, report.install_sql_sha256
    ));
    if let Some(sc) = &report.synchronous_commit {
        out.push_str(&format!("Writers ran with synchronous_commit={sc}.\n"));
    }
    out.push_str(&format!(
        "`{}`: {} s per timed measurement, median of {} interleaved runs (variants round robin: \
         none, bare, notify, poll, …; a fresh database per measurement, checkpoint before each, \
         {}); total {:.0} s. Backend CPU per tx: the writers' PostgreSQL backends' CPU time \
         (from /proc, a server on this machine only) per transaction, median of the runs.{}\n\n",
        report.command,
        report.duration_secs,
        report.runs,
        who_follows(report.relay),
        report.elapsed_secs,
        match report.relay {
            true =>
                " Relay CPU per tx: the relay's CPU time from the writers' start until it had \
                     captured every event they wrote, per transaction, median of the runs; relay \
                     capture backend: the same for the PostgreSQL backend of its capture \
                     connection.",
            false => "",
        }
    ));
    out.push_str(match report.relay {
        true => "| workload | variant | median TPS | rows/s | vs no capture | vs bare notify | runs (TPS) | backend CPU per tx | relay CPU per tx | relay capture backend CPU per tx |\n\
                 |---|---|---:|---:|---:|---:|---|---:|---:|---:|\n",
        false => "| workload | variant | median TPS | rows/s | vs no capture | vs bare notify | runs (TPS) | backend CPU per tx |\n\
                  |---|---|---:|---:|---:|---:|---|---:|\n",
    });
    let number = |t: f64| {
        if t < 10.0 {
            format!("{t:.3}")
        } else {
            format!("{t:.0}")
        }
    };
    let micros = |us: Option<f64>| us.map_or(String::new(), |us| format!("{us:.0} µs"));
    for row in &report.rows {
        let relay = match report.relay {
            true => format!(
                " {} | {} |",
                micros(row.relay_cpu_us_per_tx),
                micros(row.relay_backend_cpu_us_per_tx)
            ),
            false => String::new(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2}× | {:.2}× | {} | {} |{relay}\n",
            row.workload.label(row.writers),
            row.variant.label(),
            number(row.median_tps),
            row.rows_per_sec,
            row.vs_none,
            row.vs_bare,
            row.tps
                .iter()
                .map(|&t| number(t))
                .collect::<Vec<_>>()
                .join(", "),
            micros(row.backend_cpu_us_per_tx)
        ));
    }
    if let Some(timeout) = &report.lock_timeout {
        out.push_str(&format!(
            "\nWriters cancelled by lock_timeout={timeout} (all runs together; a cancelled \
             writer stops):\n\n\
             | workload | variant | writers | cancelled at COMMIT | in pgrelay's trigger | in the write (the table's own locks) |\n\
             |---|---|---:|---:|---:|---:|\n"
        ));
        for row in &report.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                row.workload.label(row.writers),
                row.variant.label(),
                row.clients,
                row.cancelled.commit,
                row.cancelled.trigger,
                row.cancelled.write
            ));
        }
        out.push_str("\nWhere they struck (the step, and the error's context):\n\n");
        for row in report.rows.iter().filter(|r| !r.contexts.is_empty()) {
            for (context, n) in &row.contexts {
                out.push_str(&format!(
                    "- {}, {}: {n} × {context}\n",
                    row.workload.label(row.writers),
                    row.variant.label()
                ));
            }
        }
    }
    let targets = targets(report);
    if !targets.is_empty() {
        out.push('\n');
        out.push_str(&render_targets(&targets));
    }
    if !report.warnings.is_empty() {
        out.push_str("\nWarnings:\n");
        for w in &report.warnings {
            out.push_str(&format!("- {w}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bench::writes::Cancelled;

    fn row(workload: Workload, variant: Variant, vs_none: f64, vs_bare: f64) -> Row {
        Row {
            workload,
            variant,
            writers: 8,
            tps: vec![1.0],
            median_tps: 1.0,
            rows_per_sec: 1.0,
            vs_none,
            vs_bare,
            clients: 8,
            cancelled: Cancelled::default(),
            contexts: BTreeMap::new(),
            backend_cpu_us_per_tx: None,
            relay_cpu_us_per_tx: None,
            relay_backend_cpu_us_per_tx: None,
        }
    }

    fn report(rows: Vec<Row>, lock_timeout: Option<&str>) -> WritesReport {
        WritesReport {
            command: "pgrelay bench --scenario writes".into(),
            date: "today".into(),
            server: "PostgreSQL".into(),
            install_sql_sha256: "0".into(),
            duration_secs: 1.0,
            runs: 1,
            lock_timeout: lock_timeout.map(str::to_owned),
            synchronous_commit: None,
            relay: true,
            rows,
            warnings: vec![],
            elapsed_secs: 1.0,
        }
    }

    #[test]
    fn targets_compare_costs_not_throughputs() {
        let r = report(
            vec![
                row(Workload::Insert, Variant::Poll, 0.80, 1.0),
                row(Workload::Insert, Variant::Notify, 0.5, 0.95),
                row(Workload::Bulk200k, Variant::Notify, 0.5, 0.99),
                row(Workload::Bulk200k, Variant::Poll, 0.5, 1.2),
            ],
            None,
        );
        let met: Vec<bool> = targets(&r).iter().map(|t| t.met).collect();
        // Poll ≥ 0.75×; notify costs 1/0.95 = 1.05× ≤ 1.1×; bulk notify takes 1.01× (missed),
        // bulk poll 0.83× (met).
        assert_eq!(met, [true, true, false, true]);
    }

    #[test]
    fn lock_timeout_target_counts_commit_and_trigger_but_not_the_write() {
        let mut poll = row(Workload::Insert, Variant::Poll, 1.0, 1.0);
        poll.cancelled.write = 3;
        let t = targets(&report(vec![poll.clone()], Some("1ms")));
        assert_eq!(t.len(), 1);
        assert!(t[0].met);
        poll.cancelled.commit = 1;
        assert!(!targets(&report(vec![poll], Some("1ms")))[0].met);
    }

    #[test]
    fn the_method_says_whether_a_relay_followed_the_table() {
        let mut poll = row(Workload::Insert, Variant::Poll, 1.0, 1.0);
        poll.relay_cpu_us_per_tx = Some(41.6);
        poll.relay_backend_cpu_us_per_tx = Some(12.2);
        let mut r = report(vec![poll], None);
        let text = render(&r);
        assert!(text.contains("a relay follows the table"), "{text}");
        assert!(text.contains("| relay CPU per tx | relay capture backend CPU per tx |"));
        assert!(text.contains("| 42 µs | 12 µs |\n"), "{text}");
        r.relay = false;
        let text = render(&r);
        assert!(text.contains("nobody LISTENs"), "{text}");
        assert!(!text.contains("relay CPU"), "{text}");
    }
}
