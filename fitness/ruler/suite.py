"""The RULER suite run as RULER scores it: greedy generation of a bounded number of tokens per task,
then string-match recall of the expected answers in what was generated; per task, per length, and the
average over tasks, in percent (as the paper prints it).

A sample at length N is a prompt of N minus the task's answer budget tokens, so that prompt and
answer together fit in N tokens, as RULER counts a length. The samples of one task and length have
equal-length prompts: they are batched with no padding, prefilled once, and decoded with the KV
cache one token at a time, only as far as the answer budget and only until every row has ended.
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from fitness.errors import RopeSearchError
from fitness.evaluation import Method
from fitness.patch import apply_candidates
from fitness.ruler.documents import build_prompt, has_chat_template
from fitness.ruler.tasks import RULER_TASKS, TaskInputs


class RulerSettings(BaseModel):
    """The `ruler:` section of an eval config."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: list(RULER_TASKS))
    samples: int = Field(default=25, gt=0, le=10_000)  # per task and length; RULER's paper uses 500
    # lengths as multiples of the original window; None: the eval's own `multiples`
    multiples: list[float] | None = Field(default=None, min_length=1, max_length=64)
    haystack: list[str] = Field(default_factory=lambda: ["pydoc"])  # the essay haystack (RULER: essays)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    # at most this many answer tokens for any task; None: each task's RULER budget
    max_new_tokens: int | None = Field(default=None, gt=0, le=4096)
    samples_per_forward: int = Field(default=8, gt=0, le=1024)
    # "auto": through the tokenizer's chat template where it has one; "off": plain text always
    chat_template: Literal["auto", "off"] = "auto"

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks):
        unknown = [name for name in tasks if name not in RULER_TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"unknown or repeated task(s) {unknown or tasks}; known: {', '.join(RULER_TASKS)}")
        return tasks

    @field_validator("multiples")
    @classmethod
    def _positive(cls, multiples):
        if multiples is not None and any(not 0 < m <= 512 for m in multiples):
            raise ValueError("multiples must be in (0, 512]")
        return multiples

    @field_validator("haystack", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    def answer_budget(self, task: str) -> int:
        return min(RULER_TASKS[task].max_new_tokens, self.max_new_tokens or RULER_TASKS[task].max_new_tokens)


@dataclass
class TaskSet:
    """The samples of one task at one length: equal-length prompts and their references."""

    task: str
    length: int
    input_ids: torch.Tensor  # [samples, length - max_new_tokens]
    answers: list[tuple[str, ...]]
    max_new_tokens: int


def build_task_set(inputs: TaskInputs, settings: RulerSettings, task: str, length: int, chat: bool) -> TaskSet:
    """`settings.samples` samples, each drawn from its own seed (sample j is the same whatever the count)."""
    budget = settings.answer_budget(task)
    rows, answers = [], []
    for j in range(settings.samples):
        sample = RULER_TASKS[task].generate(random.Random(f"ruler:{settings.seed}:{task}:{length}:{j}"), inputs)
        try:
            rows.append(build_prompt(inputs, sample, length - budget, chat))
        except RopeSearchError as err:
            raise RopeSearchError(f"RULER task {task} at {length} tokens ({budget} for the answer): {err}") from None
        answers.append(sample.answers)
    return TaskSet(task, length, torch.tensor(rows, dtype=torch.long), answers, budget)


def build_suite(tokenizer, settings: RulerSettings, lengths: list[int]) -> list[TaskSet]:
    inputs = TaskInputs.create(tokenizer, settings.haystack)
    chat = settings.chat_template == "auto" and has_chat_template(tokenizer)
    return [build_task_set(inputs, settings, task, length, chat) for length in lengths for task in settings.tasks]


# ---------------------------------------------------------------- scoring, as RULER's metrics
def string_match_all(output: str, references: tuple[str, ...]) -> float:
    """The fraction of the references found in the output (case-insensitive substrings)."""
    return sum(ref.lower() in output.lower() for ref in references) / len(references)


def string_match_part(output: str, references: tuple[str, ...]) -> float:
    """1 if any one reference is found in the output (RULER's QA metric)."""
    return float(any(ref.lower() in output.lower() for ref in references))


METRICS: dict[str, Callable[[str, tuple[str, ...]], float]] = {"all": string_match_all, "part": string_match_part}


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and the model's generation EOS (a chat
    model's end-of-turn token)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    return sorted(i for i in found if i is not None)


def cache_keyword(model) -> str:
    """The name of the KV-cache argument and output: transformers 5.25 renamed `past_key_values` to
    `cache` and warns on the old name (removed in 5.40); earlier versions know only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(
    model, input_ids: torch.Tensor, max_new_tokens: int, stop: list[int], use_cache: bool = True
) -> list[list[int]]:
    """Greedy continuation of each row, up to its first stop token (excluded) or `max_new_tokens`.
    With the cache the prompt is run once and each new token alone after it; without, the whole
    sequence again at every step (the reference the cached path must match)."""
    device = next(model.parameters()).device
    keyword = cache_keyword(model)
    sequence = input_ids.to(device)
    stop_tensor = torch.tensor(stop, device=device, dtype=sequence.dtype)
    ended = torch.zeros(sequence.shape[0], dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    cache, step_input = None, sequence
    for _ in range(max_new_tokens):
        if use_cache:
            out = model(input_ids=step_input, use_cache=True, logits_to_keep=1, **{keyword: cache})
            cache = getattr(out, keyword)
        else:
            so_far = torch.cat([sequence, *[t[:, None] for t in new]], 1)
            out = model(input_ids=so_far, use_cache=False, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
        ended |= torch.isin(token, stop_tensor)
        if bool(ended.all()):
            break
        step_input = token[:, None]
    rows = torch.stack(new, 1).tolist()
    return [row[: next((i for i, t in enumerate(row) if t in stop), len(row))] for row in rows]


@dataclass
class RulerResults:
    scores: dict[str, dict[int, dict[str, float]]]  # {method: {length: {task: percent, "average": percent}}}
    examples: dict[str, dict[int, dict[str, dict]]]  # the first sample's output and references per task
    seconds: dict[str, dict[int, float]] = field(default_factory=dict)  # {method: {length: the suite's wall time}}


def score_task_set(
    model, tokenizer, task_set: TaskSet, samples_per_forward: int, on_batch: Callable[[int], None] | None = None
) -> tuple[float, list[str]]:
    """The task's score in percent on these samples, and what the model generated for each."""
    stop = stop_ids(model, tokenizer)
    metric = METRICS[RULER_TASKS[task_set.task].metric]
    outputs: list[str] = []
    for start in range(0, len(task_set.answers), samples_per_forward):
        ids = task_set.input_ids[start : start + samples_per_forward]
        generated = greedy_generate(model, ids, task_set.max_new_tokens, stop)
        outputs += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated]
        if on_batch:
            on_batch(len(ids))
    recall = [metric(out, refs) for out, refs in zip(outputs, task_set.answers)]
    return 100 * sum(recall) / len(recall), outputs


