"""Run folders: created only from a fully validated config, finished with factors, plots and a
held-out report.

    runs/<name>-<timestamp>/
        config.yaml         the validated config, every default written out (also kept in the study:
                            a resume refuses a config edited since, but for where and how fast it runs)
        study.db            the Optuna study (unless `storage` points elsewhere)
        driver.lock         held by the driver running this folder: a second resume is refused
        best_factors.json   the best candidate so far, rewritten atomically every 10 s and at the end,
                            and only ever by a better one (with `long_factors:`, a copy of them)
        baselines.json      baselines on the search documents: needle_ppl, retrieval, short_cost (older runs
                            say fitness for needle_ppl: search.objective)
        report.json         held-out needle PPL: baselines, searched, the model's own in-window PPL
                            (and, under pruning, the scorings it saved)
        factors.png         the searched factor curve against PI / NTK / YaRN / critical-dim NTK
        fitness.png         needle PPL over evaluations
        best_short_factors.json, short_report.json, short_factors.png, short_fitness.png
                            with a `short_search` section: the second stage (search/short_stage.py),
                            begun once the long stage is finished
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import yaml

from fitness import output
from fitness.config_checks import MAX_TARGET_WINDOW, check_haystacks, model_geometry, naming
from fitness.config_io import load_yaml
from fitness.errors import RopeSearchError
from fitness.factor_files import candidate_from
from fitness.factors import check_geometry
from search import driver, long_stage, short_stage
from search import trial_keys as keys
from search.config import SearchConfig, unresumable_changes
from search.space import RopeSpace
from search.storage import STUDY_DB, EnvironmentFault, check_reachable, check_study_file, open_storage
from search.workers import check_ray_address


def load_search_config(config_path: Path, overrides: dict | None = None) -> SearchConfig:
    """Validate the config and everything it points at, before any file is written. `overrides`:
    dotted keys set from the command line."""
    config = load_yaml(config_path, SearchConfig, overrides, prepare=_target_of_given_factors)
    check_search(config, f"{config_path} with the command line's options" if overrides else str(config_path))
    return config


def _target_of_given_factors(data: dict, source: str) -> None:
    """With `long_factors` and no target, the target is the one the given factors were made for."""
    if data.get("long_factors") and "scale" not in data and "target_window" not in data:
        with naming(source, "long_factors"):
            data["target_window"] = candidate_from(str(data["long_factors"])).target_window


def check_search(config: SearchConfig, source: str) -> None:
    """Everything a search config points at: model, target, space, haystacks, storage, cluster."""
    geometry = model_geometry(config.model, source)
    target = config.target(geometry.original_window)
    if target > MAX_TARGET_WINDOW:
        key = "scale" if config.scale is not None else "target_window"
        raise RopeSearchError(f"{source}: {key}: a target of {target} tokens is beyond {MAX_TARGET_WINDOW}")
    with naming(source, "space"):
        RopeSpace(geometry, target, config.space)
    given = None
    if config.long_factors is not None:
        with naming(source, "long_factors"):
            given = candidate_from(config.long_factors)
            check_geometry(given, geometry, source=config.long_factors)
        if given.target_window != target:
            raise RopeSearchError(f"{source}: long_factors {config.long_factors} were made for {given.target_window} "
                                  f"tokens, the config's target is {target}")
    for k, seed in enumerate(config.sampler.evolution.seed_factors):
        with naming(source, f"sampler.evolution.seed_factors[{k}]"):
            earlier = candidate_from(seed)
            check_geometry(earlier, geometry, source=seed)
        if earlier.target_window > target:
            raise RopeSearchError(f"{source}: sampler.evolution.seed_factors[{k}]: {seed} was made for "
                                  f"{earlier.target_window} tokens, beyond the target {target}; a progressive "
                                  f"start seeds a longer target from a shorter one")
    check_haystacks(config.needles.haystack, source, "needles.haystack")
    check_haystacks(config.holdout.haystack, source, "holdout.haystack")
    if config.short_guard.enabled:  # its text is the search haystack: at least one window of it
        from fitness.general_text import haystack_windows
        from fitness.models import load_tokenizer

        with naming(source, "short_guard (needles.haystack)"):
            haystack_windows(load_tokenizer(config.model.name), config.needles.haystack,
                             config.short_guard.length or geometry.original_window, 1)
    if config.short_search is not None:  # builds documents from those haystacks
        short_stage.check(config, geometry.original_window, source, given)
    check_reachable(config.storage, source)
    if config.workers.backend == "ray":
        with naming(source, "workers.address"):
            check_ray_address(config.workers.address)


def _runs_dir(runs_dir: Path) -> Path:
    if runs_dir.exists() and not runs_dir.is_dir():
        raise RopeSearchError(f"--runs-dir {runs_dir}: is a file, not a folder")
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RopeSearchError(f"--runs-dir {runs_dir}: cannot create it ({err.strerror})") from None
    return runs_dir


def create(config: SearchConfig, runs_dir: Path) -> Path:
    """A new run folder with its config and its (new or shared) study; on any failure, nothing is left."""
    runs_dir = _runs_dir(Path(runs_dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / f"{config.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_dir / f"{config.name}-{stamp}-{suffix}"
    tmp = runs_dir / f".{run_dir.name}.tmp"
    tmp.mkdir()
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        if config.long_factors is not None:  # the long stage's result, given
            candidate_from(config.long_factors).save(tmp / "best_factors.json")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(config.storage, tmp)
        _no_clash(storage, config)
        study = optuna.create_study(storage=storage, study_name=config.name, direction="minimize",
                                    load_if_exists=True)
        attrs = keys.study_system_attrs(study)
        saved = attrs.get(keys.CONFIG)
        if saved is None:
            keys.set_study_system_attr(study, keys.CONFIG, config.model_dump(mode="json"))
        else:  # another driver's study, shared through `storage`: it must be searching the same thing
            _same_search(saved, config, f"storage {config.storage} (study {config.name!r})")
        os.replace(tmp, run_dir)  # the folder appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir


def _no_clash(storage, config: SearchConfig) -> None:
    """In shared storage, a run's short stage is the study `<name>-short`: no other search may be named so,
    and this one may not be named like another run's short stage. Checked before anything is created."""
    names = set(optuna.get_all_study_names(storage))

    def attrs(name: str) -> dict:
        return keys.study_system_attrs(optuna.load_study(study_name=name, storage=storage)) if name in names else {}

    if keys.LONG_CANDIDATE in attrs(config.name):
        raise RopeSearchError(f"storage {config.storage}: the study {config.name!r} is another run's short stage; "
                              "give this search another name")
    if config.short_search is not None and keys.CONFIG in attrs(short_stage.study_name(config)):
        raise RopeSearchError(f"storage {config.storage}: a search named {short_stage.study_name(config)!r} is there, "
                              "the name of this run's short stage; give this search another name")


