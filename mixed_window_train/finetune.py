"""`ropesearch train CONFIG`: the mixed short/long-window fine-tune that takes the searched factors, or
a baseline method as engines deploy it (the control the searched factors are compared with).

The candidate is applied once, for the whole run; per row, the rotary module picks the long factors
for long documents and the short ones (the short stage's searched factors, the original frequencies
where a candidate has none, or a deployed method's own factors), with the candidate's attention
factor, for packed short documents: exactly what the exported config applies to short inputs. The
result is an HF model directory written through the export path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from fitness import output
from fitness.config_checks import (
    MAX_SCALE,
    MAX_TARGET_WINDOW,
    RunName,
    check_haystacks,
    check_short_lengths,
    model_geometry,
    naming,
)
from fitness.config_io import load_yaml
from fitness.errors import RopeSearchError
from fitness.factor_files import factors_from
from fitness.factors import RopeCandidate
from fitness.general_text import default_short_lengths, general_windows
from fitness.geometry import geometry_from_config
from fitness.hf_config import write_longrope_config
from fitness.models import ModelSettings, load_config, load_model, machine_name, save_hf_model
from fitness.needles import NeedleSettings, build_needle_set
from fitness.patch import apply_candidates
from mixed_window_train import adapters
from mixed_window_train.data import MixedBatches, MixedData
from mixed_window_train.evaluate import compare_exports, format_comparison
from mixed_window_train.trainer import TrainSettings, train


class EvaluationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    needles: NeedleSettings = Field(
        default_factory=lambda: NeedleSettings(haystack=["docstrings"], seed=2000, documents=32)
    )
    short_windows: int = Field(default=16, gt=0, le=4096)  # general-text windows per short length
    # short lengths for general-text perplexity, inside the original window; None: a quarter of the
    # window and the window itself
    short_lengths: list[Annotated[int, Field(gt=1)]] | None = Field(default=None, min_length=1)


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: RunName = "mixed"
    model: ModelSettings = Field(default_factory=ModelSettings)
    # a factor file, a search run folder, or a method name (yarn, pi, ntk, critical_ntk, ...): the method
    # as engines deploy it for the target, its factors and attention factor at every length
    factors: str = Field(min_length=1)
    # the target: needed with a method name (one of the two); with a factor file, left out or its own
    scale: float | None = Field(default=None, gt=1, le=MAX_SCALE)
    target_window: int | None = Field(default=None, gt=0, le=MAX_TARGET_WINDOW)
    data: MixedData = Field(default_factory=MixedData)
    train: TrainSettings
    # LoRA on the attention (frozen base weights): a checkpoint of a few MB, so a fine-tune longer than one
    # GPU machine's lease can go on on another; None: every weight is trained
    adapter: adapters.AdapterSettings | None = None
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)

    def target(self, original_window: int) -> int | None:
        return self.target_window or (int(round(original_window * self.scale)) if self.scale else None)


def load_finetune_config(config_path: Path) -> tuple[FinetuneConfig, RopeCandidate]:
    """Validate config, sizes, model, haystacks, lengths and factors before anything is written."""
    source = str(config_path)
    config = load_yaml(config_path, FinetuneConfig)
    geometry = model_geometry(config.model, source)
    window = geometry.original_window
    check_haystacks(config.data.haystack, source, "data.haystack")
    check_haystacks(config.evaluation.needles.haystack, source, "evaluation.needles.haystack")
    if config.scale is not None and config.target_window is not None:
        raise RopeSearchError(f"{source}: scale, target_window: give one of them, not both")
    target = config.target(window)
    if target is not None and not window < target <= MAX_TARGET_WINDOW:
        key = "scale" if config.scale is not None else "target_window"
        raise RopeSearchError(f"{source}: {key}: a target of {target} tokens must lie in ({window}, "
                              f"{MAX_TARGET_WINDOW}]: beyond the model's window")
    with naming(source, "factors"):
        candidate = factors_from(config.factors, geometry, target)
    if candidate.target_window > MAX_TARGET_WINDOW:
        raise RopeSearchError(f"{source}: factors: target window {candidate.target_window} > {MAX_TARGET_WINDOW}")
    if config.data.short_min > window:
        raise RopeSearchError(f"{source}: data.short_min: {config.data.short_min} is above the model's window "
                              f"{window}, the most a short document holds")
    if config.data.short_rows == "window" and candidate.target_window % window:
        raise RopeSearchError(f"{source}: data.short_rows: window cuts short rows into rows of the model's window "
                              f"({window}); the target {candidate.target_window} is not a multiple of it")
    check_short_lengths(config.evaluation.short_lengths, window, source, "evaluation.short_lengths")
    if config.adapter is not None:
        missing, linear = adapters.missing_targets(config.adapter, load_config(config.model.name))
        if missing:
            raise RopeSearchError(f"{source}: adapter.targets: {config.model.name} has no linear layer named "
                                  f"{', '.join(missing)} (it has {', '.join(linear)})")
    return config, candidate


def same_config(saved: str, config: FinetuneConfig) -> bool:
    """Whether a run folder's config.json is this config (an older release's, with fewer keys, counts)."""
    return FinetuneConfig.model_validate_json(saved).model_dump() == config.model_dump()


def claimed_run_folder(out_dir: Path, config: FinetuneConfig):
    """The training's folder, new or a run of this config to resume, locked while it trains."""
    return output.claimed_folder(out_dir, "--out", "training", "config.json", config.model_dump_json(indent=2),
                                 lambda saved: same_config(saved, config))


