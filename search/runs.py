"""Run folders: created only from a fully validated config, finished with factors, plots and a
held-out report.

    runs/<name>-<timestamp>/
        config.yaml         the validated config, every default written out
        study.db            the Optuna study (unless `storage` points elsewhere)
        best_factors.json   the best candidate so far, rewritten atomically every 10 s and at the end
        baselines.json      baselines on the search documents
        report.json         held-out needle PPL: baselines, searched, the model's own in-window PPL
                            (and, under pruning, the scorings it saved)
        factors.png         the searched factor curve against PI / NTK / YaRN / critical-dim NTK
        fitness.png         needle PPL over evaluations
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import yaml

from fitness.config_io import load_yaml, validate
from fitness.errors import RopeSearchError
from fitness.evaluation import baseline_method, evaluate_methods, fixed_method
from fitness.geometry import geometry_from_config
from fitness.models import load_config, load_model, machine_name
from fitness.needles import haystack_texts
from search import driver, report
from search.config import SearchConfig
from search.pruning import saved_scorings
from search.space import RopeSpace
from search.storage import open_storage


def prepare(config_path: Path, overrides: dict | None = None) -> SearchConfig:
    """Validate the config and everything it points at, before any file is written."""
    config = load_yaml(config_path, SearchConfig)
    if overrides:
        data = config.model_dump()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        config = validate(data, SearchConfig, str(config_path))
    geometry = geometry_from_config(load_config(config.model.name))
    RopeSpace(geometry, config.target(geometry.original_window), config.space)
    for needles in (config.needles, config.holdout):
        haystack_texts(needles.haystack)
    return config


def create(config: SearchConfig, runs_dir: Path) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / f"{config.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_dir / f"{config.name}-{stamp}-{suffix}"
    tmp = runs_dir / f".{run_dir.name}.tmp"
    tmp.mkdir()
    (tmp / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    try:
        open_storage(config.storage, tmp)  # the study database (or the connection to it) exists before the folder
    except RopeSearchError:
        shutil.rmtree(tmp)
        raise
    os.replace(tmp, run_dir)  # the folder appears whole or not at all
    return run_dir


def load(run_dir: Path) -> SearchConfig:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RopeSearchError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_yaml(run_dir / "config.yaml", SearchConfig)


def holdout_report(ctx: driver.SearchContext, candidate) -> dict:
    """Baselines and the searched candidate on the held-out needle set, in this process."""
    config = ctx.config
    model, tokenizer = load_model(config.model)
    methods = {name: baseline_method(name, ctx.geometry) for name in config.baselines}
    methods["searched"] = fixed_method(candidate)
    k = config.workers.candidates_per_forward
    dpf = config.workers.documents_per_forward
    scored = evaluate_methods(model, tokenizer, config.holdout, [ctx.target], methods, dpf, k, show_progress=False)
    own = evaluate_methods(
        model, tokenizer, config.holdout, [ctx.geometry.original_window],
        {"none": baseline_method("none", ctx.geometry)}, dpf, k, show_progress=False,
    )  # fmt: skip
    return {
        "machine": machine_name(next(model.parameters()).device),
        "length": ctx.target,
        "original_window": ctx.geometry.original_window,
        "documents": config.holdout.documents,
        "haystack": config.holdout.haystack,
        "seed": config.holdout.seed,
        "methods": {name: rows[ctx.target] for name, rows in scored.items()},
        "in_window": own["none"][ctx.geometry.original_window]["needle_ppl"],
    }


def finish(ctx: driver.SearchContext) -> dict | None:
    """best_factors.json, plots, and the held-out report; returns the report."""
    candidate = driver.write_best(ctx)
    baselines = ctx.study.user_attrs.get("baselines", {})
    (ctx.run_dir / "baselines.json").write_text(json.dumps(baselines, indent=2))
    if candidate is None:
        return None
    report.plot_factors(candidate, ctx.geometry, ctx.target, ctx.run_dir / "factors.png")
    report.plot_fitness(ctx.study, baselines, ctx.run_dir / "fitness.png")
    result = holdout_report(ctx, candidate)
    result["summary"] = report.gap_closed(result)
    if ctx.config.pruning.name != "none":
        result["pruning"] = saved_scorings(ctx.study, ctx.config.pruning, ctx.config.needles.documents)
    (ctx.run_dir / "report.json").write_text(json.dumps(result, indent=2))
    return result


def run(run_dir: Path, stop_after: int | None = None, quiet: bool = False) -> dict:
    config = load(run_dir)
    ctx = driver.open_context(Path(run_dir), config)
    summary = driver.search(ctx, stop_after=stop_after, quiet=quiet)
    if config.pruning.name != "none":
        summary["pruning"] = saved_scorings(ctx.study, config.pruning, config.needles.documents)
    if stop_after is None or driver.completed(ctx) >= (driver.total_budget(ctx) or 0):
        summary["report"] = finish(ctx)
    else:
        driver.write_best(ctx)
    return summary


def status(run_dir: Path) -> str:
    config = load(run_dir)
    ctx = driver.open_context(Path(run_dir), config)
    state = ctx.sampler.state(ctx.study) if ctx.evolutionary else None
    text = report.format_status(ctx.study, ctx.study.user_attrs.get("baselines", {}), driver.total_budget(ctx), state)
    if config.pruning.name != "none":
        text += "\n" + report.format_pruning(saved_scorings(ctx.study, config.pruning, config.needles.documents))
    if (Path(run_dir) / "report.json").exists():
        text += "\n" + report.format_report(json.loads((Path(run_dir) / "report.json").read_text()))
    return text
