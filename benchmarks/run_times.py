"""Where a run's scoring time went, stage by stage, when it ran in pieces (GPU calls of at most 10 minutes,
each resuming the run folder the last one left): each stretch of finished evaluations with no pause longer
than `--gap` seconds is one piece, with its evaluations and seconds; the pieces add up to the stage's.

Times come from the study's own trial records (start and completion), so a run resumed on other machines
still adds up. The time from the long stage's last evaluation to the short stage's first is the long
stage's held-out report plus the short stage's start.

    python -m benchmarks.run_times RUN_DIR --out benchmarks/results/h100/smollm2-64k-run-times.json
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import TrialState

from benchmarks.output import emit
from search import long_stage, runs, short_stage
from search.storage import open_storage


def scoring_pieces(trials, gap_seconds: float) -> list[dict]:
    """Finished trials, in the order they finished, cut wherever one finished more than `gap_seconds`
    after the one before."""
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    pieces: list[list] = []
    for trial in done:
        if not pieces or (trial.datetime_complete - pieces[-1][-1].datetime_complete).total_seconds() > gap_seconds:
            pieces.append([])
        pieces[-1].append(trial)
    return [{"evaluations": len(piece), "start": piece[0].datetime_start.isoformat(),
             "end": piece[-1].datetime_complete.isoformat(),
             "seconds": (piece[-1].datetime_complete - piece[0].datetime_start).total_seconds()} for piece in pieces]


def stage_times(study, gap_seconds: float) -> dict:
    pieces = scoring_pieces(study.get_trials(deepcopy=False), gap_seconds)
    seconds = sum(p["seconds"] for p in pieces)
    evaluations = sum(p["evaluations"] for p in pieces)
    return {"study": study.study_name, "evaluations": evaluations, "seconds": seconds,
            "seconds_per_evaluation": seconds / evaluations if evaluations else None, "pieces": pieces}


def run_times(run_dir: Path, gap_seconds: float) -> dict:
    config = runs.load(run_dir)
    stages = {"long": stage_times(long_stage.open_context(run_dir, config, read_only=True).study, gap_seconds)}
    storage = open_storage(config.storage, run_dir, read_only=True)
    name = short_stage.study_name(config)
    if config.short_search is not None and name in {s.study_name for s in storage.get_all_studies()}:
        stages["short"] = stage_times(optuna.load_study(study_name=name, storage=storage), gap_seconds)
    if stages.get("short", {}).get("pieces") and stages["long"]["pieces"]:
        long_end, short_start = stages["long"]["pieces"][-1]["end"], stages["short"]["pieces"][0]["start"]
        stages["report_and_short_start_seconds"] = (datetime.fromisoformat(short_start)
                                                    - datetime.fromisoformat(long_end)).total_seconds()
    return {"run": run_dir.name, "gap_seconds": gap_seconds, **stages,
            "scoring_seconds": sum(s["seconds"] for s in stages.values() if isinstance(s, dict))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder made by `ropesearch search` (read only)")
    parser.add_argument("--gap", type=float, default=120.0,
                        help="a pause longer than this (seconds) between finished evaluations starts a new piece")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    emit({"benchmark": "run_times", **run_times(args.run_dir, args.gap)}, args.out)


if __name__ == "__main__":
    main()
