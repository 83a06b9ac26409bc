"""What multi-fidelity pruning would have done to a finished search that scored every candidate fully: each
trial's first-stage PPL is recomputed from its own per-document NLLs (the first `--documents` search
documents, as the worker scores them), and the pruner's rule (`search.pruning.EarlierTrialsPruner`:
earlier generations only) is replayed over the trials as they ran. No GPU: it reads the study.

It answers, before a long search is paid for, whether a first stage on a few documents keeps the
candidates that win and what it saves; each setting is also replayed with the pruner blind to the short
guard (the rule before it ranked feasible candidates first), which lost the 64k search's winner. A
replay, not a rerun: pruned candidates stay parents here, so the evolution's path is the unpruned one;
the winners it would have lost are what matters.

    python -m benchmarks.pruning_replay RUN_DIR --documents 3 6 --keep-best 12 24 \
        --out benchmarks/results/h100/smollm2-64k-pruning-replay.json
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
from optuna.trial import TrialState

from benchmarks.output import emit
from search import long_stage, runs
from search.guard import CONSTRAINTS, violation
from search.pruning import EarlierTrialsPruner
from search.slots import slot_of

DOCUMENT_NLL = "document_nll"  # a trial's per-document answer NLLs, in search-document order (search.driver)


def first_stage_ppl(trial, documents: int) -> float:
    return math.exp(float(np.mean(trial.user_attrs[DOCUMENT_NLL][:documents])))


class _Replayed:
    """What the pruner reads of a study: trials whose last intermediate value is their first-stage PPL (and,
    with `guard=False`, no constraints: the rule as it was before it ranked feasible candidates first)."""

    def __init__(self, trials, documents: int, guard: bool = True):
        self.trials = [copy.deepcopy(t) for t in trials]
        for t in self.trials:
            t.intermediate_values = {0: first_stage_ppl(t, documents)}
            if not guard:
                t.system_attrs = {k: v for k, v in t.system_attrs.items() if k != CONSTRAINTS}

    def get_trials(self, deepcopy=False, states=None):
        return self.trials


def spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def replay(trials, documents: int, keep_best: int | None, keep_percentile: float, min_reference: int,
           top: int = 5, guard: bool = True) -> dict:
    study = _Replayed(trials, documents, guard)
    pruner = EarlierTrialsPruner(keep_percentile, min_reference, keep_best)
    pruned = {t.number for t in study.trials if pruner.prune(study, t)}
    total = max(len(t.user_attrs[DOCUMENT_NLL]) for t in trials)
    # the guard's winners among the fully scored (a run that pruned already has first stages only for some)
    ranked = sorted((t for t in trials if violation(t) <= 0 and t.state == TrialState.COMPLETE),
                    key=lambda t: t.values[0])
    return {
        "pruner_sees_the_guard": guard,
        "first_stage_documents": documents,
        "keep_best": keep_best,
        "keep_percentile": None if keep_best else keep_percentile,
        "min_reference": min_reference,
        "pruned": len(pruned),
        "pruned_trials": sorted(pruned),
        "scorings_saved": len(pruned) * (total - documents) / (len(study.trials) * total),
        "winner_pruned": bool(ranked) and ranked[0].number in pruned,
        f"best_{top}_pruned": sum(t.number in pruned for t in ranked[:top]),
        # the best candidate the pruned search could still have found (feasible, not pruned), against the winner
        "best_kept": next((t.values[0] for t in ranked if t.number not in pruned), None),
        "winner": ranked[0].values[0] if ranked else None,
    }


def running_best(trials) -> list[dict]:
    """The best feasible needle PPL found by the end of each generation: how many generations a search
    needed, the other half of its budget."""
    best, rows = math.inf, []
    by_generation: dict[int, list] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE and violation(t) <= 0 and slot_of(t) is not None:
            by_generation.setdefault(slot_of(t)[0], []).append(t.values[0])
    for generation in sorted(by_generation):
        best = min(best, *by_generation[generation])
        rows.append({"generation": generation, "best": best})
    return rows


def replay_run(run_dir: Path, documents: list[int], keep_best: list[int | None], keep_percentile: float,
               min_reference: int) -> dict:
    config = runs.load(run_dir)
    study = long_stage.open_context(run_dir, config, read_only=True).study
    trials = sorted((t for t in study.get_trials(deepcopy=True, states=(TrialState.COMPLETE, TrialState.PRUNED))
                     if DOCUMENT_NLL in t.user_attrs), key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    total = len(complete[0].user_attrs[DOCUMENT_NLL])
    return {
        "run": run_dir.name,
        "evaluations": len(trials),
        "documents": total,
        # how well k documents rank the candidates that all documents rank
        "rank_correlation": {str(k): spearman([first_stage_ppl(t, k) for t in complete], [t.values[0] for t in complete])
                             for k in documents},
        "best_by_generation": running_best(trials),
        # what sets a guard-blind pruner's bar: the lowest needle PPL among candidates over the guard
        "best_over_the_guard": min((t.values[0] for t in complete if violation(t) > 0), default=None),
        "settings": [replay(trials, k, best, keep_percentile, min_reference, guard=guard)
                     for guard in (True, False) for k in documents for best in keep_best],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run folder made by `ropesearch search` (read only)")
    parser.add_argument("--documents", type=int, nargs="+", default=[3, 6], help="first-stage documents to try")
    parser.add_argument("--keep-best", type=int, nargs="+", default=[12, 24],
                        help="keep a candidate only within the best N earlier first-stage PPLs (N values to try)")
    parser.add_argument("--keep-percentile", type=float, default=50.0)
    parser.add_argument("--min-reference", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    emit({"benchmark": "pruning_replay", **replay_run(args.run_dir, args.documents, args.keep_best,
                                                       args.keep_percentile, args.min_reference)}, args.out)


if __name__ == "__main__":
    main()
