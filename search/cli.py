"""The front door: `ropesearch <command> --help` explains each command.

Bad input (a config, a factor file, a model path...) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from fitness.errors import RopeSearchError
from search import interrupts

EPILOG = "Configs are YAML; see configs/ for commented examples. Docs: README.md and docs/."


def _search(args) -> int:
    from search import runs

    overrides = {}
    if args.workers is not None:
        overrides["workers.count"] = args.workers
    if args.address is not None:
        overrides.update({"workers.address": args.address, "workers.backend": "ray"})
    if args.storage is not None:
        overrides["storage"] = args.storage
    if args.seed is not None:
        overrides["sampler.seed"] = args.seed
    if args.local:
        overrides["workers.backend"] = "local"
    config = runs.load_search_config(Path(args.config), overrides)
    run_dir = runs.create(config, Path(args.runs_dir))
    args.run_dir = str(run_dir)  # from here on, a fault's message says how to resume this run
    print(f"run folder: {run_dir}", file=sys.stderr)
    return _run(run_dir, args.stop_after)


def _run(run_dir: Path, stop_after: int | None) -> int:
    from search import driver, report, runs

    summary = runs.run(run_dir, stop_after=stop_after)
    if "evaluated" in summary:  # the long stage ran in this call
        print(f"{summary['evaluated']} evaluations in {summary['seconds']:.0f} s; best factors: "
              f"{run_dir / 'best_factors.json'}")
    if summary.get("pruning"):
        print(report.format_pruning(summary["pruning"]))
    if summary.get("report"):
        print(report.format_report(summary["report"]))
    short = summary.get("short")
    if short:
        print(f"short factors: {short['evaluated']} evaluations in {short['seconds']:.0f} s; "
              f"{run_dir / 'best_short_factors.json'}")
        if short.get("report"):
            print(report.format_short_report(short["report"]))
    stopped = summary.get("stopped") or (short or {}).get("stopped")
    if stopped:  # the last line says why nothing was finished
        print(driver.stop_line(stopped, f"ropesearch resume {run_dir}"))
    return 0


def _resume(args) -> int:

    return _run(Path(args.run_dir), args.stop_after)


def _status(args) -> int:
    from search import runs

    print(runs.status(Path(args.run_dir)))
    return 0


def _eval(args) -> int:
    from fitness import output
    from search.evaluate import eval_output, format_table, load_eval_config, run_eval

    config, candidates = load_eval_config(Path(args.config))
    out = Path(args.out) if args.out else _new_name(Path(args.runs_dir), config.name)
    with output.faults(out, "nothing was written; free some space or choose another --out, then evaluate again"):
        with eval_output(out) as staging:
            payload = run_eval(config, candidates, staging)
    print(format_table(payload["results"], payload.get("short_text"), payload.get("ruler")))
    print(f"written: {out / 'eval.json'}, {out / 'eval.png'}" + (f", {out / 'ruler.png'}" if "ruler" in payload else ""))
    return 0


def _new_name(parent: Path, name: str) -> Path:
    """`parent/name-time`, with a suffix if a folder of that name exists already."""
    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, suffix = parent / stamp, 1
    while path.exists():
        suffix += 1
        path = parent / f"{stamp}-{suffix}"
    return path


def _pretrain(args) -> int:
    from fitness import output
    from mixed_window_train.pretrain import claimed_work_folder, load_recipe, pretrain

    config, work = load_recipe(Path(args.config), seed=args.seed, out=args.out, work_dir=args.work_dir)
    then = f"free some space or make it writable, then run the same command: it resumes from {work}"
    with output.faults(work, then), claimed_work_folder(work, config):
        result = pretrain(config, work)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _export(args) -> int:
    from fitness import output
    from search.export import EXPORTERS, read_source

    candidate = read_source(Path(args.source))
    model = args.model or candidate.params.get("model")
    if args.to in ("hf", "gguf") and not model:
        raise RopeSearchError("--model is needed: the factors do not name the model they were searched on")
    default_out = {"hf": "exported-hf", "gguf": "exported.gguf", "json": "factors.json", "yaml": "factors.yaml"}
    out = Path(args.out or default_out[args.to])
    if not out.parent.is_dir():
        raise RopeSearchError(f"--out {out}: its folder {out.parent} does not exist")
    output.check_destination(out, "--out")
    output.refuse_existing(out, "--out")
    kwargs = (
        {"config_only": args.config_only} if args.to == "hf" else {"static": args.static} if args.to == "gguf" else {}
    )
    with output.faults(out, "nothing was written; free some space or choose another --out, and export again"):
        written = EXPORTERS[args.to](candidate, model, out, **kwargs)
    print(f"written: {written}")
    return 0


def _train(args) -> int:
    from fitness import output
    from mixed_window_train.finetune import claimed_run_folder, finetune, load_finetune_config

    config, candidate = load_finetune_config(Path(args.config))
    out = Path(args.out) if args.out else _new_name(Path(args.runs_dir), config.name)
    output.check_destination(out, "--out")
    args.go_on = f"ropesearch train {args.config} --out {out}"  # what Ctrl-C says resumes it
    then = f"free some space or make {out} writable, then run the same command with --out {out}: it resumes"
    with output.faults(out, then), claimed_run_folder(out, config):
        print(f"training in {out} (run the same command with --out {out} to resume)", file=sys.stderr)
        result = finetune(config, candidate, out, stop_after=args.stop_after)
    if "table" in result:
        print(result["table"])
        print(f"model: {out / 'model'}  evaluation: {out / 'evaluation.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ropesearch",
        description="Extend a pretrained LLM's context window by searching per-dimension RoPE rescale factors "
        "(LongRoPE2), then export them and fine-tune with mixed short/long windows.",
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("search", help="start a search from a config (creates a run folder)",
                            description="Start a search of per-pair RoPE rescale factors: an Optuna study over "
                            "the config's space (space.mode: critical, LongRoPE2's searched critical pair with NTK "
                            "below it; or free, every pair searched, as the bundled model's default config does), "
                            "scored by Ray workers on needle documents at the target length; then (with short_search) "
                            "a second study over the short factors for inputs inside the window, scored on text with "
                            "in-window needles as a constraint. Creates RUNS_DIR/<name>-<time>/; Ctrl-C or a kill "
                            "loses nothing that finished (`ropesearch resume`).",
                            epilog="The config's sections: model, scale | target_window, needles (search documents), "
                            "holdout, space, sampler (evolution, tpe, cmaes, random), pruning (multi-fidelity), "
                            "short_guard, budget, workers, storage, baselines; short_search adds a second stage that "
                            "searches the short factors (inputs inside the window) for the long winner, and "
                            "long_factors runs that stage alone on given factors. configs/default.yaml is a commented "
                            "example; docs/configs.md explains each.")
    p.add_argument("config", help="search config YAML (e.g. configs/default.yaml)")
    p.add_argument("--runs-dir", default="runs", help="where run folders are created (default: runs)")
    p.add_argument("--workers", type=int, help="number of scoring workers (overrides workers.count)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto, ray://host:10001); default: "
                   "$RAY_ADDRESS or a new local cluster")
    p.add_argument("--storage", help="Optuna storage URL or journal file shared by several drivers "
                   "(default: SQLite in the run folder)")
    p.add_argument("--seed", type=int, help="sampler seed (overrides sampler.seed)")
    p.add_argument("--local", action="store_true", help="score in this process instead of Ray workers")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    p.set_defaults(handler=_search)

    p = commands.add_parser("resume", help="continue a search from its run folder",
                            description="Continue a killed or stopped search; finished evaluations are kept.")
    p.add_argument("run_dir", help="a run folder made by `ropesearch search`")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    p.set_defaults(handler=_resume)

    p = commands.add_parser("status", help="progress and best-so-far of a run against the baselines",
                            description="Show a run folder's progress without changing anything: evaluations done "
                            "and running, failures and why, the best candidate so far against the baselines (and "
                            "the seeds of the short stage), a stop by the time budget, and the held-out reports once "
                            "written. Safe while the run is going, and on a read-only folder.")
    p.add_argument("run_dir", help="a run folder made by `ropesearch search`")
    p.set_defaults(handler=_status)

    p = commands.add_parser("eval", help="needle PPL and retrieval vs length for baselines and factor files",
                            description="Evaluate RoPE methods (none, PI, NTK, dynamic NTK, YaRN, critical-dim "
                            "NTK), factor files and model directories (`models:`, e.g. fine-tunes) at multiples of "
                            "the model's window: table, JSON and PNG; with a `ruler:` section, also a RULER-style "
                            "suite scored on what each one generates.")
    p.add_argument("config", help="eval config YAML (e.g. configs/eval-tiny.yaml)")
    p.add_argument("--runs-dir", default="runs", help="parent of the output folder (default: runs)")
    p.add_argument("--out", help="output folder (default: RUNS_DIR/<name>-<time>)")
    p.set_defaults(handler=_eval)

    p = commands.add_parser("export", help="write factors into an HF/vLLM model dir, a GGUF copy, JSON or YAML",
                            description="Export a run's best factors (or a factor file) for inference engines: "
                            "hf = model directory with a longrope config.json (transformers 4.x/5.x, vLLM); "
                            "gguf = copy of a GGUF model with longrope tensors (llama.cpp); json/yaml = the "
                            "candidate with geometry and provenance.")
    p.add_argument("source", help="a run folder or a factor file (.json / .yaml)")
    p.add_argument("--to", required=True, choices=["hf", "gguf", "json", "yaml"], help="export target")
    p.add_argument("--model", help="the model to export into (default: the model the run searched)")
    p.add_argument("--out", help="output path (default: exported-hf/, exported.gguf, factors.json|yaml)")
    p.add_argument("--config-only", action="store_true", help="hf: write config.json only, no weights")
    p.add_argument("--static", action="store_true", help="gguf: one rope_freqs vector at every length")
    p.set_defaults(handler=_export)

    p = commands.add_parser("train", help="mixed short/long-window fine-tune with searched factors",
                            description="Fine-tune a model with packed short documents under the original RoPE and "
                            "long documents under the searched factors, in the same steps; writes an HF model "
                            "directory carrying both factor sets, and a before/after evaluation. Resumable.")
    p.add_argument("config", help="training config YAML (e.g. configs/train-tiny.yaml)")
    p.add_argument("--runs-dir", default="runs", help="parent of the output folder (default: runs)")
    p.add_argument("--out", help="output folder; an existing one of the same config is resumed")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    p.set_defaults(handler=_train)

    p = commands.add_parser("pretrain", help="train the bundled train-short model from its recipe",
                            description="Train a small Llama from scratch at a short window, with a tokenizer "
                            "trained here; resumable (its work folder keeps checkpoints).")
    p.add_argument("config", help="recipe YAML (models/tiny-llama/recipe.yaml)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--out", help="where the finished model goes (overrides `out`)")
    p.add_argument("--work-dir", help="checkpoints and logs (default: <out>.work)")
    p.set_defaults(handler=_pretrain)
    return parser


def fault_message(err: BaseException, run_dir: str | None = None) -> str | None:
    """One line for faults a user can act on (storage locked, disk full, storage unreachable); None otherwise.
    `run_dir`: the run folder it happened to, if one exists, for how to resume it."""
    chain, cause = [], err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " | ".join(f"{type(c).__name__}: {c}" for c in chain).lower()
    errnos = {getattr(c, "errno", None) for c in chain}
    after = f"; nothing finished is lost: `ropesearch resume {run_dir}` continues" if run_dir else ""
    if "database is locked" in text:
        return "the study database is locked by another process (it waited $ROPESEARCH_SQLITE_TIMEOUT s)" + after
    if "disk is full" in text or "no space left" in text or "disk i/o error" in text or errnos & {28, 27}:
        return "the disk of the run folder is full or failing (a write was refused)" + after  # ENOSPC, EFBIG
    if "could not connect" in text or "connection refused" in text or "operationalerror" in text:
        first = next((str(c) for c in chain if type(c).__name__ == "OperationalError"), str(err))
        return f"storage error: {' '.join(first.split())[:300]}" + after
    return None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"ropesearch: warning: {message}", file=sys.stderr)


def _one_line_log() -> None:
    """Events worth a line (a worker restarted, an engine that ignores a key) go to stderr as `ropesearch: ...`."""
    warnings.showwarning = _one_line_warning
    logger = logging.getLogger("ropesearch")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ropesearch: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _one_line_log()
    args = build_parser().parse_args(argv)
    try:
        with interrupts.remembered():
            return args.handler(args)
    except RopeSearchError as err:
        print(f"ropesearch: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Exception as err:  # a fault of the environment (storage, disk): one line, and how to go on
        from fitness.errors import EnvironmentFault

        message = str(err) if isinstance(err, EnvironmentFault) else fault_message(err, getattr(args, "run_dir", None))
        if message is None:
            raise
        print(f"ropesearch: failed: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run_dir = getattr(args, "run_dir", None)
        resumable = run_dir and args.command in ("search", "resume")
        go_on = getattr(args, "go_on", None) or (f"ropesearch resume {run_dir}" if resumable else None)
        print("ropesearch: interrupted" + (f"; `{go_on}` continues it" if go_on else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
