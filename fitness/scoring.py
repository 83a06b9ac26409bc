"""Needle-driven perplexity: NLL on the answer tokens only, logits only where they are predicted.

The hot path of the search. A forward never materializes the length x vocab logits: transformers'
`logits_to_keep` (a tensor of positions) runs the LM head on the answer positions alone. K candidates
share one forward as K batch rows, each with its own rotary cos/sin (`fitness.patch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fitness.factors import RopeCandidate
from fitness.needles import NeedleSet
from fitness.patch import apply_candidates


@dataclass
class Score:
    """Fitness of one candidate on a needle set."""

    fitness: float  # exp(mean over documents of the mean answer-token NLL); lower is better
    retrieval: float  # fraction of documents whose every answer token is the argmax (teacher-forced)
    document_nll: list[float]
    document_exact: list[bool]

    def to_dict(self) -> dict:
        return asdict(self)


def _predicting_positions(answers: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The union of positions whose logits predict an answer token, and each document's index into it."""
    union = torch.unique(torch.cat([a - 1 for a in answers]))
    index = [torch.searchsorted(union, a - 1) for a in answers]
    return union, index


@torch.no_grad()
def answer_nll(model, input_ids: torch.Tensor, answers: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: mean NLL over its answer tokens, and whether all were predicted exactly.

    `answers[b]` holds row b's answer positions. Logits are computed at those positions only.
    """
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    union, index = _predicting_positions(answers)
    out = model(input_ids=input_ids, logits_to_keep=union.to(device), use_cache=False)
    logits = out.logits.float()  # [B, len(union), vocab]
    nll, exact = [], []
    for b, (positions, where) in enumerate(zip(answers, index)):
        row = logits[b, where.to(device)]
        targets = input_ids[b, positions.to(device)]
        nll.append(F.cross_entropy(row, targets))
        exact.append(torch.equal(row.argmax(-1), targets))
    return torch.stack(nll).cpu(), torch.tensor(exact)


@torch.no_grad()
def full_logits_nll(model, input_ids: torch.Tensor, answers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reference path: all logits, then NLL at the answer positions. Used by tests and benchmarks."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits.float()
    labels = torch.full(input_ids.shape, -100, dtype=torch.long)
    for b, positions in enumerate(answers):
        labels[b, positions] = input_ids[b, positions]
    labels = labels.to(device)
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    counts = (labels[:, 1:] != -100).sum(1)
    return (per_token.sum(1) / counts).cpu()


def fitness_of(document_nll: Sequence[float], exact: Sequence[bool]) -> Score:
    nll = list(map(float, document_nll))
    mean = sum(nll) / len(nll)
    return Score(
        fitness=math.exp(mean) if mean < 700 else math.inf,
        retrieval=sum(map(bool, exact)) / len(exact),
        document_nll=nll,
        document_exact=list(map(bool, exact)),
    )


def fitness_by_group(groups: Sequence[str], document_nll: Sequence[float], exact: Sequence[bool]) -> dict[str, Score]:
    """The score over the documents of each group (e.g. each needle format), in first-seen order."""
    members: dict[str, list[int]] = {}
    for j, name in enumerate(groups):
        members.setdefault(name, []).append(j)
    return {name: fitness_of([document_nll[j] for j in docs], [exact[j] for j in docs])
            for name, docs in members.items()}


def score_candidates(
    model,
    needles: NeedleSet,
    candidates: Sequence[RopeCandidate],
    documents_per_forward: int = 1,
    on_forward: Callable[[int], None] | None = None,
) -> list[Score]:
    """Score K candidates on every document; each forward holds `documents_per_forward` documents x K
    candidates as rows. `on_forward(n_rows)` is called after each forward (progress bars)."""
    k = len(candidates)
    nll = torch.zeros(k, len(needles))
    exact = torch.zeros(k, len(needles), dtype=torch.bool)
    with apply_candidates(model, candidates):
        for start in range(0, len(needles), documents_per_forward):
            docs = list(range(start, min(start + documents_per_forward, len(needles))))
            ids = needles.input_ids[docs].repeat_interleave(k, dim=0)  # row = doc * k + candidate
            answers = [needles.answers[d] for d in docs for _ in range(k)]
            row_nll, row_exact = answer_nll(model, ids, answers)
            nll[:, docs] = row_nll.view(len(docs), k).T
            exact[:, docs] = row_exact.view(len(docs), k).T
            if on_forward:
                on_forward(len(docs) * k)
    return [fitness_of(nll[c].tolist(), exact[c].tolist()) for c in range(k)]


def score_candidate(model, needles: NeedleSet, candidate: RopeCandidate, **kwargs) -> Score:
    return score_candidates(model, needles, [candidate], **kwargs)[0]


def score_model(model, needles: NeedleSet, documents_per_forward: int = 1) -> Score:
    """The model as it stands (its own config's RoPE, no candidate applied): an exported model."""
    nll, exact = [], []
    for start in range(0, len(needles), documents_per_forward):
        docs = list(range(start, min(start + documents_per_forward, len(needles))))
        row_nll, row_exact = answer_nll(model, needles.input_ids[docs], [needles.answers[d] for d in docs])
        nll += row_nll.tolist()
        exact += row_exact.tolist()
    return fitness_of(nll, exact)