def finetune(config: FinetuneConfig, candidate: RopeCandidate, out_dir: Path, stop_after: int | None = None) -> dict:
    """Train in `out_dir` (resumable; `ropesearch train` claims and locks it first), then write
    `out_dir/model` and `out_dir/evaluation.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = out_dir / "evaluation.json"
    if finished.exists():  # run again after it ended (a timeout at exit): its result, not a second evaluation
        result = json.loads(finished.read_text())
        window = geometry_from_config(load_config(config.model.name)).original_window
        result["table"] = format_comparison(result["evaluation"], candidate.target_window, window)
        return result
    model, tokenizer = load_model(config.model)
    geometry = geometry_from_config(model.config)
    batches = MixedBatches(tokenizer, config.data, geometry.original_window, candidate.target_window,
                           config.train.batch_size, config.train.seed)
    teacher = None
    if config.data.short_loss == "distill":  # the base model, original RoPE, frozen
        teacher, _ = load_model(config.model)
        teacher.requires_grad_(False)
    wrapped = adapters.attach(model, config.adapter, config.train.seed) if config.adapter else None
    with apply_candidates(model, candidate):
        result = train(model, batches, config.train, out_dir, teacher=teacher, stop_after=stop_after)
    if result["step"] < config.train.steps:
        return result  # stopped early (a test's simulated crash): resume with the same call
    if wrapped is not None:
        model = adapters.merged(wrapped)

    with output.rebuilt_folder(out_dir / "model") as staging:
        save_hf_model(model, tokenizer, staging)
        write_longrope_config(staging, candidate)
    result["machine"] = machine_name(next(model.parameters()).device)
    del model, teacher, wrapped  # the evaluation loads one exported model at a time

    started = time.time()
    window = geometry.original_window
    lengths = config.evaluation.short_lengths or default_short_lengths(window)
    windows = {n: general_windows(tokenizer, n, config.evaluation.short_windows) for n in lengths}
    long_needles = build_needle_set(tokenizer, config.evaluation.needles, candidate.target_window)
    window_needles = build_needle_set(tokenizer, config.evaluation.needles, window)
    comparison = compare_exports(config.model, out_dir / "model", candidate, long_needles, window_needles,
                                 windows, out_dir)
    result["evaluation_seconds"] = time.time() - started
    result["evaluation"] = comparison
    result["table"] = format_comparison(comparison, candidate.target_window, window)
    payload = {k: v for k, v in result.items() if k != "table"}
    output.write_atomic(finished, json.dumps(payload, indent=2, default=str))
    return result
