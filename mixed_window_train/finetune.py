"""`ropesearch train CONFIG`: the mixed short/long-window fine-tune that takes the searched factors.

The searched candidate is applied once, for the whole run; per row, the rotary module picks the
long factors for long documents and the short ones (the short stage's searched factors, or the
original frequencies where a candidate has none, with the candidate's attention factor: exactly what
the exported config applies to short inputs) for packed short documents. The result is an HF model directory written through the export path.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fitness.config_io import load_yaml
from fitness.errors import RopeSearchError
from fitness.factors import RopeCandidate, check_geometry
from fitness.geometry import geometry_from_config
from fitness.hf_config import write_longrope_config
from fitness.models import ModelSettings, load_config, load_model, machine_name, save_hf_model
from fitness.general_text import general_windows
from fitness.needles import NeedleSettings, build_needle_set
from fitness.patch import apply_candidates
from mixed_window_train.data import MixedBatches, MixedData
from mixed_window_train.evaluate import compare_exports, format_comparison
from mixed_window_train.trainer import TrainSettings, train


class EvaluationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    needles: NeedleSettings = Field(
        default_factory=lambda: NeedleSettings(haystack=["docstrings"], seed=2000, documents=32)
    )
    short_windows: int = Field(default=16, gt=0, le=4096)  # general-text windows per short length
    # short lengths for general-text perplexity; None: a quarter of the original window and the window itself
    short_lengths: list[int] | None = Field(default=None, min_length=1)


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="mixed", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelSettings = Field(default_factory=ModelSettings)
    factors: str  # a factor file or a search run folder
    data: MixedData = Field(default_factory=MixedData)
    train: TrainSettings
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)


def load_finetune_config(config_path: Path) -> tuple[FinetuneConfig, RopeCandidate]:
    """Validate config, sizes, model, haystacks and factors before anything is written."""
    from fitness.config_io import read_yaml
    from fitness.config_checks import MAX_NAME, MAX_TARGET_WINDOW, check_finite, check_haystacks, check_limits
    from fitness.config_checks import check_model, naming

    source = str(config_path)
    check_finite(read_yaml(config_path), source)
    config = load_yaml(config_path, FinetuneConfig)
    check_limits(config.model_dump(), source)
    if len(config.name) > MAX_NAME:
        raise RopeSearchError(f"{source}: name: longer than {MAX_NAME} characters")
    check_model(config.model, source)
    check_haystacks(config.data.haystack, source, "data.haystack")
    check_haystacks(config.evaluation.needles.haystack, source, "evaluation.needles.haystack")
    with naming(source, "factors"):
        candidate = RopeCandidate.from_source(config.factors)
        check_geometry(candidate, geometry_from_config(load_config(config.model.name)), source=config.factors)
    if candidate.target_window > MAX_TARGET_WINDOW:
        raise RopeSearchError(f"{source}: factors: target window {candidate.target_window} > {MAX_TARGET_WINDOW}")
    return config, candidate


def finetune(config: FinetuneConfig, candidate: RopeCandidate, out_dir: Path, stop_after: int | None = None) -> dict:
    """Train in `out_dir` (resumable), then write `out_dir/model` and `out_dir/evaluation.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(config.model_dump_json(indent=2))
    model, tokenizer = load_model(config.model)
    geometry = geometry_from_config(model.config)
    batches = MixedBatches(tokenizer, config.data, geometry.original_window, candidate.target_window,
                           config.train.batch_size, config.train.seed)  # fmt: skip
    teacher = None
    if config.data.short_loss == "distill":  # the base model, original RoPE, frozen
        teacher, _ = load_model(config.model)
        teacher.requires_grad_(False)
    started = time.time()
    with apply_candidates(model, candidate):
        result = train(model, batches, config.train, out_dir, teacher=teacher, stop_after=stop_after)
    result["seconds"] = time.time() - started
    if result["step"] < config.train.steps:
        return result  # stopped early (a test's simulated crash): resume with the same call

    save_hf_model(model, tokenizer, out_dir / "model")
    write_longrope_config(out_dir / "model", candidate)
    result["machine"] = machine_name(next(model.parameters()).device)
    del model, teacher  # the evaluation loads one exported model at a time

    started = time.time()
    window = geometry.original_window
    lengths = config.evaluation.short_lengths or [window // 4, window]
    windows = {n: general_windows(tokenizer, n, config.evaluation.short_windows) for n in lengths}
    long_needles = build_needle_set(tokenizer, config.evaluation.needles, candidate.target_window)
    window_needles = build_needle_set(tokenizer, config.evaluation.needles, window)
    comparison = compare_exports(config.model, out_dir / "model", candidate, long_needles, window_needles,
                                 windows, out_dir)  # fmt: skip
    result["evaluation_seconds"] = time.time() - started
    result["evaluation"] = comparison
    result["table"] = format_comparison(comparison, candidate.target_window, window)
    tmp = out_dir / "evaluation.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=str))
    os.replace(tmp, out_dir / "evaluation.json")
    return result


def check_out_dir(out_dir: Path, config: FinetuneConfig) -> None:
    """An existing folder is resumed only if it was made by the same config; a file is never one."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise RopeSearchError(f"--out {out_dir}: {existing} is a file, not a folder; choose another --out")
    saved = out_dir / "config.json"
    try:
        same = not saved.exists() or json.loads(saved.read_text()) == json.loads(config.model_dump_json())
    except (ValueError, OSError):
        same = False
    if not same:
        raise RopeSearchError(f"{out_dir} holds a run of another config; choose another --out")
