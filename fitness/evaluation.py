"""Needle PPL and retrieval of several RoPE methods at several lengths (`ropesearch eval`, reports,
and the evaluation after training)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from tqdm.auto import tqdm

from fitness.baselines import LENGTH_DEPENDENT, baseline
from fitness.factors import RopeCandidate
from fitness.general_text import candidate_perplexities, perplexity
from fitness.geometry import RopeGeometry
from fitness.needles import NeedleSet, NeedleSettings, build_needle_set
from fitness.scoring import Score, fitness_by_group, score_candidates

# A method is a function of the evaluation length: baselines are rebuilt for each length (YaRN at 2x
# uses s = 2), a searched factor file is the same vector at every length.
Method = Callable[[int], RopeCandidate]


def baseline_method(name: str, geometry: RopeGeometry) -> Method:
    return lambda length: baseline(name, geometry, max(length, geometry.original_window))


def fixed_method(candidate: RopeCandidate) -> Method:
    return lambda length: candidate


def per_format(needles: NeedleSet, score: Score) -> dict[str, dict]:
    """{format: {"needle_ppl", "retrieval", "documents", "document_nll"}}: the same per-document scores,
    grouped by the needle format each document was built with (each document's NLL kept, so two models
    scored on the same documents can be compared document by document)."""
    parts = fitness_by_group(needles.document_formats(), score.document_nll, score.document_exact)
    return {name: {"needle_ppl": part.fitness, "retrieval": part.retrieval, "documents": len(part.document_nll),
                   "document_nll": part.document_nll}
            for name, part in parts.items()}


def evaluate_methods(
    model,
    tokenizer,
    settings: NeedleSettings,
    lengths: list[int],
    methods: Mapping[str, Method],
    documents_per_forward: int = 1,
    candidates_per_forward: int = 8,
    show_progress: bool = True,
) -> dict[str, dict[int, dict]]:
    """{method: {length: {"needle_ppl", "retrieval", "formats": {format: {"needle_ppl", "retrieval",
    "documents"}}}}} on the same documents for every method; the overall numbers are over all documents."""
    results: dict[str, dict[int, dict]] = {name: {} for name in methods}
    total = len(lengths) * len(methods) * settings.documents
    with tqdm(total=total, desc="eval", unit="doc", disable=not show_progress, dynamic_ncols=True) as bar:
        for length in lengths:
            needles = build_needle_set(tokenizer, settings, length)
            names = list(methods)
            for start in range(0, len(names), candidates_per_forward):
                chunk = names[start : start + candidates_per_forward]
                candidates = [methods[name](length) for name in chunk]
                scores = score_candidates(
                    model, needles, candidates, documents_per_forward, on_forward=lambda rows: bar.update(rows)
                )
                for name, score in zip(chunk, scores):
                    results[name][length] = {
                        "needle_ppl": score.fitness,
                        "retrieval": score.retrieval,
                        "formats": per_format(needles, score),
                    }
    return results


def short_text_costs(
    model, methods: Mapping[str, Method], target: int, windows: Mapping[int, torch.Tensor], candidates_per_forward: int = 4
) -> dict[str, dict[str, dict]]:
    """{method: {short length: {"ppl", "cost"}}}: general-text perplexity inside the window under the RoPE a
    user gets by deploying each method for `target` tokens, and its cost against the model's own."""
    results: dict[str, dict[str, dict]] = {name: {} for name in methods}
    for length, ids in windows.items():
        own = perplexity(model, ids)
        names = list(methods)
        for start in range(0, len(names), candidates_per_forward):
            chunk = names[start : start + candidates_per_forward]
            candidates = [methods[n](length if n in LENGTH_DEPENDENT else target) for n in chunk]
            for name, ppl in zip(chunk, candidate_perplexities(model, ids, candidates)):
                results[name][str(length)] = {"ppl": ppl, "cost": ppl / own - 1}
    return results
