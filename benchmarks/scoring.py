"""Scoring throughput and peak memory, measured in one run (JSON out).

Compares, at each length:
  bare          the model's backbone forward alone (SDPA), no LM head: the floor
  answer_only   ropesearch's fitness forward: logits at the answer positions only
  full_logits   the reference: every position's logits, then the answer NLL
and K candidates batched in one forward (per-row RoPE) against K sequential forwards.

    python -m benchmarks.scoring --model tiny --lengths 1024 4096 --out benchmarks/results/scoring-cpu.json
    python -m benchmarks.scoring --model smollm2-135m --device cuda --dtype bfloat16 --lengths 16384 32768 \
        --out benchmarks/results/scoring-h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.output import emit
from fitness.baselines import baseline
from fitness.geometry import geometry_from_config
from fitness.models import ModelSettings, load_model
from fitness.needles import NeedleSettings, build_needle_set
from fitness.patch import apply_candidates
from fitness.scoring import answer_nll, full_logits_nll, score_candidates


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_memory(fn, device) -> float | None:
    """Peak bytes above the model's own, CUDA only (CPU: measured per subprocess, see --mode)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_mode(args, mode: str, length: int) -> dict:
    """One measurement; on CPU each mode runs in its own process so that its peak RSS is its own."""
    settings = ModelSettings(name=args.model, device=args.device, dtype=args.dtype, threads=args.threads)
    model, tokenizer = load_model(settings)
    device = next(model.parameters()).device
    needles = build_needle_set(tokenizer, NeedleSettings(documents=max(args.docs, args.candidates)), length)
    geometry = geometry_from_config(model.config)
    yarn = baseline("yarn", geometry, length)
    ids, answers = needles.input_ids[: args.docs], needles.answers[: args.docs]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    with torch.no_grad(), apply_candidates(model, yarn):

        def bare():
            for j in range(args.docs):
                model.model(input_ids=ids[j : j + 1].to(device), use_cache=False)

        def answer_only():
            for j in range(args.docs):
                answer_nll(model, ids[j : j + 1], answers[j : j + 1])

        def full_logits():
            for j in range(args.docs):
                full_logits_nll(model, ids[j : j + 1], answers[j : j + 1])

        fns = {"bare": bare, "answer_only": answer_only, "full_logits": full_logits}
        if mode in fns:
            seconds = timed(fns[mode], device, args.repeats)
            memory = peak_memory(fns[mode], device)
            return {"seconds_per_doc": seconds / args.docs, "docs_per_s": args.docs / seconds,
                    "tokens_per_s": args.docs * length / seconds, "peak_bytes": memory,
                    "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before}
    candidates = [baseline(m, geometry, length) for m in ("pi", "ntk", "yarn", "critical_ntk")][: args.candidates]
    candidates += [candidates[-1]] * (args.candidates - len(candidates))
    subset = needles.subset(range(args.docs))
    if mode == "batched":
        seconds = timed(lambda: score_candidates(model, subset, candidates), device, args.repeats)
    else:
        seconds = timed(lambda: [score_candidates(model, subset, [c]) for c in candidates], device, args.repeats)
    return {
        "seconds_per_candidate": seconds / len(candidates),
        "candidate_docs_per_s": len(candidates) * args.docs / seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["bare", "answer_only", "full_logits", "batched", "sequential"])
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: one mode in this process
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args, args.mode, args.length)))
        return
    results = {}
    for length in args.lengths:
        results[length] = {}
        for mode in args.modes:
            command = [sys.executable, __file__, "--mode", mode, "--length", str(length)] + [
                a for a in sys.argv[1:] if a != "--out" and a != str(args.out)
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[length][mode] = json.loads(out)
            print(length, mode, results[length][mode], file=sys.stderr)
        row = results[length]
        if "bare" in row and "answer_only" in row:
            row["answer_only_over_bare"] = row["bare"]["docs_per_s"] / row["answer_only"]["docs_per_s"]
        if "answer_only" in row and "full_logits" in row:
            key = "peak_bytes" if row["answer_only"]["peak_bytes"] is not None else "peak_rss_kb"
            row["memory_answer_only_over_full"] = row["answer_only"][key] / max(row["full_logits"][key], 1)
            row["memory_measure"] = key
        if "batched" in row and "sequential" in row:
            row["batched_speedup"] = row["batched"]["candidate_docs_per_s"] / row["sequential"]["candidate_docs_per_s"]
    payload = {"machine": machine(), "model": args.model, "dtype": args.dtype, "docs": args.docs,
               "candidates": args.candidates, "torch": torch.__version__, "results": results}
    emit(payload, args.out)


if __name__ == "__main__":
    main()
