"""Which factors vLLM runs for a model's longrope export, by max_model_len, on a real model of any
architecture (the bundled model's case is benchmarks/vllm_answer_nll.py): needle documents inside the
window, scored by ropesearch with the export's short factors and with its long factors, then by vLLM
with max_model_len = L (vLLM's default for longrope) and with max_model_len = the target. Short
documents keep the CPU cost small while still telling the two regimes apart.

    # project environment: the export (critical-dim NTK at 4x, attention factor 1.3, short factors 1 -> 2)
    python -m benchmarks.vllm_regimes prepare /tmp/vq --model qwen2.5-coder-0.5b --length 1024
    # vLLM's environment, one engine per process (vLLM keeps one rotary embedding per RoPE parameters in
    # a process, whatever max_model_len)
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python -m benchmarks.vllm_regimes run /tmp/vq --max-model-len 32768
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python -m benchmarks.vllm_regimes run /tmp/vq --max-model-len 131072
    python -m benchmarks.vllm_regimes report /tmp/vq --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.vllm_answer_nll import ATTENTION, rising_short, vllm_answer_nll

# vLLM and ropesearch both in float32; a regime counts as the one vLLM ran when it is this close
TOLERANCE = 1e-3


def prepare(folder: Path, model_name: str, length: int, documents: int) -> None:
    from fitness.baselines import baseline
    from fitness.geometry import geometry_from_config
    from fitness.models import load_config, load_model, machine_name
    from fitness.needles import NeedleSettings, build_needle_set
    from fitness.scoring import score_candidate
    from search.export import EXPORTERS

    g = geometry_from_config(load_config(model_name))
    target = 4 * g.original_window
    long = baseline("critical_ntk", g, target)
    candidate = long.model_copy(update={"attention_factor": ATTENTION, "short_factors": rising_short(g.pairs)})
    as_long = candidate.model_copy(update={"short_factors": candidate.long_factors})
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    EXPORTERS["hf"](candidate, model_name, folder / "hf")
    model, tokenizer = load_model(model_name)
    settings = NeedleSettings(documents=documents, formats=["key_value", "word"], wordings="all", seed=21)
    needles = build_needle_set(tokenizer, settings, length)
    docs = [{"ids": needles.input_ids[j].tolist(), "answers": needles.answers[j].tolist()} for j in range(documents)]
    (folder / "docs.json").write_text(json.dumps({
        "model": model_name,
        "window": g.original_window,
        "target": target,
        "length": length,
        "docs": docs,
        "short_factors": score_candidate(model, needles, candidate).document_nll,
        "long_factors": score_candidate(model, needles, as_long).document_nll,
        "candidate": f"critical_ntk at 4x, attention factor {ATTENTION}, short factors 1 + sqrt(i / (pairs - 1))",
        "ropesearch_machine": machine_name(),
        "prepare_seconds": round(time.time() - started, 1),
    }))


def run(folder: Path, max_model_len: int) -> None:
    import vllm

    data = json.loads((folder / "docs.json").read_text())
    started = time.time()
    # room for one request of max_model_len tokens, which vLLM requires, in float32 (4 bytes, keys and values)
    config = json.loads((folder / "hf" / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * 4 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim
    nll = vllm_answer_nll(folder / "hf", data["docs"], max_model_len, max(1 << 30, (max_model_len + 1024) * per_token))
    (folder / f"vllm-{max_model_len}.json").write_text(json.dumps({
        "max_model_len": max_model_len, "vllm": nll, "vllm_version": vllm.__version__,
        "seconds": round(time.time() - started, 1)}))


def regime(nll: list[float], data: dict) -> dict:
    diffs = {key: max(abs(a - b) for a, b in zip(nll, data[key])) for key in ("short_factors", "long_factors")}
    ran = [key for key, diff in diffs.items() if diff <= TOLERANCE]
    return {"max_abs_diff": diffs, "ran": ran[0] if len(ran) == 1 else "neither" if not ran else "both"}


def report(folder: Path, out: Path | None) -> None:
    data = json.loads((folder / "docs.json").read_text())
    runs = sorted(folder.glob("vllm-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not runs:
        sys.exit(f"{folder}: no vLLM run yet (run step)")
    result = {key: data[key] for key in ("model", "window", "target", "length", "candidate", "short_factors",
                                         "long_factors", "ropesearch_machine")}
    result["tolerance"] = TOLERANCE
    result["engines"] = []
    for path in runs:
        one = json.loads(path.read_text())
        result["engines"].append({**one, **regime(one["vllm"], data)})
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run", "report"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="prepare: a model alias, directory or GGUF")
    parser.add_argument("--length", type=int, default=1024, help="prepare: tokens per document")
    parser.add_argument("--documents", type=int, default=4, help="prepare: needle documents")
    parser.add_argument("--max-model-len", type=int, help="run: vLLM's max_model_len")
    parser.add_argument("--out", type=Path, help="report: the JSON file to write")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.folder, args.model, args.length, args.documents)
    elif args.step == "run":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        run(args.folder, args.max_model_len or json.loads((args.folder / "docs.json").read_text())["window"])
    else:
        report(args.folder, args.out)


if __name__ == "__main__":
    main()
