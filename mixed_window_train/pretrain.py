"""`ropesearch pretrain`: train the bundled train-short model from scratch.

A small Llama trained at window L on real offline text (Python's pydoc topics) mixed with
needle -> question -> answer examples, so that needle retrieval works inside L and breaks beyond it:
the smallest model on which a RoPE search has something to find. The tokenizer is a byte-level BPE
trained here with the `tokenizers` library, digits split one per token.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fitness import output
from fitness.baselines import baseline
from fitness.config_checks import check_haystacks
from fitness.config_io import load_yaml, read_yaml, validate
from fitness.errors import RopeSearchError
from fitness.geometry import geometry_from_config
from fitness.models import save_hf_model
from fitness.needles import Haystack, NeedleSettings, build_document, build_needle_set, haystack_texts
from fitness.scoring import score_candidates
from mixed_window_train.trainer import Batch, TrainSettings, train

MAX_WINDOW = 65_536
MAX_PARAMETERS = 2_000_000_000  # a model trained from scratch here; beyond this it would not finish

TEMPLATES = [  # (needle, question); the first is the fitness default
    (NeedleSettings().needle_template, NeedleSettings().question_template),
    (
        "The secret code for {key} is {value}.",
        "What is the secret code for {key}? The secret code for {key} is {value}",
    ),
    ("Remember that the value of {key} is {value}.", "Recall the value of {key}. The value of {key} is {value}"),
    ("Note: {key} has the number {value}.", "Which number does {key} have? {key} has the number {value}"),
]


class ArchitectureSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(default=2048, ge=300)
    hidden_size: int = Field(default=128, gt=0)
    layers: int = Field(default=2, gt=0)
    heads: int = Field(default=2, gt=0)
    head_dim: int = Field(default=64, gt=0)
    intermediate_size: int = Field(default=512, gt=0)
    rope_theta: float = Field(default=10000.0, gt=1)

    @field_validator("head_dim")
    @classmethod
    def _pairs(cls, head_dim: int) -> int:
        if head_dim % 2:
            raise ValueError(f"must be even: RoPE rotates pairs of dimensions, got {head_dim}")
        return head_dim


class PretrainData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    haystack: list[str] = Field(default_factory=lambda: ["pydoc"])
    needle_fraction: float = Field(default=0.9, ge=0, le=1)
    answer_weight: float = Field(default=10.0, gt=0)
    min_length: int = Field(default=128, gt=0)
    curriculum: float = Field(default=0.4, ge=0, le=1)  # fraction of steps over which length grows to L


class PretrainStop(BaseModel):
    """Stop once in-window retrieval on a validation needle set stays at `retrieval` or above for
    `patience` evaluations in a row (after `min_step`)."""

    model_config = ConfigDict(extra="forbid")

    retrieval: float = Field(default=0.98, gt=0, le=1)
    min_step: int = Field(default=1000, ge=0)
    documents: int = Field(default=100, gt=0, le=10_000)
    patience: int = Field(default=2, gt=0, le=10_000)  # consecutive evaluations that must pass


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str = "models/tiny-llama"
    window: int = Field(default=256, gt=16)
    architecture: ArchitectureSettings = Field(default_factory=ArchitectureSettings)
    data: PretrainData = Field(default_factory=PretrainData)
    train: TrainSettings
    stop: PretrainStop = Field(default_factory=PretrainStop)


def parameter_count(arch: ArchitectureSettings) -> int:
    """Roughly: embeddings, attention and MLP weights."""
    attention = 2 * arch.hidden_size * arch.heads * arch.head_dim * 2
    mlp = 3 * arch.hidden_size * arch.intermediate_size
    return arch.vocab_size * arch.hidden_size + arch.layers * (attention + mlp)


def load_recipe(config_path: Path, seed: int | None = None, out: str | None = None,
            work_dir: str | None = None) -> tuple[PretrainConfig, Path]:
    """The recipe, the command line's overrides and the output paths, validated before anything is
    written. Returns the config and the work folder."""
    source = str(config_path)
    overrides = {key: value for key, value in (("train.seed", seed), ("out", out)) if value is not None}
    config = load_yaml(config_path, PretrainConfig, overrides)
    if config.window > MAX_WINDOW:
        raise RopeSearchError(f"{source}: window: {config.window} is beyond {MAX_WINDOW} tokens")
    if parameter_count(config.architecture) > MAX_PARAMETERS:
        raise RopeSearchError(f"{source}: architecture: about {parameter_count(config.architecture):.3g} parameters, "
                              f"more than {MAX_PARAMETERS:.0e} that training from scratch here can finish")
    if not config.out.strip():
        raise RopeSearchError(f"{source}: out: empty; name the folder the finished model goes to")
    check_haystacks(config.data.haystack, source, "data.haystack")
    work = Path(work_dir or f"{config.out}.work")
    output.check_destination(work, "--work-dir")  # whose it is, claimed_work_folder checks before it writes
    output.check_destination(Path(config.out), "out")
    check_model_folder(Path(config.out), config, source)
    return config, work


def same_recipe(saved: PretrainConfig, config: PretrainConfig) -> bool:
    """Whether a saved recipe trains the same model (where the model goes aside)."""
    return saved.model_dump(exclude={"out"}) == config.model_dump(exclude={"out"})


def _same_json_recipe(text: str, config: PretrainConfig) -> bool:
    return same_recipe(PretrainConfig.model_validate_json(text), config)


def check_model_folder(out: Path, config: PretrainConfig, source: str) -> None:
    """The finished model goes to a new (or empty) folder, or to one that holds this recipe (recipe.yaml, as
    models/tiny-llama does): the model this recipe made, made again. Any other model is never replaced."""
    if out.exists() and not out.is_dir():
        raise RopeSearchError(f"{source}: out {out}: is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    recipe = out / "recipe.yaml"
    try:
        ours = recipe.is_file() and same_recipe(validate(read_yaml(recipe), PretrainConfig, ""), config)
    except RopeSearchError:
        ours = False
    if not ours:
        raise RopeSearchError(f"{source}: out {out}: holds something other than this recipe's model (no "
                              f"recipe.yaml of this recipe); choose another out or --out")


def claimed_work_folder(work: Path, config: PretrainConfig):
    """The work folder, new or this recipe's to resume, locked while it trains."""
    return output.claimed_folder(work, "--work-dir", "pretraining", "recipe.json", config.model_dump_json(indent=2),
                                 lambda saved: _same_json_recipe(saved, config))


