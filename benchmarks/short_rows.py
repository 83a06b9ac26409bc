"""What short rows cost, packed to the target (`short_rows: target`) or cut at the window (`window`).

Runs the first steps of one fine-tune config both ways, in one run, on the same model and tokens per
step, and reports seconds per step (the first step, which warms up kernels, left out), training
tokens per second and, on a GPU, peak memory. A way that runs out of memory is reported as such, not
raised: at 64k and beyond that is the question. JSON is written again after each way.

    python -m benchmarks.short_rows configs/train-tiny.yaml --steps 4 --set target_window=4096 \
        --set factors=yarn --out benchmarks/results/short-rows-tiny-16x-cpu.json
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.output import emit
from fitness.config_io import read_yaml
from mixed_window_train.finetune import finetune, load_finetune_config
from mixed_window_train.trainer import _metric_rows

WAYS = ("window", "target")


def override(data: dict, assignment: str) -> None:
    """`a.b=value` (value read as YAML) into the nested dict."""
    key, _, value = assignment.partition("=")
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = yaml.safe_load(value)


def run_way(config_path: Path, way: str, steps: int, folder: Path) -> dict:
    data = read_yaml(config_path)
    data.setdefault("data", {})["short_rows"] = way
    data["train"]["checkpoint_every"] = 10**6  # the cost of a step, not of a checkpoint
    path = folder / f"{way}.yaml"
    path.write_text(yaml.safe_dump(data))
    config, candidate = load_finetune_config(path)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        finetune(config, candidate, folder / way, stop_after=steps)  # training only: no export, no evaluation
    except torch.OutOfMemoryError as err:
        return {"error": "out of memory: " + " ".join(str(err).split())[:200]}
    rows = _metric_rows(folder / way / "metrics.csv")
    tokens = config.train.batch_size * config.train.grad_accum * candidate.target_window
    step_seconds = [tokens / float(row["tokens_per_s"]) for row in rows]
    timed = step_seconds[1:] or step_seconds
    result = {"steps": len(rows), "seconds_per_step": sum(timed) / len(timed), "first_step_seconds": step_seconds[0],
              "tokens_per_step": tokens, "tokens_per_s": tokens * len(timed) / sum(timed),
              "wall_seconds": time.perf_counter() - started, "target_window": candidate.target_window}
    if torch.cuda.is_available():
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a `ropesearch train` config")
    parser.add_argument("--steps", type=int, default=4, help="steps per way (the first is left out of the mean)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the config, e.g. target_window=4096 or train.batch_size=2")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    machine = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
               f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = read_yaml(args.config)
        for assignment in args.set:
            override(data, assignment)
        config_path = folder / "config.yaml"
        config_path.write_text(yaml.safe_dump(data))
        for way in args.ways:
            results[way] = run_way(config_path, way, args.steps, folder)
            summary = {}
            if all("seconds_per_step" in results.get(way, {}) for way in WAYS):
                summary["target_over_window_seconds"] = (results["target"]["seconds_per_step"]
                                                         / results["window"]["seconds_per_step"])
            emit({"machine": machine, "config": str(args.config), "set": args.set, "steps": args.steps,
                  "results": results, "summary": summary}, args.out)


if __name__ == "__main__":
    main()
