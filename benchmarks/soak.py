"""Soak: a long tiny search (>= 2,000 evaluations, 2 Ray workers) with memory sampled throughout.

Peak RSS of the driver and of each worker in the first quarter of the evaluations is compared with
the last quarter: a leak in either shows as growth (target: <= 10 %).

    python -m benchmarks.soak --out benchmarks/results/soak-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import yaml

from fitness.models import machine_name
from search import driver, long_stage, runs

CONFIG = {
    "name": "soak",
    "model": {"name": "tiny", "device": "cpu", "threads": 1},
    "scale": 4,
    "needles": {"documents": 4},
    "holdout": {"documents": 4, "haystack": ["docstrings"]},
    "sampler": {"evolution": {"population": 64, "parents": 32, "mutations": 16, "crossovers": 16, "generations": 62}},
    "workers": {"backend": "ray", "count": 2, "candidates_per_forward": 4, "documents_per_forward": 4},
    "baselines": ["yarn"],
}


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def worker_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ScoringWorker" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return sorted(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()

    samples, stop = [], threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "soak.yaml"
        config_path.write_text(yaml.safe_dump(CONFIG))
        config = runs.load_search_config(config_path)
        run_dir = runs.create(config, Path(tmp) / "runs")
        ctx = long_stage.open_context(run_dir, config)
        db = run_dir / "study.db"

        def sample():
            import sqlite3

            while not stop.is_set():
                try:
                    with sqlite3.connect(db, timeout=1) as connection:
                        done = connection.execute("SELECT COUNT(*) FROM trials WHERE state='COMPLETE'").fetchone()[0]
                except sqlite3.Error:
                    done = None
                workers = {pid: rss_kb(pid) for pid in worker_pids()}
                samples.append({"t": time.time(), "completed": done, "driver_kb": rss_kb(os.getpid()),
                                "workers_kb": workers})
                stop.wait(args.interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        summary = driver.search(ctx, quiet=False)
        stop.set()
        thread.join()

    total = summary["completed"]
    quarter = lambda lo, hi: [s for s in samples if s["completed"] is not None and lo <= s["completed"] / total < hi]  # noqa: E731
    first, last = quarter(0.0, 0.25), quarter(0.75, 1.01)

    def peak(rows, key):
        return max(r[key] for r in rows if r[key] is not None)

    def worker_peak(rows):
        per_pid = {}
        for r in rows:
            for pid, kb in r["workers_kb"].items():
                if kb:
                    per_pid[pid] = max(per_pid.get(pid, 0), kb)
        return per_pid

    first_workers, last_workers = worker_peak(first), worker_peak(last)
    result = {
        "machine": machine_name("cpu"),
        "evaluations": total,
        "seconds": summary["seconds"],
        "evaluations_per_s": summary["evaluated"] / summary["loop_seconds"],
        "driver_peak_kb": {"first_quarter": peak(first, "driver_kb"), "last_quarter": peak(last, "driver_kb")},
        "worker_peak_kb": {"first_quarter": first_workers, "last_quarter": last_workers},
        "samples": len(samples),
    }
    result["driver_growth"] = result["driver_peak_kb"]["last_quarter"] / result["driver_peak_kb"]["first_quarter"] - 1
    common = sorted(set(first_workers) & set(last_workers))
    result["worker_growth"] = {str(pid): last_workers[pid] / first_workers[pid] - 1 for pid in common}
    result["passed"] = result["driver_growth"] <= 0.10 and all(g <= 0.10 for g in result["worker_growth"].values())
    result["trace"] = [{"completed": s["completed"], "driver_kb": s["driver_kb"],
                        "workers_kb": sum(v for v in s["workers_kb"].values() if v)} for s in samples[:: max(1, len(samples) // 200)]]
    text = json.dumps(result, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}, indent=2))
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