def publish_model(model, tokenizer, config: PretrainConfig) -> Path:
    """The finished model into `config.out`: a new folder appears whole, with the recipe that made it; in a
    folder of this recipe each of the model's files is replaced atomically and the rest is kept."""
    out = Path(config.out)
    if out.is_dir() and any(out.iterdir()):
        with output.files_into(out) as staging:
            save_hf_model(model, tokenizer, staging)
        return out
    with output.new_output(out, "out") as staging:
        save_hf_model(model, tokenizer, staging)
        (staging / "recipe.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return out


def train_tokenizer(config: PretrainConfig, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = haystack_texts(config.data.haystack)
    words = sorted({w for t in texts for w in t.lower().split() if w.isalpha()})
    for needle, question in TEMPLATES:  # the templates' words should be tokens, not byte soup
        for _ in range(200):
            key, value = f"{rng.choice(words)}-{rng.choice(words)}", str(rng.randint(10**6, 10**7 - 1))
            texts.append(needle.format(key=key, value=value) + " " + question.format(key=key, value=value))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.architecture.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return fast


def build_model(config: PretrainConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = config.architecture
    model_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        head_dim=arch.head_dim,
        max_position_embeddings=config.window,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(config.train.seed)
    return LlamaForCausalLM(model_config)


class PretrainBatches:
    """Batch for (step, micro) as a pure function of the seed: the data position is the step."""

    def __init__(self, config: PretrainConfig, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.haystack = Haystack(tokenizer, config.data.haystack)
        self.templates = [
            NeedleSettings(needle_template=n, question_template=q, haystack=config.data.haystack) for n, q in TEMPLATES
        ]

    def length(self, step: int) -> int:
        span = max(1, int(self.config.train.steps * self.config.data.curriculum))
        low, high = self.config.data.min_length, self.config.window
        return min(high, low + (high - low) * step // span)

    def __call__(self, step: int, micro: int) -> Batch:
        length = self.length(step)
        rows, weights = [], []
        for row in range(self.config.train.batch_size):
            rng = random.Random(f"pretrain:{self.config.train.seed}:{step}:{micro}:{row}")
            weight = torch.ones(length)
            if rng.random() < self.config.data.needle_fraction:
                settings = rng.choice(self.templates)
                ids, answer, _ = build_document(self.tokenizer, self.haystack, settings, length, rng, rng.random())
                weight[answer] = self.config.data.answer_weight
            else:
                ids = [
                    t for piece in self.haystack.take(rng.randrange(len(self.haystack.pieces)), length) for t in piece
                ]
            rows.append(ids)
            weights.append(weight)
        return Batch(input_ids=torch.tensor(rows), loss_weight=torch.stack(weights))


def evaluate_model(model, tokenizer, window: int, documents: int, seed: int, haystack: list[str], lengths=(1,)):
    """Needle PPL and retrieval for none / YaRN at multiples of the window."""
    geometry = geometry_from_config(model.config)
    results = {}
    for multiple in lengths:
        length = window * multiple
        needles = build_needle_set(
            tokenizer,
            NeedleSettings(documents=documents, seed=seed, haystack=haystack, depths=[i / 19 for i in range(20)]),
            length,
            cache=False,
        )
        methods = ["none"] if multiple == 1 else ["none", "yarn"]
        candidates = [baseline(m, geometry, length) for m in methods]
        for method, score in zip(methods, score_candidates(model, needles, candidates, documents_per_forward=4)):
            results[f"{method}@{multiple}x"] = {"needle_ppl": score.fitness, "retrieval": score.retrieval}
    return results


def pretrain(config: PretrainConfig, work_dir: Path, stop_after: int | None = None) -> dict:
    """Train in `work_dir` (resumable), then write the finished model to `config.out`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = work_dir / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        with output.rebuilt_folder(tokenizer_dir) as staging:  # whole or not at all: a kill mid-save is redone
            tokenizer = train_tokenizer(config, staging)
    model = build_model(config, len(tokenizer))
    batches = PretrainBatches(config, tokenizer)

    def validation(step: int, previous: dict) -> dict:
        scores = evaluate_model(model, tokenizer, config.window, config.stop.documents, 10_000 + config.train.seed,
                                config.data.haystack)
        retrieval = scores["none@1x"]["retrieval"]
        passing = step >= config.stop.min_step and retrieval >= config.stop.retrieval
        streak = previous.get("streak", 0) + 1 if passing else 0
        return {"retrieval": retrieval, "needle_ppl": scores["none@1x"]["needle_ppl"], "streak": streak}

    def converged(metrics: dict) -> bool:  # retrieval emerges abruptly and wobbles: it must hold, not just appear
        return metrics["streak"] >= config.stop.patience

    started = time.time()
    result = train(model, batches, config.train, work_dir, evaluate=validation, done=converged, stop_after=stop_after)
    result["seconds"] = time.time() - started
    if stop_after is not None and result["step"] < config.train.steps and not result["converged"]:
        return result
    publish_model(model, tokenizer, config)
    return result
