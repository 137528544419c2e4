//! `pgrelay bench --scenario all`: every scenario of issue 11 in both capture modes, in one
//! invocation, each target reported as met or missed.
//!
//! Delivery (a relay of the bench's own, real subscribers; see the parent module) runs each
//! scenario with the issue's parameters, notify mode then poll mode, `runs` times, and judges
//! the median. The writer's cost ([`super::writes`]) runs the insert and bulk workloads, then
//! single-row inserts again with `lock_timeout = 1ms`.

use std::time::Duration;

use super::writes::{self, Workload, WritesConfig};
use super::{BenchConfig, Report, Scenario, Target, render, render_targets};
use pgrelay::capture::Mode;

/// Settings of an `all` run.
#[derive(Debug, Clone)]
pub struct AllConfig {
    /// PostgreSQL connection string.
    pub database_url: String,
    /// Runs of each delivery scenario, and of each writes measurement.
    pub runs: usize,
    /// How long `steady` and `fanout` write.
    pub duration: Duration,
    /// How long each timed writes measurement writes.
    pub writes_duration: Duration,
}

/// One delivery scenario with the issue's parameters, and how its targets are judged.
struct Case {
    name: &'static str,
    scenario: Scenario,
    subscribers: usize,
    batch: bool,
    judge: fn(&Report) -> Vec<Target>,
}

fn target(what: &str, wanted: &str, measured: String, met: bool) -> Target {
    Target {
        what: what.to_owned(),
        target: wanted.to_owned(),
        measured,
        met,
    }
}

/// No subscriber lost a row or was closed (every delivery scenario's first promise).
fn nothing_lost(what: &str, r: &Report) -> Target {
    target(
        what,
        "0 lost, 0 closed",
        format!("{} lost, {} closed", r.lost, r.closed_by_relay),
        r.lost == 0 && r.closed_by_relay == 0,
    )
}

const CASES: [Case; 6] = [
    Case {
        name: "burst 200k rows, 1 subscriber",
        scenario: Scenario::Burst,
        subscribers: 1,
        batch: false,
        judge: |r| {
            let rss_mb = r.relay_peak_rss_mib.unwrap_or(f64::NAN) * 1.048_576;
            vec![
                target(
                    "burst 200k rows, 1 subscriber: last event after commit",
                    "≤ 2 s",
                    format!("{:.2} s", r.after_commit_secs),
                    r.after_commit_secs <= 2.0,
                ),
                target(
                    "burst 200k rows, 1 subscriber: relay peak RSS",
                    "≤ 100 MB",
                    format!("{rss_mb:.1} MB"),
                    rss_mb <= 100.0,
                ),
                nothing_lost("burst 200k rows, 1 subscriber", r),
            ]
        },
    },
    Case {
        name: "burst 200k rows, 1 subscriber, batch",
        scenario: Scenario::Burst,
        subscribers: 1,
        batch: true,
        judge: |r| {
            let rate = r.rows_written as f64 / r.after_commit_secs.max(1e-9);
            vec![
                target(
                    "burst 200k rows, 1 subscriber, batch=true: events/s after commit",
                    "≥ 500k/s",
                    format!("{:.0}k/s", rate / 1000.0),
                    rate >= 500_000.0,
                ),
                nothing_lost("burst 200k rows, 1 subscriber, batch=true", r),
            ]
        },
    },
    Case {
        name: "burst 200k rows, 100 subscribers",
        scenario: Scenario::Burst,
        subscribers: 100,
        batch: false,
        judge: |r| {
            vec![
                target(
                    "burst 200k rows, 100 subscribers: last event at the last subscriber after commit",
                    "≤ 10 s",
                    format!("{:.2} s", r.after_commit_secs),
                    r.after_commit_secs <= 10.0,
                ),
                nothing_lost("burst 200k rows, 100 subscribers", r),
            ]
        },
    },
    Case {
        name: "steady 1,000 tx/s, 20 subscribers",
        scenario: Scenario::Steady,
        subscribers: 20,
        batch: false,
        judge: |r| {
            let p = r.latency_ms.clone().unwrap_or_default();
            vec![
                target(
                    "steady 1,000 tx/s, 4 writers, 20 subscribers: commit-to-receive p50",
                    "≤ 5 ms",
                    format!("{:.2} ms", p.p50),
                    r.latency_ms.is_some() && p.p50 <= 5.0,
                ),
                target(
                    "steady 1,000 tx/s, 4 writers, 20 subscribers: commit-to-receive p99",
                    "≤ 20 ms",
                    format!("{:.2} ms", p.p99),
                    r.latency_ms.is_some() && p.p99 <= 20.0,
                ),
                nothing_lost("steady 1,000 tx/s, 20 subscribers", r),
            ]
        },
    },
    Case {
        name: "fan-out, 1,000 subscribers",
        scenario: Scenario::Fanout,
        subscribers: 1000,
        batch: false,
        judge: |r| {
            vec![
                target(
                    "fan-out, 1,000 subscribers, single-row writes: frames/s",
                    "≥ 300k/s",
                    format!("{:.0}k/s", r.frames_per_sec / 1000.0),
                    r.frames_per_sec >= 300_000.0,
                ),
                nothing_lost("fan-out, 1,000 subscribers", r),
            ]
        },
    },
    Case {
        name: "idle, 10,000 subscribers",
        scenario: Scenario::Idle,
        subscribers: 10_000,
        batch: false,
        judge: |r| {
            let kb = r.rss_per_connection_kib.unwrap_or(f64::NAN) * 1.024;
            vec![target(
                "idle, 10,000 subscribers: relay RSS per connection",
                "≤ 16 kB",
                format!("{kb:.1} kB"),
                kb <= 16.0,
            )]
        },
    },
];

