"""Mixed-window training data: short documents packed with their own attention, long documents whole.

Every row has the target length L'. A short row packs several documents of at most L tokens; their
position ids restart at 0 for each document, which is what makes transformers give each its own
causal attention (packed-sequence masking) and what makes the rotary module choose the original
(short) frequencies for them. A long row is one document of L' tokens: a needle task or consecutive
haystack text, under the searched (long) factors. Held-out text is a fixed split that training
never sees.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fitness.needles import Haystack, NeedleSettings, build_document
from mixed_window_train.trainer import Batch


class MixedData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    haystack: list[str] = Field(default_factory=lambda: ["pydoc"])
    long_ratio: float = Field(default=0.5, ge=0, le=1)  # share of rows (= tokens) that are long documents
    long_needle_fraction: float = Field(default=0.75, ge=0, le=1)  # long rows that are needle tasks
    answer_weight: float = Field(default=10.0, gt=0)
    short_min: int = Field(default=64, gt=8)  # short documents are [short_min, L] tokens long
    holdout_every: int = Field(default=10, gt=1)  # every n-th haystack sentence run is held out
    # "lm": short rows learn the text; "distill": short rows match the frozen base model's next-token
    # distribution (original RoPE), so what the model could do inside its window is what it keeps
    short_loss: Literal["lm", "distill"] = "lm"


class MixedBatches:
    """Batch for (step, micro) as a pure function of the seed, so resuming needs only the step."""

    def __init__(self, tokenizer, settings: MixedData, window: int, target: int, batch_size: int, seed: int):
        self.settings, self.window, self.target = settings, window, target
        self.batch_size, self.seed, self.tokenizer = batch_size, seed, tokenizer
        haystack = Haystack(tokenizer, settings.haystack)
        self.train_text, self.heldout_text = split_pieces(haystack.pieces, settings.holdout_every)
        self.haystack = haystack
        haystack.pieces = self.train_text  # needle tasks and long text draw only on the training split
        self.needle_settings = NeedleSettings(haystack=settings.haystack)

    def _text(self, rng: random.Random, length: int) -> list[int]:
        return [t for piece in self.haystack.take(rng.randrange(len(self.haystack.pieces)), length) for t in piece]

    def long_row(self, rng: random.Random) -> tuple[list[int], torch.Tensor]:
        weight = torch.ones(self.target)
        if rng.random() < self.settings.long_needle_fraction:
            ids, answer, _ = build_document(
                self.tokenizer, self.haystack, self.needle_settings, self.target, rng, rng.random()
            )
            weight[answer] = self.settings.answer_weight
            return ids, weight
        return self._text(rng, self.target), weight

    def short_row(self, rng: random.Random) -> tuple[list[int], list[int]]:
        ids, positions = [], []
        while len(ids) < self.target:
            length = min(rng.randint(self.settings.short_min, self.window), self.target - len(ids))
            ids += self._text(rng, length)
            positions += list(range(length))
        return ids, positions

    def __call__(self, step: int, micro: int) -> Batch:
        distill = self.settings.short_loss == "distill"
        rows, weights, positions, distill_weights = [], [], [], []
        for row in range(self.batch_size):
            rng = random.Random(f"mixed:{self.seed}:{step}:{micro}:{row}")
            if rng.random() < self.settings.long_ratio:
                ids, weight = self.long_row(rng)
                rows.append(ids)
                weights.append(weight)
                positions.append(list(range(self.target)))
                distill_weights.append(torch.zeros(self.target))
            else:
                ids, pos = self.short_row(rng)
                rows.append(ids)
                weights.append(torch.zeros(self.target) if distill else torch.ones(self.target))
                positions.append(pos)
                distill_weights.append(torch.ones(self.target) if distill else torch.zeros(self.target))
        return Batch(torch.tensor(rows), torch.stack(weights), torch.tensor(positions),
                     torch.stack(distill_weights) if distill else None)


def split_pieces(pieces: list[list[int]], every: int) -> tuple[list[list[int]], list[list[int]]]:
    """Runs of 20 consecutive sentences; every n-th run is held out (whole passages, not lone sentences)."""
    train, heldout = [], []
    for start in range(0, len(pieces), 20):
        (heldout if (start // 20) % every == every - 1 else train).extend(pieces[start : start + 20])
    return train, heldout
