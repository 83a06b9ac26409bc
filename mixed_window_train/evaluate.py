"""After training: needle PPL at the target length and short-window perplexity on held-out text,
against the base model with no scaling and the base model with the search-only factors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fitness.factors import RopeCandidate, baseline
from fitness.needles import NeedleSettings, build_needle_set
from fitness.patch import apply_candidates
from fitness.scoring import score_candidate


@torch.no_grad()
def window_perplexity(model, windows: torch.Tensor, candidate: RopeCandidate | None, batch: int = 8) -> float:
    """Token-level perplexity over held-out windows (all tokens), optionally under a candidate."""
    device = next(model.parameters()).device
    handle = apply_candidates(model, candidate) if candidate is not None else None
    total, count = 0.0, 0
    try:
        for start in range(0, len(windows), batch):
            ids = windows[start : start + batch].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
    finally:
        if handle is not None:
            handle.restore()
    return math.exp(total / count)


def compare(base, trained, tokenizer, candidate: RopeCandidate, needles: NeedleSettings, windows: torch.Tensor) -> dict:
    """The three models of the result table, on the same held-out documents."""
    long_set = build_needle_set(tokenizer, needles, candidate.target_window)
    rows = {
        "base (no scaling)": (base, baseline("none", candidate.geometry, candidate.target_window)),
        "base + searched factors": (base, candidate),
        "mixed-window trained": (trained, candidate),
    }  # fmt: skip
    result = {}
    for name, (model, rope) in rows.items():
        needle = score_candidate(model, long_set, rope)
        short = window_perplexity(model, windows, rope if name != "base (no scaling)" else None)
        result[name] = {"needle_ppl": needle.fitness, "retrieval": needle.retrieval, "short_ppl": short}
    base_short = result["base (no scaling)"]["short_ppl"]
    for row in result.values():
        row["short_retention"] = base_short / row["short_ppl"]
    return result


def format_comparison(result: dict, target: int, window: int) -> str:
    lines = [
        f"{'':<26}{'needle PPL @' + str(target):>18}{'retrieval':>11}{'short PPL @' + str(window):>16}{'retention':>11}"
    ]
    for name, row in result.items():
        lines.append(f"{name:<26}{row['needle_ppl']:>18.4g}{row['retrieval']:>10.0%}{row['short_ppl']:>16.4f}"
                     f"{row['short_retention']:>10.1%}")  # fmt: skip
    return "\n".join(lines)
