"""`ropesearch eval CONFIG`: needle PPL and retrieval against length, the RULER-style suite, and the
general-text cost inside the window, for baselines, factor files, method names and model directories."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fitness import output
from fitness.baselines import BASELINES, COMPARED
from fitness.config_checks import (
    MAX_TARGET_WINDOW,
    RunName,
    check_haystacks,
    check_model,
    check_short_lengths,
    model_geometry,
    naming,
)
from fitness.config_io import load_yaml
from fitness.errors import RopeSearchError
from fitness.evaluation import baseline_method, evaluate_methods, fixed_method, per_format, short_text_costs
from fitness.factor_files import factors_from
from fitness.factors import RopeCandidate
from fitness.general_text import GENERAL_ENGLISH, default_short_lengths, perplexity, text_windows
from fitness.geometry import geometry_from_config
from fitness.models import ModelSettings, load_model, load_tokenizer, machine_name
from fitness.needles import NeedleSettings, build_needle_set, tokenizer_fingerprint
from fitness.ruler import RULER_TASKS, RulerResults, RulerSettings, build_suite, evaluate_ruler
from fitness.scoring import score_model
from search.report import format_table_by_format, plot_lengths, plot_ruler, ruler_tables, short_text_table


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: RunName = "eval"
    model: ModelSettings = Field(default_factory=ModelSettings)
    needles: NeedleSettings = Field(default_factory=NeedleSettings)
    multiples: list[Annotated[float, Field(le=512)]] = Field(default_factory=lambda: [1, 2, 4], min_length=1,
                                                            max_length=512)  # of the original window
    # each rebuilt for every evaluated length (YaRN at 2x uses s = 2), as a user would configure it per length
    methods: list[str] = Field(default_factory=lambda: list(COMPARED))
    # label: a factor file, a run folder, or a method name. A method here is the one deployment built for
    # `target_window` (default: the longest evaluated length), the same factors and attention factor at
    # every length (as a fine-tune with `factors: yarn` ships it, or a model card's static YaRN x4),
    # unlike `methods:`, which rebuilds it for each length.
    factors: dict[str, str] = Field(default_factory=dict)
    target_window: int | None = Field(default=None, gt=1)  # what those methods are built for
    candidates_per_forward: int = Field(default=4, gt=0, le=1_024)
    documents_per_forward: int = Field(default=1, gt=0, le=1_024)
    # general English text inside the original window, under each method as deployed for the longest
    # length: what the extension costs short prompts. None: a quarter of the window and the window.
    short_lengths: list[Annotated[int, Field(gt=1)]] | None = Field(default=None, min_length=1)
    short_windows: int = Field(default=8, ge=0, le=4096)  # 0: no short-text evaluation
    # the text of that evaluation (its evaluation part): `kjv`, general English, or the text a model knows
    # (the bundled model: pydoc, its training text; on English it scores noise)
    short_text: list[str] = Field(default_factory=lambda: [GENERAL_ENGLISH], min_length=1, max_length=8)
    # label: a model directory (a fine-tune's `model/`, an export), run as transformers loads it: its own
    # config.json's RoPE, no candidate applied; a row of every table beside the methods
    models: dict[str, str] = Field(default_factory=dict)
    ruler: RulerSettings | None = None  # the RULER-style suite, scored on what each method generates

    @model_validator(mode="after")
    def _known(self) -> EvalConfig:
        unknown = [m for m in self.methods if m not in BASELINES]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list(BASELINES)}")
        if any(m <= 0 for m in self.multiples):
            raise ValueError("multiples must be positive")
        if not self.methods and not self.factors and not self.models:
            raise ValueError("methods, factors and models are all empty: nothing to evaluate")
        return self

    @model_validator(mode="after")
    def _one_row_per_label(self) -> EvalConfig:
        labels = [*self.methods, *self.factors, *self.models]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"{repeated}: a label names one row; methods, factors and models share the table")
        return self


def format_table(results: dict, short_text: dict | None = None, ruler: dict | None = None) -> str:
    lengths = sorted({int(n) for rows in results.values() for n in rows})
    width = max([16, *(len(name) + 2 for name in results)])
    head = f"{'method':<{width}}" + "".join(f"{n:>16}" for n in lengths)
    lines = ["needle PPL (retrieval) by length", head]
    for name, rows in results.items():
        cells = "".join(f"{rows[n]['needle_ppl']:>9.4g} ({rows[n]['retrieval']:>4.0%})" for n in lengths)
        lines.append(f"{name:<{width}}{cells}")
    for n in lengths:  # by needle format, where the documents mix several
        by_format = format_table_by_format({name: rows[n] for name, rows in results.items() if n in rows})
        if by_format:
            lines += [f"needle PPL (retrieval) by format at {n} tokens"] + by_format
    if short_text:
        title = (f"text PPL inside the window (cost vs no scaling): methods built for {lengths[-1]} tokens, "
                 "factors for their own target")
        lines += short_text_table(short_text, title)
    if ruler:
        lines += ruler_tables(ruler)
    return "\n".join(lines)


def load_eval_config(config_path: Path) -> tuple[EvalConfig, dict[str, RopeCandidate]]:
    """The eval config and its factors, validated once before anything runs: finite numbers, the schema,
    sizes, the model's files and geometry, the lengths, the haystacks, every factor file or method."""
    source = str(config_path)
    config = load_yaml(config_path, EvalConfig)
    geometry = model_geometry(config.model, source)
    window = geometry.original_window
    longest = max(int(round(window * m)) for m in config.multiples)
    if not 1 < longest <= MAX_TARGET_WINDOW:
        raise RopeSearchError(f"{source}: multiples: the longest length, {longest} tokens, must lie in "
                              f"[2, {MAX_TARGET_WINDOW}]")
    check_short_lengths(config.short_lengths, window, source, "short_lengths")
    check_haystacks(config.needles.haystack, source, "needles.haystack")
    if known := [t for t in config.short_text if t != GENERAL_ENGLISH]:
        check_haystacks(known, source, "short_text")
    target = config.target_window or max(longest, window)
    if not window <= target <= MAX_TARGET_WINDOW:
        raise RopeSearchError(f"{source}: target_window: {target} must lie in [the model's window {window}, "
                              f"{MAX_TARGET_WINDOW}]")
    candidates = {}
    for label, value in config.factors.items():
        with naming(source, f"factors.{label}"):  # a method: the one deployment for the target
            candidates[label] = factors_from(value, geometry, target if value in BASELINES else None)
    check_models_and_ruler(config, window, source)
    return config, candidates


