"""After training: each model as plain transformers loads it from its exported directory — the base
model, the base model with the searched factors, the fine-tuned model — one at a time on the device,
scored on needles at the target length and on general text at short lengths.

Nothing here applies a candidate by hand: the exported config.json is what makes transformers use
the factors (and the attention factor, which it applies at every length), so the short-window
numbers are what a user of the exported model gets.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import torch

from fitness.evaluation import per_format
from fitness.factors import RopeCandidate
from fitness.general_text import perplexity
from fitness.hf_config import write_longrope_config
from fitness.models import ModelSettings, load_model, save_hf_model
from fitness.needles import NeedleSet
from fitness.scoring import score_model

BASE, BASE_FACTORS, TRAINED = "base (no scaling)", "base + searched factors", "mixed-window trained"


def export_base_with_factors(base: ModelSettings, candidate: RopeCandidate, out: Path) -> Path:
    """The base model's weights with the candidate's config: what `ropesearch export --to hf` writes."""
    model, tokenizer = load_model(base.model_copy(update={"device": "cpu", "dtype": "float32"}))
    save_hf_model(model, tokenizer, out)
    write_longrope_config(out, candidate)
    return out


def _release(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _needles(model, needles: NeedleSet) -> dict:
    """Needle PPL and retrieval over all documents and per needle format (the held-out formats compared)."""
    score = score_model(model, needles)
    return {"needle_ppl": score.fitness, "retrieval": score.retrieval, "formats": per_format(needles, score)}


def score_exported(
    settings: ModelSettings, long_needles: NeedleSet, window_needles: NeedleSet, windows: dict[int, torch.Tensor]
) -> dict:
    """Needle PPL/retrieval at the target length and at the original window, overall and per format, and
    general-text perplexity at each short length, for one model directory, loaded alone."""
    on_gpu = torch.cuda.is_available() and settings.resolved_device().startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()  # this model's peak, not the training's
    model, _ = load_model(settings)
    try:
        row = _needles(model, long_needles)
        inside = _needles(model, window_needles)
        row.update({f"{key}_in_window": value for key, value in inside.items()})
        row["short_ppl"] = {str(length): perplexity(model, ids) for length, ids in windows.items()}
        if on_gpu:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return row
    finally:
        _release(model)


def compare_exports(
    base: ModelSettings,
    trained_dir: Path,
    candidate: RopeCandidate,
    long_needles: NeedleSet,
    window_needles: NeedleSet,
    windows: dict[int, torch.Tensor],
    work_dir: Path,
) -> dict:
    """The three rows of the result table, on the same held-out needles and general text."""
    device = base.resolved_device()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    scratch = Path(tempfile.mkdtemp(prefix=".base-with-factors.", suffix=".tmp", dir=work_dir))
    try:
        base_factors_dir = export_base_with_factors(base, candidate, scratch)
        rows = {
            BASE: base.model_copy(update={"dtype": dtype}),
            BASE_FACTORS: ModelSettings(name=str(base_factors_dir), dtype=dtype, device=device),
            TRAINED: ModelSettings(name=str(trained_dir), dtype=dtype, device=device),
        }
        result = {name: score_exported(settings, long_needles, window_needles, windows)
                  for name, settings in rows.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base_short = result[BASE]["short_ppl"]
    for row in result.values():
        row["short_cost"] = {n: row["short_ppl"][n] / base_short[n] - 1 for n in base_short}
    return result


def format_comparison(result: dict, target: int, window: int) -> str:
    lengths = list(result[BASE]["short_ppl"])
    head = f"{'':<26}{'needle PPL @' + str(target):>18}{'retrieval':>11}"
    head += "".join(f"{'text PPL @' + n:>20}" for n in lengths)
    lines = [head]
    for name, row in result.items():
        line = f"{name:<26}{row['needle_ppl']:>18.4g}{row['retrieval']:>10.0%}"
        line += "".join(f"{row['short_ppl'][n]:>11.5g} ({row['short_cost'][n]:+6.1%})" for n in lengths)
        lines.append(line)
    lines.append(f"(base model's own needle PPL @{window}: {result[BASE]['needle_ppl_in_window']:.4g}; "
                 "text: general English the project never trains or searches on)")
    formats = list(result[BASE]["formats"])
    if len(formats) > 1:
        for key, length in (("formats", target), ("formats_in_window", window)):
            lines.append(f"needle PPL (retrieval) by format @{length}")
            lines.append(f"{'':<26}" + "".join(f"{name:>20}" for name in formats))
            for name, row in result.items():
                cells = [row[key][f] for f in formats]
                lines.append(f"{name:<26}" + "".join(f"{c['needle_ppl']:>13.4g} ({c['retrieval']:>4.0%})"
                                                     for c in cells))
    return "\n".join(lines)
