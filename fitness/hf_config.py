"""The candidate as Hugging Face config.json keys: the longrope form transformers 4.x and 5.x and vLLM
all read (legacy `rope_scaling` + `rope_theta`; 5.x's own `rope_parameters` is ignored by 4.x).

The attention factor is written twice, once per reader: transformers reads `attention_factor`; vLLM's
longrope ignores that key and reads `short_mscale` / `long_mscale` (falling back to sqrt(1 + ln s / ln L)),
so both carry the same value and every engine scales attention as the candidate was scored."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from fitness.factors import RopeCandidate, attention_factor


def longrope_config_keys(candidate: RopeCandidate, model_type: str) -> dict:
    """The config.json keys that make transformers (4.x, 5.x) and vLLM apply this candidate."""
    g = candidate.geometry
    short = list(candidate.factors(long=False))
    if model_type == "phi3":  # Phi3 on transformers 4.x accepts exactly these three keys
        rope_scaling = {"type": "longrope", "short_factor": short, "long_factor": list(candidate.long_factors)}
    else:
        rope_scaling = {
            "rope_type": "longrope",
            "short_factor": short,
            "long_factor": list(candidate.long_factors),
            "factor": candidate.scale,
            "original_max_position_embeddings": g.original_window,
            "attention_factor": candidate.attention_factor,
            "short_mscale": candidate.attention_factor,  # vLLM's names for the same number
            "long_mscale": candidate.attention_factor,
        }
    return {
        "rope_theta": g.base,
        "rope_scaling": rope_scaling,
        "original_max_position_embeddings": g.original_window,
        "max_position_embeddings": candidate.target_window,
    }


def engine_attention_warnings(candidate: RopeCandidate, model_type: str) -> list[str]:
    """Where an engine computes another attention factor than the one the candidate was scored with."""
    g = candidate.geometry
    implied = attention_factor("longrope", candidate.scale, g.original_window)
    if math.isclose(candidate.attention_factor, implied, rel_tol=1e-6):
        return []
    if model_type != "phi3":  # the mscale keys carry it to vLLM
        return []
    return [
        f"vLLM and transformers (Phi3 form) ignore attention_factor for longrope and use sqrt(1 + ln(s)/ln(L)) = {implied:.6f}, "
        f"not the {candidate.attention_factor:.6f} this candidate was scored with"
    ]


def write_longrope_config(directory: Path, candidate: RopeCandidate, data: dict | None = None) -> Path:
    """Write (or rewrite) `directory/config.json` with the candidate's keys; warn where engines differ."""
    path = Path(directory) / "config.json"
    data = dict(data) if data is not None else json.loads(path.read_text())
    model_type = data.get("model_type", "")
    data.pop("rope_parameters", None)  # 5.x form: would disagree with the legacy keys
    data.update(longrope_config_keys(candidate, model_type))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    for message in engine_attention_warnings(candidate, model_type):
        warnings.warn(message, stacklevel=3)
    return path
