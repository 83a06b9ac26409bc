"""Multi-fidelity pruning against scoring every candidate fully: the same search config and generations,
one run (JSON out). Each variant is a whole search (no time cap) followed by its held-out report.

    python -m benchmarks.pruning configs/default.yaml --first 8 --keep-best 32 \
        --out benchmarks/results/pruning-cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.output import emit
from fitness.factor_files import load_factor_file
from fitness.models import machine_name
from search import runs
from search.objective import objective_value


def run_search(config_path: Path, overrides: dict) -> dict:
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        config = runs.load_search_config(config_path, {"budget.minutes": None, **overrides})
        run_dir = runs.create(config, Path(tmp))
        summary = runs.run(run_dir, quiet=True)
        best = load_factor_file(run_dir / "best_factors.json")
    ray.shutdown()
    held_out = summary["report"]["summary"]
    return {
        "seconds": summary["seconds"],
        "loop_seconds": summary["loop_seconds"],
        "settled": summary["completed"],
        "pruning": summary.get("pruning"),
        "best_on_search_documents": objective_value(best.params),
        "held_out_searched_ppl": held_out["searched_ppl"],
        "held_out_best_baseline": {held_out["best_baseline"]: held_out["best_baseline_ppl"]},
        "held_out_gap_closed": held_out["gap_closed"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--first", type=int, default=8, help="first-stage documents")
    parser.add_argument("--keep-best", type=int, default=32, help="go on only within the best N earlier candidates")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    pruned = {"pruning.name": "earlier_trials", "pruning.documents": args.first, "pruning.keep_best": args.keep_best}
    results = {"full": run_search(args.config, {}), "pruned": run_search(args.config, pruned)}
    full, cut = results["full"], results["pruned"]
    results["summary"] = {
        "wall_time_ratio": cut["loop_seconds"] / full["loop_seconds"],
        "scorings_saved_fraction": cut["pruning"]["saved_fraction"],
        "held_out_ppl_ratio": cut["held_out_searched_ppl"] / full["held_out_searched_ppl"],
    }
    results["machine"] = machine_name("cuda" if torch.cuda.is_available() else "cpu")
    results["torch"] = torch.__version__
    results["config"] = str(args.config)
    results["pruning_settings"] = pruned
    emit(results, args.out)


if __name__ == "__main__":
    main()
