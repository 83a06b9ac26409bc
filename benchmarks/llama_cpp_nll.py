"""Answer-token NLL as llama.cpp (llama-cpp-python) computes it, with logits only at the predicting positions:
what tests/test_engines.py and benchmarks/llama_cpp_qwen.py compare with ropesearch's."""

from __future__ import annotations

import os

import llama_cpp
import numpy as np


class LlamaCppRefused(RuntimeError):
    """llama.cpp would not load the file or make the context (its reason is in its log)."""


@llama_cpp.llama_log_callback
def _QUIET(level, text, user_data):  # llama.cpp logs every tensor it loads to stderr
    return None


def llama_answer_nll(path, documents, n_ctx, batch=512):
    """Per document: mean NLL of its answer tokens, as llama.cpp computes them in a context of `n_ctx`
    (the allocated context decides long vs short factors, not the document's length)."""
    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(_QUIET, None)
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise LlamaCppRefused(f"llama.cpp could not load {path}")
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    results = []
    try:
        for ids, answers in documents:
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = cparams.n_ubatch = batch
            cparams.n_threads = cparams.n_threads_batch = max(1, min(2, os.cpu_count() or 1))
            cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_F32
            # the CPU flash-attention kernel rounds through half precision (0.02 NLL off on the tiny
            # model); plain attention in float32 computes what transformers does
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                raise LlamaCppRefused(f"llama.cpp could not create a context of {n_ctx} for {path}")
            wanted = {int(a) - 1 for a in answers}
            nll = []
            chunk = llama_cpp.llama_batch_init(batch, 0, 1)
            try:
                for start in range(0, len(ids), batch):
                    piece = ids[start : start + batch]
                    for k, token in enumerate(piece):
                        chunk.token[k] = int(token)
                        chunk.pos[k] = start + k
                        chunk.n_seq_id[k] = 1
                        chunk.seq_id[k][0] = 0
                        chunk.logits[k] = (start + k) in wanted
                    chunk.n_tokens = len(piece)
                    assert llama_cpp.llama_decode(ctx, chunk) == 0, "llama_decode failed"
                    for k in range(len(piece)):
                        if (start + k) in wanted:
                            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, k), shape=(vocab,))
                            row = row.astype(np.float64)
                            target = int(ids[start + k + 1])
                            nll.append(np.logaddexp.reduce(row) - row[target])
            finally:
                llama_cpp.llama_batch_free(chunk)
                llama_cpp.llama_free(ctx)
            results.append(float(np.mean(nll)))
    finally:
        llama_cpp.llama_model_free(model)
    return np.array(results)
