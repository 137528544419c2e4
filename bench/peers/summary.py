"""Markdown tables from `pgrelay bench --scenario steady --peer … --json` runs (bench/peers/run.sh).

usage: python3 bench/peers/summary.py RESULTS.jsonl

One JSON report per line (run.sh adds `run`, `peer_cpu_secs` and `load_average`). Prints each
run's commit-to-receive p50/p90/p99/max per system (pgrelay, the plain LISTEN baseline, each
peer), the medians of the runs per system, and issue 11's target: pgrelay's p99 below every
peer's, in each run and on the medians.
"""

import json
import statistics
import sys

QUANTILES = ("p50", "p90", "p99", "max")


def systems(report):
    """(name, percentiles or None, lost, CPU seconds or None) per system of one report."""
    cpu = report.get("peer_cpu_secs", {})
    yield "pgrelay", report.get("latency_ms"), report["lost"], report.get("relay_cpu_secs")
    if report.get("baseline_latency_ms") is not None:
        yield "LISTEN baseline", report["baseline_latency_ms"], report.get("baseline_lost"), None
    for peer in report.get("peers", []):
        yield peer["name"], peer.get("latency_ms"), peer["lost"], cpu.get(peer["name"])


def cell(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def verdict(report):
    """Whether pgrelay's p99 is below every peer's (None without peers or latencies)."""
    ours = (report.get("latency_ms") or {}).get("p99")
    theirs = [(p.get("latency_ms") or {}).get("p99") for p in report.get("peers", [])]
    if ours is None or not theirs or None in theirs:
        return None
    return all(ours < t for t in theirs)


def main(path):
    with open(path) as f:
        reports = [json.loads(line) for line in f if line.strip()]
    if not reports:
        sys.exit(f"{path}: no runs")

    print("| run | load avg | system | p50 | p90 | p99 | max | lost | CPU (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    by_system = {}
    for n, report in enumerate(reports, 1):
        for name, p, lost, cpu in systems(report):
            by_system.setdefault(name, []).append((p, lost, cpu))
            q = [cell((p or {}).get(k)) for k in QUANTILES]
            print(
                f"| {report.get('run', n)} | {cell(report.get('load_average'))} | {name} | "
                f"{' | '.join(q)} | {'–' if lost is None else lost} | {cell(cpu)} |"
            )

    print()
    print(f"Medians of {len(reports)} runs (each figure's median on its own), milliseconds:")
    print()
    print("| system | p50 | p90 | p99 | max | lost (all runs) | CPU (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    medians = {}
    for name, rows in by_system.items():
        med = {}
        for k in QUANTILES:
            values = [p[k] for p, _, _ in rows if p]
            med[k] = statistics.median(values) if values else None
        medians[name] = med
        lost = sum(l for _, l, _ in rows if l is not None)
        cpus = [c for _, _, c in rows if c is not None]
        cpu = statistics.median(cpus) if cpus else None
        print(f"| {name} | {' | '.join(cell(med[k]) for k in QUANTILES)} | {lost} | {cell(cpu)} |")

    print()
    runs = [verdict(r) for r in reports]
    met = sum(1 for v in runs if v)
    peers = [n for n in medians if n not in ("pgrelay", "LISTEN baseline")]
    ours = medians["pgrelay"]["p99"]
    on_medians = bool(peers) and ours is not None and all(
        medians[n]["p99"] is not None and ours < medians[n]["p99"] for n in peers
    )
    print(
        "Target (issue 11), pgrelay's steady p99 below every peer's: "
        f"{'met' if on_medians else 'missed'} on the medians "
        f"(pgrelay {cell(ours)} ms; "
        + ", ".join(f"{n} {cell(medians[n]['p99'])} ms" for n in peers)
        + f"); met in {met} of {len(runs)} runs."
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
