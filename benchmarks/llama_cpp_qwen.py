"""llama.cpp and a Qwen2 model's GGUF export: does llama.cpp apply the factors, and does it compute what
ropesearch scores? Qwen2.5-Coder-0.5B's Q4_K_M GGUF, a few documents inside its window, per-token NLL over
the whole text (where uniform factors move it by nats, not only at a needle's answer):

- the source GGUF as llama.cpp's qwen2 graph runs it, and the model in transformers (dequantized, float32);
- the export of PI x4 with attention factor 1.2 (short factors = long ones, so either regime applies them):
  in llama.cpp (written as Llama, `search/export.py` LLAMA_CPP_ARCHS) and in ropesearch;
- the same factor tensors in a file that keeps the qwen2 architecture: whether llama.cpp loads it.

    python -m benchmarks.llama_cpp_qwen --out benchmarks/results/llama-cpp-qwen2.5-coder-0.5b-cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.llama_cpp_nll import LlamaCppRefused, llama_answer_nll

ATTENTION = 1.2


def main() -> None:
    import gguf
    import llama_cpp

    from fitness.baselines import baseline
    from fitness.geometry import geometry_from_config
    from fitness.models import load_config, load_model, machine_name, resolve
    from fitness.needles import NeedleSettings, build_needle_set
    from fitness.patch import apply_candidates
    from fitness.scoring import answer_nll
    from search.export import EXPORTERS, LlamaCppArch, _write_gguf, gguf_metadata

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--length", type=int, default=768, help="tokens per document")
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    started = time.time()
    g = geometry_from_config(load_config(args.model))
    directory, gguf_file = resolve(args.model)
    pi = baseline("pi", g, 4 * g.original_window)
    candidate = pi.model_copy(update={"attention_factor": ATTENTION, "short_factors": pi.long_factors})
    model, tokenizer = load_model(args.model)
    needles = build_needle_set(tokenizer, NeedleSettings(documents=args.documents, seed=5), args.length)
    every_token = [torch.arange(1, args.length) for _ in range(args.documents)]
    with torch.no_grad():
        hf_plain = answer_nll(model, needles.input_ids, every_token)[0].tolist()
        with apply_candidates(model, candidate):
            hf_pi = answer_nll(model, needles.input_ids, every_token)[0].tolist()
    del model
    docs = [(needles.input_ids[j].tolist(), list(range(1, args.length))) for j in range(args.documents)]
    context = 4 * g.original_window // 3  # above the window: the long factors (here equal to the short)
    with tempfile.TemporaryDirectory() as scratch:
        exported = EXPORTERS["gguf"](candidate, args.model, Path(scratch) / "pi.gguf")
        written_as = gguf.GGUFReader(exported).get_field(gguf.Keys.General.ARCHITECTURE).contents()
        llama_plain = llama_answer_nll(directory / gguf_file, docs, n_ctx=context).tolist()
        llama_pi = llama_answer_nll(exported, docs, n_ctx=context).tolist()
        reader = gguf.GGUFReader(directory / gguf_file)
        arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
        kept = Path(scratch) / "kept-arch.gguf"
        _write_gguf(reader, arch, LlamaCppArch(arch), gguf_metadata(candidate, arch, static=False), {
            "rope_factors_long.weight": np.asarray(candidate.long_factors, dtype=np.float32),
            "rope_factors_short.weight": np.asarray(candidate.long_factors, dtype=np.float32)}, kept)
        try:
            llama_answer_nll(kept, docs[:1], n_ctx=context)
            kept_arch = "loads"
        except LlamaCppRefused:
            kept_arch = "refused (llama.cpp's log: wrong number of tensors)"
    result = {
        "model": args.model,
        "gguf": gguf_file,
        "architecture": arch,
        "export_written_as": written_as,
        "candidate": f"pi at 4x ({4 * g.original_window}), attention factor {ATTENTION}, short = long factors",
        "tokens_per_document": args.length,
        "metric": "mean NLL over every token of each document",
        "llama_cpp_n_ctx": context,
        "transformers_plain": hf_plain,
        "transformers_candidate": hf_pi,
        "llama_cpp_source": llama_plain,
        "llama_cpp_export": llama_pi,
        "max_abs_diff_source": max(abs(a - b) for a, b in zip(llama_plain, hf_plain)),
        "max_abs_diff_export": max(abs(a - b) for a, b in zip(llama_pi, hf_pi)),
        "factors_move_nll_by": min(abs(a - b) for a, b in zip(hf_pi, hf_plain)),
        "factor_tensors_in_the_qwen2_graph": kept_arch,
        "llama_cpp_python": llama_cpp.__version__,
        "machine": machine_name(),
        "seconds": round(time.time() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
