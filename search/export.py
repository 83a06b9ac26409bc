"""Export a candidate into what inference engines load: a registry of exporters, one function each.

hf    a Hugging Face model directory whose config.json carries the longrope form that transformers
      4.x and 5.x and vLLM all read (legacy `rope_scaling` + `rope_theta`)
gguf  a copy of a GGUF model with longrope factor tensors and keys, for llama.cpp (a Qwen2 GGUF is
      written as the Llama architecture, whose llama.cpp graph reads the factors: LLAMA_CPP_ARCHS)
json  the candidate with its geometry and provenance
yaml  the same, as YAML

Every exporter builds its result under a unique hidden name beside the target and moves it there whole
at the end, never over anything (fitness.output): a failure leaves nothing behind. Nothing is linked
to the source: a user who loads the export and saves into it (`save_pretrained`) must not change the
model it came from.

To add a target: `@register_exporter("name") def export_name(candidate, model, out, **options) -> Path`
that builds inside `with new_output(out, "--out") as scratch:`; `--to name` finds it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from fitness.errors import RopeSearchError
from fitness.factor_files import candidate_from
from fitness.factors import RopeCandidate, check_geometry
from fitness.geometry import geometry_from_config
from fitness.hf_config import write_longrope_config
from fitness.models import load_config, load_model, resolve
from fitness.output import new_output

EXPORTERS: dict[str, Callable[..., Path]] = {}
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".py", ".jinja")


def register_exporter(name: str):
    def decorate(fn):
        EXPORTERS[name] = fn
        return fn

    return decorate


def _checked(candidate: RopeCandidate, model: str):
    config = load_config(model)
    check_geometry(candidate, geometry_from_config(config), source="factors")
    return config


@register_exporter("hf")
def export_hf(candidate: RopeCandidate, model: str, out: Path, config_only: bool = False) -> Path:
    """A model directory: the source's files copied (HF source) or written (GGUF source), config with the
    factors."""
    source_config = _checked(candidate, model)
    directory, gguf_file = resolve(model)
    with new_output(out, "--out") as scratch:
        _fill_hf(candidate, model, source_config, directory, gguf_file, scratch, config_only)
    return out


def _fill_hf(candidate, model, source_config, directory: Path, gguf_file, out: Path, config_only: bool) -> None:
    if gguf_file is None:
        data = json.loads((directory / "config.json").read_text())
        if not config_only:
            for item in directory.iterdir():
                if item.is_file() and item.suffix in MODEL_FILE_SUFFIXES and item.name != "config.json":
                    shutil.copyfile(item, out / item.name)  # a copy: a hard link would share later writes
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
    context (`n_ctx` 0) is then the target, which selects the long factors (see docs/serving.md)."""
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


@dataclass(frozen=True)
class LlamaCppArch:
    """How a GGUF architecture reaches llama.cpp's RoPE factor tensors."""

    written_as: str
    # the source rotates the halves of a head (NEOX, as transformers does); llama's graph rotates
    # neighbouring pairs, so q/k rows (and biases) are reordered as llama.cpp's converter does for Llama
    neighbour_pairs: bool = False


# llama.cpp (0.3.36) reads rope_factors_long/short and rope_freqs in its llama and phi3 graphs. Its qwen2
# graph has no such tensors and refuses a file that has them ("wrong number of tensors; expected 293, got
# 291"). Qwen2 is Llama with q/k/v biases, which the llama graph also reads: written as llama, with q/k
# reordered to neighbouring pairs, llama.cpp computes the same model and applies the factors (measured on
# Qwen2.5-Coder-0.5B: benchmarks/llama_cpp_qwen.py; tests/test_engines.py on a tiny Qwen2).
LLAMA_CPP_ARCHS = {
    "llama": LlamaCppArch("llama"),
    "phi3": LlamaCppArch("phi3"),
    "qwen2": LlamaCppArch("llama", neighbour_pairs=True),
}


def neighbour_pairs(rows, heads: int):
    """Rows of a q/k projection (weight or bias, any row width) from halves-rotation to neighbouring-pairs
    order, per head."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


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
                      "out (llama.cpp then applies the long ones to short prompts too)", stacklevel=2)
    if arch not in LLAMA_CPP_ARCHS:
        warnings.warn(f"{gguf_file}: llama.cpp's {arch!r} graph is untested here; it reads RoPE factor tensors "
                      f"in {', '.join(sorted(LLAMA_CPP_ARCHS))} models", stacklevel=2)
    target = LLAMA_CPP_ARCHS.get(arch, LlamaCppArch(arch))
    new_keys = gguf_metadata(candidate, target.written_as, static)
    # never rope.scaling.factor with longrope (dropped below): llama.cpp would apply it on top of the factors
    if static:
        new_tensors = {"rope_freqs.weight": np.asarray(candidate.long_factors, dtype=np.float32)}
    else:
        new_tensors = {
            "rope_factors_long.weight": np.asarray(candidate.long_factors, dtype=np.float32),
            "rope_factors_short.weight": np.asarray(candidate.factors(long=False), dtype=np.float32),
        }
    with new_output(out, "--out", folder=False) as scratch:
        _write_gguf(reader, arch, target, new_keys, new_tensors, scratch)
    return out


def _write_gguf(reader, arch: str, target: LlamaCppArch, new_keys: dict, new_tensors: dict, path: Path) -> None:
    """The source's keys and tensors, less the scaling keys and factor tensors it may have, plus the new ones;
    keys and q/k rows rewritten for `target`'s architecture."""
    import gguf
    import numpy as np

    dropped = {f"{arch}.rope.scaling.factor", f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.attn_factor"}
    factor_tensors = {"rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight"}
    heads = {"attn_q": reader.get_field(f"{arch}.attention.head_count"),
             "attn_k": reader.get_field(f"{arch}.attention.head_count_kv")}
    heads = {name: int(field.contents()) for name, field in heads.items() if field is not None}
    renamed = target.written_as != arch

    def data_of(tensor):
        role = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if target.neighbour_pairs and role in heads:
            return neighbour_pairs(np.asarray(tensor.data), heads[role])
        return tensor.data

    writer = gguf.GGUFWriter(str(path), arch=target.written_as, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in dropped:
            continue
        name = f"{target.written_as}.{field.name[len(arch) + 1:]}" if renamed and field.name.startswith(f"{arch}.") \
            else field.name
        if name in new_keys:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
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
        writer.write_tensor_data(data_of(tensor), tensor_endianess=reader.endianess)
    for values in new_tensors.values():
        writer.write_tensor_data(values)
    writer.close()


@register_exporter("json")
def export_json(candidate: RopeCandidate, model: str | None, out: Path) -> Path:
    if model:
        _checked(candidate, model)
    with new_output(out, "--out", folder=False) as scratch:
        scratch.write_text(candidate.model_dump_json(indent=2) + "\n")
    return out


@register_exporter("yaml")
def export_yaml(candidate: RopeCandidate, model: str | None, out: Path) -> Path:
    if model:
        _checked(candidate, model)
    with new_output(out, "--out", folder=False) as scratch:
        scratch.write_text(yaml.safe_dump(candidate.model_dump(mode="json"), sort_keys=False))
    return out


def read_source(source: Path) -> RopeCandidate:
    """A run folder (its best factors and config) or a factor file, checked before anything is written."""
    return candidate_from(source)