/// Runs everything; prints each scenario's report as it goes and returns the targets table.
pub async fn run(config: &AllConfig) -> anyhow::Result<String> {
    let mut targets = Vec::new();
    for mode in [Mode::Notify, Mode::Poll] {
        for case in &CASES {
            let bench = BenchConfig {
                database_url: config.database_url.clone(),
                relay_url: None,
                scenario: case.scenario,
                subscribers: case.subscribers,
                rows: 200_000,
                rate: 1000,
                duration: config.duration,
                payload_bytes: 64,
                writers: 4,
                statement_rows: 1,
                batch: case.batch,
                capture: mode,
                baseline: false,
                peers: Vec::new(),
            };
            eprintln!("{}, {} mode", case.name, mode.name());
            let mut reports = Vec::new();
            let mut failure = None;
            for _ in 0..config.runs.max(1) {
                match super::run(&bench).await {
                    Ok(report) => reports.push(report),
                    Err(err) => {
                        failure = Some(format!("{err:#}"));
                        break;
                    }
                }
            }
            let mode_what = |t: Target| Target {
                what: format!("{} mode, {}", mode.name(), t.what),
                ..t
            };
            match failure {
                Some(err) => {
                    println!(
                        "### {}, {} mode\n\nnot run: {err}\n",
                        case.name,
                        mode.name()
                    );
                    targets.push(mode_what(target(
                        case.name,
                        "",
                        format!("not run: {err}"),
                        false,
                    )));
                }
                None => {
                    let median = super::median(&reports);
                    println!(
                        "### {}, {} mode (median of {})\n\n```\n{}```\n",
                        case.name,
                        mode.name(),
                        reports.len(),
                        render(&median)
                    );
                    targets.extend((case.judge)(&median).into_iter().map(mode_what));
                }
            }
        }
    }
    for lock_timeout in [None, Some("1ms".to_owned())] {
        let workloads = match lock_timeout {
            None => vec![Workload::Insert, Workload::Bulk1000, Workload::Bulk200k],
            Some(_) => vec![Workload::Insert],
        };
        let report = writes::run(&WritesConfig {
            database_url: config.database_url.clone(),
            workloads,
            writers: 8,
            duration: config.writes_duration,
            runs: config.runs.max(1),
            lock_timeout,
            synchronous_commit: None,
            relay: true,
        })
        .await?;
        println!("{}", writes::render(&report));
        targets.extend(writes::targets(&report));
    }
    let met = targets.iter().filter(|t| t.met).count();
    Ok(format!(
        "## Issue 11 targets: {met} of {} met\n\n{}",
        targets.len(),
        render_targets(&targets)
    ))
}
