//! What one bench run measured, and how it prints: percentiles, issue-11 targets, tables.

use serde::Serialize;

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Subscribers connected.
    pub subscribers: usize,
    /// Rows written.
    pub rows_written: u64,
    /// Frames received, all subscribers together.
    pub frames_received: u64,
    /// Frames received per second, all subscribers together.
    pub frames_per_sec: f64,
    /// Seconds from the first write to the last frame at the last subscriber.
    pub elapsed_secs: f64,
    /// Seconds the writes took (burst: the statement, commit included).
    pub write_secs: f64,
    /// Seconds from the end of the writes (the commit) to the last frame at the last subscriber.
    pub after_commit_secs: f64,
    /// Latency percentiles in milliseconds (steady: capture time to receipt; burst: statement
    /// start to each subscriber's last row).
    pub latency_ms: Option<Percentiles>,
    /// Steady: capture time (the event's `ts`, before the commit) to receipt, milliseconds.
    pub capture_latency_ms: Option<Percentiles>,
    /// Steady: commit to receipt at the first subscriber that got the row (the relay's path
    /// to one socket, without the wait behind the other subscribers), milliseconds.
    pub first_latency_ms: Option<Percentiles>,
    /// Steady with `baseline`: commit to receipt of the same transaction's bare `pg_notify`
    /// at a plain LISTEN client, milliseconds.
    pub baseline_latency_ms: Option<Percentiles>,
    /// Steady with `baseline`: rows whose notification the LISTEN client never received.
    pub baseline_lost: Option<u64>,
    /// Steady with `--peer`: what each peer's subscribers saw, fed by the baseline's
    /// notifications of the same transactions.
    pub peers: Vec<PeerReport>,
    /// Subscribers the relay closed (e.g. 4008, slow consumer).
    pub closed_by_relay: u64,
    /// Rows some subscriber never received.
    pub lost: u64,
    /// Rows some subscriber received more than once.
    pub duplicated: u64,
    /// Relay CPU seconds during the run (local relay only).
    pub relay_cpu_secs: Option<f64>,
    /// Relay peak RSS in MiB (local relay only).
    pub relay_peak_rss_mib: Option<f64>,
    /// Relay RSS per idle connection in KiB (idle scenario).
    pub rss_per_connection_kib: Option<f64>,
    /// CPU seconds the bench itself used during the run.
    pub bench_cpu_secs: f64,
}

/// What one peer's subscribers saw in a steady run (see `bench::peers`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerReport {
    /// Name given with `--peer`.
    pub name: String,
    /// Its WebSocket URL.
    pub url: String,
    /// Commit to receipt of the row at each of its subscribers, milliseconds.
    pub latency_ms: Option<Percentiles>,
    /// Messages that carried a row, all its subscribers together.
    pub frames_received: u64,
    /// Rows some subscriber of it never received.
    pub lost: u64,
    /// Rows some subscriber of it received more than once.
    pub duplicated: u64,
    /// Its subscribers that it closed.
    pub closed: u64,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `samples`; `None` when there are none.
    pub(crate) fn of(mut samples: Vec<f64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        })
    }
}

/// One of issue 11's targets, met or missed.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured.
    pub what: String,
    /// The target.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Whether the target was met.
    pub met: bool,
}

/// Targets as a markdown table.
pub fn render_targets(targets: &[Target]) -> String {
    let mut out = String::from("| target (issue 11) | wanted | measured | |\n|---|---|---|---|\n");
    for t in targets {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            t.what,
            t.target,
            t.measured,
            if t.met { "met" } else { "**missed**" }
        ));
    }
    out
}

