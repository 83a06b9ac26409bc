"""Does a fine-tune with LoRA adapters (`adapter:`, whose few-MB checkpoint can travel between GPU machines)
do what the full fine-tune does? One training config run several ways, the same data, steps and seed: every
weight trained; adapters at each `--lr-scale` times the config's learning rate (adapters start from zero
and usually want a larger one), with `--with-norms` also with the norms trained. The summary gives, per variant, the held-out needle PPL and
retrieval at the target and inside the window, general-text cost, seconds, and the checkpoint's size.

    python -m benchmarks.adapter_vs_full configs/train-tiny.yaml --work runs/adapter-vs-full \\
        --lr-scale 1 3 10 --with-norms --out benchmarks/results/tiny-adapter-vs-full-cpu.json

A variant whose folder already holds evaluation.json is read, not run again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.output import emit
from mixed_window_train.adapters import AdapterSettings
from mixed_window_train.finetune import claimed_run_folder, finetune, load_finetune_config

TRAINED = "mixed-window trained"


def variants(config, lr_scales: list[float], with_norms: bool = False) -> dict:
    """`full`, then `adapter-lr-xS` for each scale S (the adapters' defaults), and with `with_norms` also
    `adapter-lr-xS-norms` (the RMSNorm gains trained too)."""
    rows = {"full": config}
    for scale in lr_scales:
        train = config.train.model_copy(update={"lr": config.train.lr * scale, "min_lr": config.train.min_lr * scale})
        rows[f"adapter-lr-x{scale:g}"] = config.model_copy(update={"adapter": AdapterSettings(), "train": train})
        if with_norms:
            rows[f"adapter-lr-x{scale:g}-norms"] = config.model_copy(
                update={"adapter": AdapterSettings(norms=True), "train": train})
    return rows


def summary(evaluation: dict, out_dir: Path) -> dict:
    trained = evaluation["evaluation"][TRAINED]
    checkpoints = sorted((out_dir / "checkpoints").glob("step_*.pt"))
    return {
        "needle_ppl": trained["needle_ppl"], "retrieval": trained["retrieval"],
        "needle_ppl_in_window": trained["needle_ppl_in_window"], "retrieval_in_window": trained["retrieval_in_window"],
        "short_cost": trained["short_cost"], "train_seconds": evaluation["seconds"],
        "checkpoint_bytes": checkpoints[-1].stat().st_size if checkpoints else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a `ropesearch train` config (full fine-tune, no adapter)")
    parser.add_argument("--work", type=Path, required=True, help="a folder for the trainings, one subfolder each")
    parser.add_argument("--lr-scale", type=float, nargs="+", default=[1.0, 10.0],
                        help="adapters are trained at each of these multiples of the config's lr")
    parser.add_argument("--with-norms", action="store_true",
                        help="also each adapter run with the RMSNorm gains trained (adapter.norms: true)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config, candidate = load_finetune_config(args.config)
    rows, before = {}, None
    for name, variant in variants(config, args.lr_scale, args.with_norms).items():
        out_dir = args.work / name
        with claimed_run_folder(out_dir, variant):
            finetune(variant, candidate, out_dir)  # a finished variant's folder gives its result back
        evaluation = json.loads((out_dir / "evaluation.json").read_text())
        before = before or {key: value for key, value in evaluation["evaluation"].items() if key != TRAINED}
        rows[name] = {"lr": float(f"{variant.train.lr:.6g}"), "adapter": variant.adapter and variant.adapter.model_dump(),
                      **summary(evaluation, out_dir)}
    emit({"benchmark": "adapter_vs_full", "config": str(args.config), "steps": config.train.steps,
          "target_window": candidate.target_window, "machine": evaluation.get("machine"),
          "before_fine_tune": {name: {k: row[k] for k in ("needle_ppl", "retrieval", "needle_ppl_in_window",
                                                         "retrieval_in_window", "short_cost")}
                               for name, row in before.items()},
          "variants": rows}, args.out)


if __name__ == "__main__":
    main()