def _same_search(saved: dict, config: SearchConfig, where: str) -> None:
    """Refuse a config whose search differs from its study's (only RESUMABLE_CHANGES may differ)."""
    changed = unresumable_changes(saved, config.model_dump(mode="json"))
    if changed:
        raise RopeSearchError(f"{where}: {', '.join(changed[:8])} differ from the config the study was created "
                              f"with; put them back (workers, model.threads and budget.minutes may change), or "
                              f"start a new study under another name")


def load(run_dir: Path) -> SearchConfig:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RopeSearchError(f"{run_dir}: not a run folder (no config.yaml)")
    return load_yaml(run_dir / "config.yaml", SearchConfig)


def open_run(run_dir: Path, config: SearchConfig, read_only: bool = False) -> driver.SearchContext:
    """The run's study, which must exist and have been created with this config (but for the keys a
    resume may change); `read_only` writes nothing (status)."""
    run_dir = Path(run_dir)
    if config.storage is None:
        check_study_file(run_dir)
    storage = open_storage(config.storage, run_dir, read_only=read_only)
    try:
        study_id = storage.get_study_id_from_name(config.name)
    except KeyError:
        where = run_dir / STUDY_DB if config.storage is None else config.storage
        raise EnvironmentFault(f"{where} holds no study {config.name!r}: this run's evaluations are gone; `ropesearch "
                               f"search {run_dir / 'config.yaml'}` starts over in a new run folder") from None
    saved = storage.get_study_system_attrs(study_id).get(keys.CONFIG)
    if saved is not None:
        _same_search(saved, config, f"{run_dir / 'config.yaml'} (edited since the run began)")
    return long_stage.open_context(run_dir, config, storage, read_only=read_only)


@contextmanager
def driver_lock(run_dir: Path):
    """One driver per run folder: two resumes of it at once would fight over the same trials."""
    with output.held(Path(run_dir) / "driver.lock", f"{run_dir} is being resumed elsewhere (another driver holds "
                     f"it); wait for it to finish or stop it, then `ropesearch resume {run_dir}`"):
        yield


def run(run_dir: Path, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Both stages, each resumed where it stands: the long one until its budget is spent and its report
    written, then (with `short_search`) the short one. `stop_after` counts this call's evaluations; a stage
    stopped by its clock ends the call there (`summary["stopped"]`)."""
    config = load(run_dir)
    ctx = open_run(Path(run_dir), config)  # reads only: a lost study is refused before anything is written
    with driver_lock(run_dir):
        summary: dict = {}
        if not long_stage.done(run_dir, config):
            summary = driver.run_stage(ctx, long_stage.finish, stop_after=stop_after, quiet=quiet)
            if (pruning := long_stage.pruning_summary(ctx)) is not None:
                summary["pruning"] = pruning
        if config.short_search is not None and long_stage.done(run_dir, config):
            left = None if stop_after is None else stop_after - summary.get("evaluated", 0)
            if left is None or left > 0:
                short = short_stage.open_context(Path(run_dir), config)
                summary["short"] = driver.run_stage(short, short_stage.finish, stop_after=left, quiet=quiet)
        return summary


def status(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    config = load(run_dir)
    resume = f"ropesearch resume {run_dir}"
    if config.long_factors is not None:
        text = f"long factors given: {config.long_factors}"
    else:
        ctx = open_run(run_dir, config, read_only=True)
        text = long_stage.status(ctx)
        if note := driver.stopped_note(ctx, resume):
            text += "\n" + note
    if config.short_search is None:
        return text
    if not long_stage.done(run_dir, config):
        return text + "\nshort factors: begin when the long stage has finished"
    short = short_stage.open_context(run_dir, config, read_only=True)
    if short is None:
        return text + "\nshort factors: not begun"
    text += "\n" + short_stage.status(short)
    if note := driver.stopped_note(short, resume):
        text += "\n" + note
    return text
