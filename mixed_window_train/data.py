"""Mixed-window training data: short documents packed with their own attention, long documents whole.

A long row is one document of L' (the target) tokens: a needle task or consecutive haystack text,
under the searched (long) factors. A short row holds L' tokens of documents of at most L (the original
window) tokens; their position ids restart at 0 for each document, which is what makes transformers
give each its own causal attention (packed-sequence masking) and what makes the rotary module choose
the original (short) frequencies for them. How a short row is laid out is `short_rows`:
- "target": one row of L' tokens, as a long row (one tensor per micro-batch). Its attention mask is
  [L' x L'] and its attention costs as much as a long row's: affordable at 32k, not at 128k;
- "window": L'/L rows of L tokens, no document crossing one, beside the long rows as a second part of
  the micro-batch (`Batch` list; the loss is normalised over both). The same kind of tokens at L/L' of
  the attention cost, and the frozen teacher only ever runs on short tokens.
Held-out text is a fixed split that training never sees.
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
    short_rows: Literal["target", "window"] = "target"  # see the module's docstring


class MixedBatches:
    """Batch for (step, micro) as a pure function of the seed, so resuming needs only the step."""

    def __init__(self, tokenizer, settings: MixedData, window: int, target: int, batch_size: int, seed: int):
        if settings.short_rows == "window" and target % window:
            raise ValueError(f"data.short_rows: window: the target ({target}) must be a multiple of the "
                             f"model's window ({window}), which cuts each short row into whole rows")
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

    def short_row(self, rng: random.Random, length: int | None = None) -> tuple[list[int], list[int]]:
        length = length or self.target
        ids, positions = [], []
        while len(ids) < length:
            size = min(rng.randint(self.settings.short_min, self.window), length - len(ids))
            ids += self._text(rng, size)
            positions += list(range(size))
        return ids, positions

    def __call__(self, step: int, micro: int) -> Batch | list[Batch]:
        if self.settings.short_rows == "window":
            return self._in_window_rows(step, micro)
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

    def _in_window_rows(self, step: int, micro: int) -> list[Batch]:
        """The long rows as one part, the short ones cut into window-long rows as another."""
        distill = self.settings.short_loss == "distill"
        long_rows, long_weights, short_rows, short_positions = [], [], [], []
        for row in range(self.batch_size):
            rng = random.Random(f"mixed:{self.seed}:{step}:{micro}:{row}")
            if rng.random() < self.settings.long_ratio:
                ids, weight = self.long_row(rng)
                long_rows.append(ids)
                long_weights.append(weight)
            else:
                for _ in range(self.target // self.window):
                    ids, positions = self.short_row(rng, self.window)
                    short_rows.append(ids)
                    short_positions.append(positions)
        parts = []
        if long_rows:
            parts.append(Batch(torch.tensor(long_rows), torch.stack(long_weights),
                               torch.arange(self.target).expand(len(long_rows), -1).clone()))
        if short_rows:
            shape = (len(short_rows), self.window)
            parts.append(Batch(torch.tensor(short_rows), torch.zeros(shape) if distill else torch.ones(shape),
                               torch.tensor(short_positions), torch.ones(shape) if distill else None))
        return parts


def split_pieces(pieces: list[list[int]], every: int) -> tuple[list[list[int]], list[list[int]]]:
    """Runs of 20 consecutive sentences; every n-th run is held out (whole passages, not lone sentences)."""
    train, heldout = [], []
    for start in range(0, len(pieces), 20):
        (heldout if (start // 20) % every == every - 1 else train).extend(pieces[start : start + 20])
    return train, heldout
