"""LoRA adapters (peft) for the mixed-window fine-tune: the base weights stay frozen and only low-rank
updates of the attention projections (and, optionally, the RMSNorm gains) are trained. They start from
zero: give them a larger learning rate than a full fine-tune (ten times did on the bundled model).

Why: a full fine-tune's checkpoint of even the 135M model is 1.5 GB (fp32 weights and AdamW moments), so
a fine-tune longer than one GPU machine's lease is lost with it. The adapters' checkpoint is a few MB
and travels, so a 128k fine-tune can run in pieces on fresh machines. After training the adapters are
merged into the weights: the exported model is a plain model, as after a full fine-tune.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


class AdapterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=8, gt=0, le=1024)
    alpha: float = Field(default=16.0, gt=0)  # the update is scaled by alpha / rank
    targets: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: list(ATTENTION), min_length=1)
    # also train the RMSNorm gains (LongLoRA does): on the bundled model they moved its outputs on text
    # outside the training data (+5 % to +60 % general-text PPL, against -3 % to +1.6 % without them) for
    # little at the target (benchmarks/results/tiny-adapter-vs-full-cpu.json)
    norms: bool = False


def attach(model: torch.nn.Module, settings: AdapterSettings, seed: int):
    """Freeze `model` and inject LoRA layers into it in place (its class and `model.model` stay, which
    the trainer's chunked loss uses); the adapters' initial weights depend on `seed` alone. Returns the
    peft wrapper, whose `merge_and_unload()` gives the plain model back."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    wrapped = get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                                               target_modules=list(settings.targets), bias="none"))
    if settings.norms:
        for name, parameter in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2]:
                parameter.requires_grad_(True)
    # reentrant gradient checkpointing recomputes each layer from its inputs; with the embeddings frozen
    # those would not require grad and the adapters inside would get none
    model.enable_input_require_grads()
    return wrapped


def merged(wrapped) -> torch.nn.Module:
    """The adapters folded into the weights: a plain model of the base class."""
    return wrapped.merge_and_unload()


def missing_targets(settings: AdapterSettings, model_config) -> tuple[list[str], list[str]]:
    """(targets the model has no linear layer of that name for, the names it has), from its config alone:
    the layers are built on the meta device, so a config is checked before anything is loaded or written."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    names = {name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)}
    return [target for target in settings.targets if target not in names], sorted(names)
