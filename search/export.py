"""Export a candidate into what inference engines load: a registry of exporters, one function each.

hf    a Hugging Face model directory whose config.json carries the longrope form that transformers
      4.x and 5.x and vLLM all read (legacy `rope_scaling` + `rope_theta`)
gguf  a copy of a GGUF model with longrope factor tensors and keys, for llama.cpp
json  the candidate with its geometry and provenance
yaml  the same, as YAML

Every exporter writes beside its target and renames at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import yaml

from fitness.errors import RopeSearchError
from fitness.factors import RopeCandidate, check_geometry
from fitness.geometry import geometry_from_config
from fitness.hf_config import write_longrope_config
from fitness.models import load_config, load_model, resolve

EXPORTERS: dict[str, Callable[..., Path]] = {}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".py", ".jinja")


def register_exporter(name: str):
    def decorate(fn):
        EXPORTERS[name] = fn
        return fn

    return decorate


def _checked(candidate: RopeCandidate, model: str):
    config = load_config(model)
    check_geometry(candidate, geometry_from_config(config), source="factors")
    return config


def _written(tmp: Path, out: Path) -> Path:
    """Move a finished export into place; a directory left from an earlier export is replaced whole."""
    if out.is_dir() and tmp.is_dir():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _scratch(out: Path) -> Path:
    """Where an export is built before it is renamed to `out` (same folder, so the rename is atomic)."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


@register_exporter("hf")
def export_hf(candidate: RopeCandidate, model: str, out: Path, config_only: bool = False) -> Path:
    """A model directory: weights linked (HF source) or written (GGUF source), config with the factors."""
    source_config = _checked(candidate, model)
    directory, gguf_file = resolve(model)
    final, out = out, _scratch(out)
    out.mkdir()
    try:
        _fill_hf(candidate, model, source_config, directory, gguf_file, out, config_only)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return _written(out, final)


def _fill_hf(candidate, model, source_config, directory: Path, gguf_file, out: Path, config_only: bool) -> None:
    if gguf_file is None:
        data = json.loads((directory / "config.json").read_text())
        if not config_only:
            for item in directory.iterdir():
                if item.is_file() and item.suffix in WEIGHT_SUFFIXES and item.name != "config.json":
                    target = out / item.name
                    if not target.exists():
                        try:
                            os.link(item, target)
                        except OSError:
                            shutil.copy2(item, target)
    else:  # a GGUF source has no HF directory: write the dequantized weights and the config ourselves
        data = source_config.to_dict()
        if not config_only:
            from safetensors.torch import save_model

            loaded, tokenizer = load_model(model)
            save_model(loaded, str(out / "model.safetensors"))
            tokenizer.save_pretrained(out)
    write_longrope_config(out, candidate, data)


def gguf_metadata(candidate: RopeCandidate, arch: str, static: bool) -> dict:
    """The GGUF keys. llama.cpp multiplies cos/sin by `rope.scaling.attn_factor` whatever the scaling
    type, so a static export keeps it too. `context_length` is the target window: llama.cpp's default
    context (`n_ctx` 0) is then the target, which selects the long factors (see README, Serving)."""
    g = candidate.geometry
    if static:
        return {f"{arch}.rope.freq_base": g.base, f"{arch}.rope.scaling.attn_factor": candidate.attention_factor}
    return {
        f"{arch}.rope.freq_base": g.base,
        f"{arch}.rope.scaling.type": "longrope",
        f"{arch}.rope.scaling.attn_factor": candidate.attention_factor,
        f"{arch}.rope.scaling.original_context_length": g.original_window,
        f"{arch}.context_length": candidate.target_window,
    }


@register_exporter("gguf")
def export_gguf(candidate: RopeCandidate, model: str, out: Path, static: bool = False) -> Path:
    """A copy of the GGUF model with `rope_factors_long/short` (or one static `rope_freqs`) and the keys."""
    import gguf
    import numpy as np

    _checked(candidate, model)
    directory, gguf_file = resolve(model)
    if gguf_file is None:
        raise RopeSearchError(f"GGUF export copies a .gguf model; {model!r} is an HF directory (give --model X.gguf)")
    reader = gguf.GGUFReader(directory / gguf_file)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    n_rot = reader.get_field(f"{arch}.rope.dimension_count")
    if n_rot is not None and n_rot.contents() // 2 != candidate.geometry.pairs:
        raise RopeSearchError(
            f"{gguf_file}: rope.dimension_count {n_rot.contents()} needs {n_rot.contents() // 2} factors"
        )
    if static and candidate.short_factors is not None and candidate.short_factors != candidate.long_factors:
        warnings.warn("--static writes one factor vector for every length: the searched short factors are left "
                      "out (llama.cpp then applies the long ones to short prompts too)", stacklevel=2)  # fmt: skip
    new_keys = gguf_metadata(candidate, arch, static)
    # never rope.scaling.factor with longrope: llama.cpp would apply it on top of the factors
    dropped = {f"{arch}.rope.scaling.factor", f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.attn_factor"}
    factor_tensors = {"rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight"}
    if static:
        new_tensors = {"rope_freqs.weight": np.asarray(candidate.long_factors, dtype=np.float32)}
    else:
        new_tensors = {
            "rope_factors_long.weight": np.asarray(candidate.long_factors, dtype=np.float32),
            "rope_factors_short.weight": np.asarray(candidate.factors(long=False), dtype=np.float32),
        }
    tmp = _scratch(out)
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in dropped:
            continue
        if field.name in new_keys:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for key, value in new_keys.items():
        kind = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32, int: gguf.GGUFValueType.UINT32}
        writer.add_key_value(key, value, kind[type(value)])
    kept = [t for t in reader.tensors if t.name not in factor_tensors]
    for tensor in kept:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    for name, values in new_tensors.items():
        writer.add_tensor_info(name, values.shape, values.dtype, values.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    for values in new_tensors.values():
        writer.write_tensor_data(values)
    writer.close()
    return _written(tmp, out)


@register_exporter("json")
def export_json(candidate: RopeCandidate, model: str | None, out: Path) -> Path:
    if model:
        _checked(candidate, model)
    tmp = _scratch(out)
    tmp.write_text(candidate.model_dump_json(indent=2) + "\n")
    return _written(tmp, out)


@register_exporter("yaml")
def export_yaml(candidate: RopeCandidate, model: str | None, out: Path) -> Path:
    if model:
        _checked(candidate, model)
    tmp = _scratch(out)
    tmp.write_text(yaml.safe_dump(candidate.model_dump(mode="json"), sort_keys=False))
    return _written(tmp, out)


def read_source(source: Path) -> RopeCandidate:
    """A run folder (its best factors and config) or a factor file, checked before anything is written."""
    return RopeCandidate.from_source(source)
