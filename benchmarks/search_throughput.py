"""Search throughput with 1 and 2 Ray workers, and the loop's overhead over scoring in-process.

Runs the same number of evaluations of a search config several ways, in one run (JSON out, written
again after each way, so a run cut short keeps what it measured):
  in_process   the candidates of those evaluations scored by one ScoringWorker in this process:
               no Optuna, no proposals, no Ray (the floor)
  local        the whole search loop, scoring in the driver process (Optuna + proposals + storage)
  ray_1, ray_2 the whole loop with 1 and 2 Ray workers (startup reported apart)

    python -m benchmarks.search_throughput configs/default.yaml --evaluations 96 \
        --out benchmarks/results/search-throughput-cpu.json
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.output import emit
from search import driver, long_stage, runs
from search.workers import Batch, ScoringWorker, WorkerSetup


def run_search(config_path: Path, evaluations: int, overrides: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        # one baseline: they are scored before the loop's clock starts, and at 32k six cost a minute; no
        # pruning: the loop must score every document of the candidates the floor scores
        config = runs.load_search_config(config_path, {"budget.minutes": None, "baselines": ["none"],
                                                       "pruning.name": "none", **overrides})
        run_dir = runs.create(config, Path(tmp))
        ctx = long_stage.open_context(run_dir, config)
        summary = driver.search(ctx, stop_after=evaluations, quiet=True)
        candidates = [ctx.candidate(t.params) for t in sorted(ctx.study.trials, key=lambda t: t.number)]
    summary["evaluations_per_s"] = summary["evaluated"] / summary["loop_seconds"]
    summary["startup_seconds"] = summary["seconds"] - summary["loop_seconds"]
    return summary, candidates, config, ctx.setup


def in_process(config, candidates, setup: WorkerSetup) -> dict:
    worker = ScoringWorker(setup)  # what the loop's workers are built from, the short-window guard included
    k = config.workers.candidates_per_forward
    batches = [Batch(tuple(candidates[i : i + k])) for i in range(0, len(candidates), k)]
    worker.score(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        worker.score(batch)
    seconds = time.perf_counter() - start
    return {"evaluated": len(candidates), "loop_seconds": seconds, "evaluations_per_s": len(candidates) / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--evaluations", type=int, default=96)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    machine = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
               f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores")
    results: dict = {}

    def write(complete: bool) -> None:
        """After every mode: a call cut short by its time limit still leaves what it measured."""
        floor = results.get("in_process", {}).get("evaluations_per_s")
        summary = {f"loop_overhead_{mode}": floor / row["evaluations_per_s"] - 1
                   for mode, row in results.items() if floor and mode != "in_process"}
        if "ray_1" in results and "ray_2" in results:
            summary["ray_2_over_ray_1"] = results["ray_2"]["evaluations_per_s"] / results["ray_1"]["evaluations_per_s"]
        documents = config.needles.documents
        for row in results.values():
            row["candidate_docs_per_s"] = row["evaluations_per_s"] * documents
        emit({"machine": machine, "config": str(args.config), "documents": documents, "complete": complete,
              "results": results, "summary": summary}, args.out)

    # Ray with one worker first (the default deployment, and the candidates every other mode scores),
    # then the floor it is measured against, then the rest
    counts = sorted(args.workers)
    first = {"workers.backend": "ray", "workers.count": counts[0]}
    results[f"ray_{counts[0]}"], candidates, config, setup = run_search(args.config, args.evaluations, first)
    _shutdown_ray()
    results["in_process"] = in_process(config, candidates, setup)
    write(False)
    for count in counts[1:]:
        results[f"ray_{count}"], *_ = run_search(args.config, args.evaluations, {"workers.backend": "ray",
                                                                                 "workers.count": count})
        _shutdown_ray()
        write(False)
    results["local"], *_ = run_search(args.config, args.evaluations, {"workers.backend": "local"})
    write(True)


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