/// The report as a small table for people.
pub fn render(report: &Report) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("scenario".into(), report.scenario.clone()),
        ("subscribers".into(), report.subscribers.to_string()),
    ];
    if report.scenario != "idle" {
        rows.push(("rows written".into(), report.rows_written.to_string()));
        rows.push(("frames received".into(), report.frames_received.to_string()));
        rows.push((
            "frames/s (all subscribers)".into(),
            format!("{:.0}", report.frames_per_sec),
        ));
        rows.push(("elapsed (s)".into(), format!("{:.3}", report.elapsed_secs)));
        rows.push((
            "writes took (s)".into(),
            format!("{:.3}", report.write_secs),
        ));
        rows.push((
            "last frame after the writes (s)".into(),
            format!("{:.3}", report.after_commit_secs),
        ));
        if let Some(p) = &report.latency_ms {
            let what = if report.scenario == "burst" {
                "time to last row per subscriber"
            } else {
                "commit-to-receive latency"
            };
            rows.push((
                format!("{what} p50/p90/p99/max (ms)"),
                format!("{:.2} / {:.2} / {:.2} / {:.2}", p.p50, p.p90, p.p99, p.max),
            ));
        }
        if let Some(p) = &report.first_latency_ms {
            rows.push((
                "commit-to-receive, first subscriber per row p50/p90/p99/max (ms)".into(),
                format!("{:.2} / {:.2} / {:.2} / {:.2}", p.p50, p.p90, p.p99, p.max),
            ));
        }
        if let Some(p) = &report.baseline_latency_ms {
            rows.push((
                "baseline: commit-to-NOTIFY at a LISTEN client p50/p90/p99/max (ms)".into(),
                format!("{:.2} / {:.2} / {:.2} / {:.2}", p.p50, p.p90, p.p99, p.max),
            ));
        }
        if let Some(lost) = report.baseline_lost {
            rows.push(("baseline notifications lost".into(), lost.to_string()));
        }
        for peer in &report.peers {
            if let Some(p) = &peer.latency_ms {
                rows.push((
                    format!("peer {}: commit-to-receive p50/p90/p99/max (ms)", peer.name),
                    format!("{:.2} / {:.2} / {:.2} / {:.2}", p.p50, p.p90, p.p99, p.max),
                ));
            }
            rows.push((
                format!("peer {}: lost / duplicated / closed", peer.name),
                format!("{} / {} / {}", peer.lost, peer.duplicated, peer.closed),
            ));
        }
        if let Some(p) = &report.capture_latency_ms {
            rows.push((
                "capture-to-receive latency p50/p90/p99/max (ms)".into(),
                format!("{:.2} / {:.2} / {:.2} / {:.2}", p.p50, p.p90, p.p99, p.max),
            ));
        }
        rows.push((
            "subscribers closed by the relay".into(),
            report.closed_by_relay.to_string(),
        ));
        rows.push((
            "lost / duplicated".into(),
            format!("{} / {}", report.lost, report.duplicated),
        ));
        if let Some(cpu) = report.relay_cpu_secs {
            rows.push(("relay CPU (s)".into(), format!("{cpu:.2}")));
        }
        rows.push((
            "bench CPU (s)".into(),
            format!("{:.2}", report.bench_cpu_secs),
        ));
    }
    if let Some(rss) = report.relay_peak_rss_mib {
        rows.push(("relay peak RSS (MiB)".into(), format!("{rss:.1}")));
    }
    if let Some(per) = report.rss_per_connection_kib {
        rows.push((
            "relay RSS per idle connection (KiB)".into(),
            format!("{per:.1}"),
        ));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// The run with the median elapsed time (its other figures stay consistent with it).
pub fn median(reports: &[Report]) -> Report {
    let mut sorted: Vec<&Report> = reports.iter().collect();
    sorted.sort_by(|a, b| {
        let key = |r: &Report| match r.scenario.as_str() {
            "idle" => r.rss_per_connection_kib.unwrap_or(0.0),
            "steady" => r.latency_ms.as_ref().map_or(0.0, |p| p.p99),
            "fanout" => r.frames_per_sec,
            _ => r.elapsed_secs,
        };
        key(a).total_cmp(&key(b))
    });
    sorted[sorted.len() / 2].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let p = Percentiles::of((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (51.0, 99.0, 100.0));
        assert!(Percentiles::of(vec![]).is_none());
    }
}