def ruler_lengths(config: EvalConfig, original_window: int) -> list[int]:
    return [int(round(original_window * m)) for m in config.ruler.multiples or config.multiples]


def check_models_and_ruler(config: EvalConfig, original_window: int, source: str) -> None:
    """Each model directory is a model whose tokenizer is the base model's (every row reads the same
    documents, built once), the RULER haystack reads, and every RULER task fits at its shortest length."""
    tokenizer = load_tokenizer(config.model.name)
    for label, path in config.models.items():
        try:
            check_model(ModelSettings(name=path), source, key=f"models.{label}")
        except RopeSearchError as err:  # check_model names a model section's `name`; here the path is the value
            raise RopeSearchError(str(err).replace(f"models.{label}.name:", f"models.{label}:", 1)) from None
        if tokenizer_fingerprint(load_tokenizer(path)) != tokenizer_fingerprint(tokenizer):
            raise RopeSearchError(
                f"{source}: models.{label}: {path} has another tokenizer than {config.model.name}; "
                "every row reads the same documents"
            )
    if config.ruler is not None:
        check_haystacks(config.ruler.haystack, source, "ruler.haystack")
        shortest = min(ruler_lengths(config, original_window))
        with naming(source, "ruler"):
            build_suite(tokenizer, config.ruler.model_copy(update={"samples": 1}), [shortest])


