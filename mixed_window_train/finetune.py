"""`ropesearch train CONFIG`: the mixed short/long-window fine-tune that takes the searched factors.

The searched candidate is applied once, for the whole run; per row, the rotary module picks the
long (searched) factors for long documents and the short ones (the original frequencies, with the
candidate's attention factor: exactly what the exported config applies to short inputs) for packed
short documents. The result is an HF model directory written through the export path.
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
from fitness.needles import Haystack, NeedleSettings
from fitness.patch import apply_candidates
from mixed_window_train.data import MixedBatches, MixedData, heldout_windows, split_pieces
from mixed_window_train.evaluate import compare, format_comparison
from mixed_window_train.trainer import TrainSettings, train


class EvaluationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    needles: NeedleSettings = Field(
        default_factory=lambda: NeedleSettings(haystack=["docstrings"], seed=2000, documents=32)
    )
    short_windows: int = Field(default=64, gt=0)  # held-out windows of L tokens for short-context perplexity


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="mixed", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelSettings = Field(default_factory=ModelSettings)
    factors: str  # a factor file or a search run folder
    data: MixedData = Field(default_factory=MixedData)
    train: TrainSettings
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)


def read_factors(spec: str) -> RopeCandidate:
    path = Path(spec)
    return RopeCandidate.load(path / "best_factors.json" if path.is_dir() else path)


def prepare(config_path: Path) -> tuple[FinetuneConfig, RopeCandidate]:
    """Validate config, model and factors before anything is written."""
    config = load_yaml(config_path, FinetuneConfig)
    candidate = read_factors(config.factors)
    check_geometry(candidate, geometry_from_config(load_config(config.model.name)), source=config.factors)
    return config, candidate


def finetune(config: FinetuneConfig, candidate: RopeCandidate, out_dir: Path, stop_after: int | None = None) -> dict:
    """Train in `out_dir` (resumable), then write `out_dir/model` and `out_dir/evaluation.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(config.model_dump_json(indent=2))
    model, tokenizer = load_model(config.model)
    geometry = geometry_from_config(model.config)
    batches = MixedBatches(tokenizer, config.data, geometry.original_window, candidate.target_window,
                           config.train.batch_size, config.train.seed)  # fmt: skip
    started = time.time()
    with apply_candidates(model, candidate):
        result = train(model, batches, config.train, out_dir, stop_after=stop_after)
    result["seconds"] = time.time() - started
    if result["step"] < config.train.steps:
        return result  # stopped early (a test's simulated crash): resume with the same call

    save_hf_model(model, tokenizer, out_dir / "model")
    write_longrope_config(out_dir / "model", candidate)

    base, _ = load_model(config.model)
    held_out = Haystack(tokenizer, config.data.haystack)
    _, heldout_text = split_pieces(held_out.pieces, config.data.holdout_every)
    windows = heldout_windows(heldout_text, geometry.original_window, config.evaluation.short_windows)
    comparison = compare(base, model, tokenizer, candidate, config.evaluation.needles, windows)
    result["machine"] = machine_name(next(model.parameters()).device)
    result["evaluation"] = comparison
    result["table"] = format_comparison(comparison, candidate.target_window, geometry.original_window)
    tmp = out_dir / "evaluation.json.tmp"
    tmp.write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2, default=str))
    os.replace(tmp, out_dir / "evaluation.json")
    return result


def check_out_dir(out_dir: Path, config: FinetuneConfig) -> None:
    """An existing folder is resumed only if it was made by the same config."""
    saved = out_dir / "config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(config.model_dump_json()):
        raise RopeSearchError(f"{out_dir} holds a run of another config; choose another --out")
