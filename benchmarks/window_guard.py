"""How much of the short stage's in-window needle guard is signal: each seed's needle PPL against ones
in every (length, format) group, on several draws of the guard's documents.

The guard (search.guard.WindowNeedleSettings) rules a candidate out when its needle PPL in any group
rises more than `max_ppl_increase` above ones' on the same documents. When the same candidate's ratio
to ones moves between draws of those documents by more than the tolerance, a zero tolerance makes the
draw, not the candidate, decide. This scores, for a short-search config, ones and every seed long^p on
`--draws` document seeds and reports per group the ratio to ones on each draw, its spread, and the
violation each seed would get at each tolerance given. A row "no scaling" (attention factor 1 too) shows
what ones itself, through the long stage's attention factor, has already cost inside the window.

    python -m benchmarks.window_guard configs/smollm2-32k-short.yaml --lengths 2048 --set model.device=cpu \
        --set model.dtype=float32 --draws 3 --out benchmarks/results/window-guard-smollm2-2k-cpu.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import yaml

from benchmarks.output import emit
from benchmarks.short_rows import override
from fitness.config_io import read_yaml
from fitness.factor_files import load_factor_file
from search import runs, short_stage
from search.guard import window_needle_violation
from search.workers import TextSetup, TextWorker

NO_SCALING = "no scaling"  # short factors of 1 and attention factor 1: the base model inside its window


def summarize(draws: list[dict], names: list[str], guard, tolerances: list[float]) -> dict:
    """Each seed's needle PPL ratio to ones per group and draw, its spread between draws, its mean over all,
    mean retrieval, and the guard's violation at each tolerance."""
    ones = short_stage.ONES
    groups = list(draws[0]["groups"][ones])
    others = [name for name in names if name != ones]
    ratios = {name: {group: [d["groups"][name][group]["needle_ppl"] / d["groups"][ones][group]["needle_ppl"]
                             for d in draws] for group in groups} for name in others}
    spread = {name: {group: max(r) - min(r) for group, r in by_group.items()} for name, by_group in ratios.items()}
    return {
        "ratio_to_ones": ratios,
        "mean_ratio_to_ones": {name: statistics.mean(r for rs in by_group.values() for r in rs)
                               for name, by_group in ratios.items()},
        "mean_retrieval": {name: statistics.mean(d["groups"][name][group]["retrieval"] for d in draws
                                                 for group in groups) for name in names},
        "ratio_spread_between_draws": spread,
        "median_spread": statistics.median(v for by_group in spread.values() for v in by_group.values()),
        "violation_by_tolerance": {
            name: {f"{tolerance:g}": [window_needle_violation(
                d["groups"][name], d["groups"][ones], guard.model_copy(update={"max_ppl_increase": tolerance}))
                for d in draws] for tolerance in tolerances}
            for name in others
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a search config with long_factors and short_search.needles")
    parser.add_argument("--lengths", type=int, nargs="+", help="in-window needle lengths (default: the config's)")
    parser.add_argument("--draws", type=int, default=3, help="document seeds: the config's, then the next ones")
    parser.add_argument("--documents", type=int, help="guard documents per length (default: the config's)")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.0, 0.02, 0.05])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    data = read_yaml(args.config)
    for assignment in args.set:
        override(data, assignment)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        config = runs.load_search_config(path)
    long = load_factor_file(Path(config.long_factors))
    long = long.model_copy(update={"short_factors": None})
    seeds = {name: candidate for name, (candidate, _) in short_stage.seed_candidates(long, config.short_search).items()}
    # what the model could do before any scaling: the row ones is judged against in the end
    seeds[NO_SCALING] = seeds[short_stage.ONES].model_copy(update={"attention_factor": 1.0})
    window = long.geometry.original_window
    lengths = tuple(args.lengths or short_stage.needle_lengths(config, window))
    guard = config.short_search.needles
    base = short_stage.guard_needles(config)
    if args.documents:
        base = base.model_copy(update={"documents": args.documents})
    names = list(seeds)
    draws = []
    for draw in range(args.draws):
        needles = base.model_copy(update={"seed": base.seed + draw})
        worker = TextWorker(TextSetup(config.model, (min(lengths),), (1,), needles=needles, needle_lengths=lengths,
                                      reference=seeds[short_stage.ONES], guard=guard))
        scored = dict(zip(names, worker._window_needles([seeds[n] for n in names])))
        draws.append({"seed": needles.seed, "groups": scored})
        print(f"draw {draw + 1}/{args.draws} (documents seed {needles.seed}) scored", flush=True)

    summary = summarize(draws, names, guard, args.tolerances)
    emit({
        "benchmark": "window_guard",
        "config": str(args.config),
        "machine": platform.processor() or platform.machine(),
        "device": config.model.device,
        "lengths": list(lengths),
        "documents_per_length": base.documents,
        "formats": base.formats,
        "draws": draws,
        **summary,
    }, args.out)


if __name__ == "__main__":
    main()