def evaluate_models(config: EvalConfig, base_model, tokenizer, lengths: list[int], windows: dict, suite) -> dict:
    """Each model directory loaded alone, as transformers runs it: {"results": needle rows, "short_text":
    rows (cost against the base model's own perplexity), "ruler": RulerResults or None}."""
    rows: dict = {"results": {}, "short_text": {}, "ruler": None}
    own = {n: perplexity(base_model, ids) for n, ids in windows.items()}
    for label, path in config.models.items():
        model, _ = load_model(config.model.model_copy(update={"name": path}))
        rows["results"][label] = {}
        for length in lengths:
            needles = build_needle_set(tokenizer, config.needles, length)
            score = score_model(model, needles, config.documents_per_forward)
            row = {"needle_ppl": score.fitness, "retrieval": score.retrieval, "formats": per_format(needles, score)}
            rows["results"][label][length] = row
        if windows:
            ppl = {n: perplexity(model, ids) for n, ids in windows.items()}
            rows["short_text"][label] = {str(n): {"ppl": ppl[n], "cost": ppl[n] / own[n] - 1} for n in windows}
        if suite:
            found = evaluate_ruler(model, tokenizer, suite, {label: None}, config.ruler.samples_per_forward)
            rows["ruler"] = merge_ruler(rows["ruler"], found)
        del model
    return rows


def merge_ruler(first: RulerResults | None, second: RulerResults | None) -> RulerResults | None:
    if first is None or second is None:
        return first or second
    return RulerResults({**first.scores, **second.scores}, {**first.examples, **second.examples},
                        {**first.seconds, **second.seconds})


def ruler_description(settings: RulerSettings) -> dict:
    """What eval.json says about the suite: its settings, and each task's metric and answer budget."""
    tasks = {}
    for name in settings.tasks:
        task = RULER_TASKS[name]
        tasks[name] = {"metric": task.metric, "category": task.category, "max_new_tokens": settings.answer_budget(name)}
    return {**settings.model_dump(), "tasks": tasks}


def eval_output(out: Path):
    """Where the results go, checked before anything runs: never over an earlier evaluation; built under a
    unique hidden name and moved there whole (a failure leaves nothing)."""
    output.check_destination(out, "--out")  # first: a name too long cannot even be looked up
    output.refuse_existing(out, "--out")
    return output.new_output(out, "--out")


def run_eval(config: EvalConfig, candidates: dict[str, RopeCandidate], out_dir: Path) -> dict:
    model, tokenizer = load_model(config.model)
    geometry = geometry_from_config(model.config)
    methods = {name: baseline_method(name, geometry) for name in config.methods}
    methods.update({label: fixed_method(c) for label, c in candidates.items()})
    lengths = [int(round(geometry.original_window * m)) for m in config.multiples]
    ruler_at = ruler_lengths(config, geometry.original_window) if config.ruler else []
    suite = build_suite(tokenizer, config.ruler, ruler_at) if config.ruler else None  # bad lengths fail before any work
    started = time.time()
    results = evaluate_methods(
        model, tokenizer, config.needles, lengths, methods, config.documents_per_forward, config.candidates_per_forward
    )
    short_text, windows = None, {}
    if config.short_windows:
        window = geometry.original_window
        windows = {n: text_windows(tokenizer, config.short_text, n, config.short_windows)
                   for n in config.short_lengths or default_short_lengths(window)}
        short_text = short_text_costs(model, methods, max(lengths), windows, config.candidates_per_forward)
    ruler = evaluate_ruler(model, tokenizer, suite, methods, config.ruler.samples_per_forward) if suite else None
    if config.models:
        rows = evaluate_models(config, model, tokenizer, lengths, windows, suite)
        results.update(rows["results"])
        short_text = {**short_text, **rows["short_text"]} if short_text else None
        ruler = merge_ruler(ruler, rows["ruler"])
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": config.model.name,
        "machine": machine_name(next(model.parameters()).device),
        "dtype": config.model.dtype,
        "original_window": geometry.original_window,
        "documents": config.needles.documents,
        "seconds": time.time() - started,
        "results": results,
        "short_text": short_text,
        "short_text_sources": config.short_text,
        "models": config.models,
    }
    if ruler:
        payload.update(ruler=ruler.scores, ruler_settings=ruler_description(config.ruler), ruler_seconds=ruler.seconds)
        payload["ruler_examples"] = ruler.examples
    (out_dir / "eval.json").write_text(json.dumps(payload, indent=2))
    plot_lengths(results, geometry.original_window, out_dir / "eval.png")
    if ruler:
        plot_ruler(ruler.scores, geometry.original_window, out_dir / "ruler.png")
    return payload