def evaluate_ruler(
    model,
    tokenizer,
    suite: list[TaskSet],
    methods: Mapping[str, Method | None],
    samples_per_forward: int,
    show_progress: bool = True,
) -> RulerResults:
    """Every method on every task set. A method is applied as `fitness.evaluation` applies it for the
    length (baselines rebuilt per length); None runs the model as it stands (an exported model)."""
    results = RulerResults({name: {} for name in methods}, {name: {} for name in methods})
    total = len(methods) * sum(len(s.answers) for s in suite)
    with tqdm(total=total, desc="ruler", unit="sample", disable=not show_progress, dynamic_ncols=True) as bar:
        for name, method in methods.items():
            for task_set in suite:
                started = time.perf_counter()
                if method is None:
                    score, outputs = score_task_set(model, tokenizer, task_set, samples_per_forward, bar.update)
                else:
                    with apply_candidates(model, method(task_set.length)):
                        score, outputs = score_task_set(model, tokenizer, task_set, samples_per_forward, bar.update)
                _synchronize(model)
                spent = results.seconds.setdefault(name, {})
                spent[task_set.length] = spent.get(task_set.length, 0.0) + time.perf_counter() - started
                results.scores[name].setdefault(task_set.length, {})[task_set.task] = score
                example = {"output": outputs[0], "answers": list(task_set.answers[0])}
                results.examples[name].setdefault(task_set.length, {})[task_set.task] = example
            for row in results.scores[name].values():
                row["average"] = sum(row.values()) / len(row)
    return results


def _synchronize(model) -> None:
    """A wall time that ends when the GPU's work does, not when it was queued."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
