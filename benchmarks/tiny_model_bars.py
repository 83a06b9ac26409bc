"""The bundled model's bars, on a held-out needle set (other haystack and seed than its training):
retrieval at its window L, retrieval at 4L without scaling, and YaRN's needle PPL at 4L.

    python -m benchmarks.tiny_model_bars models/tiny-llama /tmp/regen1 --out benchmarks/results/tiny-model-bars.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fitness.evaluation import baseline_method, evaluate_methods
from fitness.geometry import geometry_from_config
from fitness.models import ModelSettings, load_model, machine_name
from fitness.needles import NeedleSettings

HELD_OUT = NeedleSettings(haystack=["docstrings"], seed=4242, documents=100, depths=[i / 19 for i in range(20)])


def bars(model_dir: str) -> dict:
    model, tokenizer = load_model(ModelSettings(name=model_dir, device="cpu", threads=2))
    geometry = geometry_from_config(model.config)
    window = geometry.original_window
    methods = {name: baseline_method(name, geometry) for name in ("none", "yarn")}
    results = evaluate_methods(model, tokenizer, HELD_OUT, [window, 2 * window, 4 * window], methods, 4, 2,
                               show_progress=False)
    at = lambda name, n: results[name][n * window]  # noqa: E731
    return {
        "retrieval_at_L": at("none", 1)["retrieval"],
        "needle_ppl_at_L": at("none", 1)["needle_ppl"],
        "retrieval_at_2L_none": at("none", 2)["retrieval"],
        "retrieval_at_4L_none": at("none", 4)["retrieval"],
        "needle_ppl_at_4L_none": at("none", 4)["needle_ppl"],
        "needle_ppl_at_4L_yarn": at("yarn", 4)["needle_ppl"],
        "retrieval_at_4L_yarn": at("yarn", 4)["retrieval"],
        "bars": {
            "retrieval_at_L >= 0.95": at("none", 1)["retrieval"] >= 0.95,
            "retrieval_at_4L_none <= 0.20": at("none", 4)["retrieval"] <= 0.20,
            "in-window < yarn@4L < none@4L": at("none", 1)["needle_ppl"]
            < at("yarn", 4)["needle_ppl"]
            < at("none", 4)["needle_ppl"],
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    payload = {"machine": machine_name("cpu"), "held_out": HELD_OUT.model_dump(),
               "models": {m: bars(m) for m in args.models}}
    text = json.dumps(payload, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
