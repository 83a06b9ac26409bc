"""The training loop, in one file: AdamW, warmup + cosine, clipping, accumulation, checkpoints, exact resume.

Used by both `ropesearch pretrain` (the bundled tiny model) and `ropesearch train` (mixed-window
fine-tune). Data comes from a `batch_for(step, micro)` function that is a pure function of its
arguments, so the data position is just the step number and a resumed run sees the same batches.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from fitness.config_checks import MAX_SEED
from fitness.output import atomic_file, write_atomic


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0, le=10_000_000)
    batch_size: int = Field(default=8, gt=0, le=4_096)
    grad_accum: int = Field(default=1, gt=0, le=1_024)
    lr: float = Field(default=2e-5, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup: int = Field(default=40, ge=0, le=10_000_000)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = Field(default=1.0, gt=0)
    precision: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    # >0: LM head + loss over this many positions of each of batch_size rows at a time
    loss_chunk: int = Field(default=0, ge=0, le=2**21)
    checkpoint_every: int = Field(default=200, gt=0, le=10_000_000)
    eval_every: int = Field(default=0, ge=0, le=10_000_000)  # 0: only at the end
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    threads: int | None = Field(default=None, ge=1, le=1_024)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas):
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"each of AdamW's betas must lie in [0, 1), got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _schedule_descends(self) -> TrainSettings:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr}): the cosine schedule descends to it")
        return self


@dataclass
class Batch:
    """One micro-batch. Per token, `loss_weight` weighs next-token cross-entropy (0 masks it) and
    `distill_weight` weighs the KL divergence from the frozen teacher's next-token distribution."""

    input_ids: torch.Tensor
    loss_weight: torch.Tensor
    position_ids: torch.Tensor | None = None
    distill_weight: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def learning_rate(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (settings.lr - settings.min_lr)


def loss_totals(parts: list[Batch]) -> tuple[float, float]:
    """(sum of loss weights, sum of distill weights) over a micro-batch's parts: what each part's loss
    sums are divided by, so a micro-batch cut into parts has the loss it would have as one batch."""
    weight = sum(float(part.loss_weight[:, 1:].sum()) for part in parts)
    distill = sum(float(part.distill_weight[:, :-1].sum()) for part in parts if part.distill_weight is not None)
    return max(weight, 1e-9), max(distill, 1e-9)


def weighted_lm_loss(logits: torch.Tensor, batch: Batch, totals: tuple[float, float] | None = None) -> torch.Tensor:
    """Next-token cross-entropy, each target token weighted by `loss_weight` (normalized by the weights,
    or by `totals` when the batch is one part of a micro-batch)."""
    targets = batch.input_ids[:, 1:].to(logits.device)
    weights = batch.loss_weight[:, 1:].to(logits.device, torch.float32)
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    weight_total = totals[0] if totals else weights.sum().clamp_min(1e-9)
    return (per_token * weights).sum() / weight_total


def _chunk_loss_sums(head, hidden, targets, weights, teacher_hidden, teacher_head, distill_weights):
    """(weighted cross-entropy sum, weighted KL(teacher || student) sum) over one chunk of positions."""
    logits = head(hidden).float()
    ce = (F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * weights).sum()
    if teacher_hidden is None:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        teacher = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
    kl = F.kl_div(F.log_softmax(logits, dim=-1), teacher, log_target=True, reduction="none").sum(-1)
    return ce, (kl * distill_weights).sum()


def chunked_loss(model, batch: Batch, position_ids, chunk: int, teacher=None,
                 totals: tuple[float, float] | None = None) -> torch.Tensor:
    """Weighted LM loss plus, where `distill_weight` is set, the KL from the teacher's predictions,
    without the [batch, length, vocab] logits: the LM heads run over `chunk` positions at a time
    and the student's is recomputed in the backward pass (a 32k x 49k-vocab row would need ~6 GB).
    Each sum is divided by this batch's own weights, or by `totals` when it is one part of a micro-batch."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    hidden = model.model(input_ids=ids, position_ids=position_ids, use_cache=False)[0]
    teacher_hidden = None
    distilling = teacher is not None and batch.distill_weight is not None and bool(batch.distill_weight.any())
    if distilling:
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=ids, position_ids=position_ids, use_cache=False)[0]
    head = model.get_output_embeddings()
    teacher_head = teacher.get_output_embeddings() if distilling else None
    targets = ids[:, 1:]
    weights = batch.loss_weight[:, 1:].to(device, torch.float32)
    distill = batch.distill_weight[:, :-1].to(device, torch.float32) if distilling else None
    ce_total = kl_total = hidden.new_zeros((), dtype=torch.float32)
    chunk = chunk or targets.shape[1]
    for start in range(0, targets.shape[1], chunk):
        end = min(start + chunk, targets.shape[1])
        ce, kl = torch.utils.checkpoint.checkpoint(
            _chunk_loss_sums,
            head,
            hidden[:, start:end],
            targets[:, start:end],
            weights[:, start:end],
            teacher_hidden[:, start:end] if distilling else None,
            teacher_head,
            distill[:, start:end] if distilling else None,
            use_reentrant=False,
        )
        ce_total, kl_total = ce_total + ce, kl_total + kl
    if totals is None:
        totals = (weights.sum().clamp_min(1e-9), distill.sum().clamp_min(1e-9) if distilling else None)
    loss = ce_total / totals[0]
    if distilling:
        loss = loss + kl_total / totals[1]
    return loss


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout and sampling on the GPU draw from these, not from the CPU's
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _byte_tensor(state) -> torch.Tensor:
    """torch only accepts a CPU ByteTensor as RNG state; a checkpoint loaded onto a GPU holds CUDA ones."""
    return torch.as_tensor(state).detach().to("cpu", torch.uint8)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]][: torch.cuda.device_count()])


def load_checkpoint(path: Path) -> dict:
    """Always onto the CPU: `load_state_dict` moves weights and optimizer state to their parameters'
    device, and RNG states must stay CPU tensors."""
    return torch.load(path, weights_only=False, map_location="cpu")


class Checkpoints:
    """`step_XXXXXXX.pt` files in a folder, written atomically; the newest one that loads is the resume point."""

    def __init__(self, folder: Path, keep: int = 2):
        self.folder, self.keep = Path(folder), keep

    def latest(self) -> Path | None:
        found = sorted(self.folder.glob("step_*.pt"))
        return found[-1] if found else None

    def resume_point(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, and its state. One a disk damaged (a torn or emptied file) is
        passed over, with a line saying so: the one before it holds a few steps less, not nothing."""
        for path in sorted(self.folder.glob("step_*.pt"), reverse=True):
            try:
                return path, load_checkpoint(path)
            except Exception as err:  # torch raises whatever its unpickler or zip reader meets
                logging.getLogger("ropesearch").warning(
                    "checkpoint %s does not load (%s); resuming from an older one", path,
                    " ".join(str(err).split())[:120])
        return None

    def save(self, state: dict, step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:07d}.pt"
        with atomic_file(path) as tmp:  # a crash mid-write never leaves a torn checkpoint behind
            torch.save(state, tmp)
        for old in sorted(self.folder.glob("step_*.pt"))[: -self.keep]:
            old.unlink()
        return path


class StepBoundaryStop:
    """Ctrl-C (SIGINT) during training finishes the step in flight and checkpoints it, so a resume loses
    no step: what lets a fine-tune longer than one sitting (or one GPU call) run in pieces. A second Ctrl-C
    stops at once, back to the last checkpoint."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("train: stopping after this step, which is checkpointed (Ctrl-C again: at once)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(
    model: torch.nn.Module,
    batch_for: Callable[[int, int], Batch | list[Batch]],
    settings: TrainSettings,
    out_dir: Path,
    evaluate: Callable[[int, dict], dict] | None = None,
    done: Callable[[dict], bool] | None = None,
    teacher: torch.nn.Module | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train until `settings.steps` (or until `done(metrics)` after an evaluation); resume from the
    newest checkpoint in `out_dir/checkpoints`. `evaluate(step, previous_metrics)` sees the last
    evaluation's metrics (restored on resume). `teacher`, a frozen model, is what tokens with a
    `distill_weight` are pulled toward. `stop_after` ends early at that step, as a crash would."""
    out_dir = Path(out_dir)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = next(model.parameters()).device
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=settings.betas,
        fused=device.type == "cuda",
    )
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    checkpoints = Checkpoints(out_dir / "checkpoints")
    start, last_metrics, earlier_seconds = 0, {}, 0.0
    began = time.perf_counter()
    if (resume := checkpoints.resume_point()) is not None:
        _, state = resume
        load_trained_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start, last_metrics = state["step"], state.get("metrics", {})
        earlier_seconds = state.get("seconds", 0.0)  # the pieces before this one, each up to its checkpoint
    else:
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        np.random.seed(settings.seed)

    metrics_path = out_dir / "metrics.csv"
    _keep_rows_until(metrics_path, start)
    writer = _tensorboard(out_dir)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bfloat16")

    def save(step: int, metrics: dict) -> None:
        state = {"model": trained_state(model), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                 "step": step, "metrics": metrics, "settings": settings.model_dump(),
                 "seconds": earlier_seconds + time.perf_counter() - began}
        checkpoints.save(state, step)

    model.train()
    with StepBoundaryStop() as stop:
        progress = tqdm(total=settings.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        trained, finished = start, False  # steps done: what a caller compares with settings.steps
        for step in range(start, settings.steps):
            if stop_after is not None and step >= stop_after:
                break
            tick = time.perf_counter()
            lr = learning_rate(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, tokens = 0.0, 0
            for micro in range(settings.grad_accum):
                batch = batch_for(step, micro)
                parts = batch if isinstance(batch, list) else [batch]  # parts of unlike shapes: one pass each
                totals = loss_totals(parts) if len(parts) > 1 else None
                for part in parts:
                    loss = _part_loss(model, part, settings, teacher, totals, autocast) / settings.grad_accum
                    loss.backward()  # part by part: only one part's activations are held at a time
                    loss_sum += loss.item()
                    tokens += part.tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - tick
            row = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens / elapsed}
            _append_csv(metrics_path, row)
            if writer:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    writer.add_scalar(f"train/{key}", row[key], step + 1)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")

            last_step = step + 1 == settings.steps
            if evaluate and ((settings.eval_every and (step + 1) % settings.eval_every == 0) or last_step):
                model.eval()
                last_metrics = {"step": step + 1, **evaluate(step + 1, last_metrics)}
                model.train()
                progress.write(
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last_metrics.items())
                )
                if writer:
                    for key, value in last_metrics.items():
                        if isinstance(value, (int, float)):
                            writer.add_scalar(f"eval/{key}", value, step + 1)
                finished = bool(done and done(last_metrics))
            if finished or last_step or stop.requested or (step + 1) % settings.checkpoint_every == 0:
                save(step + 1, last_metrics)
            trained = step + 1
            if finished or stop.requested:
                break
        progress.close()
    if writer:
        writer.close()
    model.eval()
    if stop.requested and not finished and trained < settings.steps:
        raise KeyboardInterrupt  # the caller says how to resume, as for any Ctrl-C
    return {"step": trained, "metrics": last_metrics, "converged": finished,
            "seconds": earlier_seconds + time.perf_counter() - began}  # a run in pieces: all pieces


def trained_state(model: torch.nn.Module) -> dict:
    """What a checkpoint keeps of the model: every weight, or, where some are frozen (adapters), only the
    trained ones: the frozen ones are the base model's, loaded again on resume."""
    if all(p.requires_grad for p in model.parameters()):
        return model.state_dict()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in trained}


def load_trained_state(model: torch.nn.Module, state: dict) -> None:
    if all(p.requires_grad for p in model.parameters()):
        model.load_state_dict(state)
        return
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected or trained - set(state):
        raise ValueError(f"the checkpoint does not hold this model's trained weights (it has "
                         f"{len(unexpected)} unknown, lacks {len(trained - set(state))}): another config's run")


def _part_loss(model, part: Batch, settings: TrainSettings, teacher, totals, autocast) -> torch.Tensor:
    device = next(model.parameters()).device
    position_ids = part.position_ids.to(device) if part.position_ids is not None else None
    with autocast:
        if settings.loss_chunk or part.distill_weight is not None:
            # the same tokens per LM-head chunk as a batch of batch_size rows, however many rows a part has
            rows = part.input_ids.shape[0]
            chunk = max(1, settings.loss_chunk * settings.batch_size // rows) if settings.loss_chunk else 0
            return chunked_loss(model, part, position_ids, chunk, teacher, totals)
        out = model(input_ids=part.input_ids.to(device), position_ids=position_ids, use_cache=False)
        return weighted_lm_loss(out.logits, part, totals)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.csv always has everything
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


METRICS = ("step", "loss", "lr", "grad_norm", "tokens_per_s")


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(METRICS))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _metric_rows(path: Path) -> list[dict]:
    """The whole rows of metrics.csv: a header lost or a last line torn by a kill is passed over."""
    rows = []
    with path.open(newline="") as handle:
        for cells in csv.reader(handle):
            if len(cells) != len(METRICS):
                continue
            try:
                values = [int(cells[0])] + [float(cell) for cell in cells[1:]]
            except ValueError:  # the header, or a torn line
                continue
            rows.append({**dict(zip(METRICS, cells)), "step": values[0]})
    return rows


def _keep_rows_until(path: Path, step: int) -> None:
    """Rewrite metrics.csv (atomically) with its header and the rows up to the resume point: rows past it
    were logged after the checkpoint a crash fell back to, and are logged again."""
    if not path.exists():
        return
    lines = [",".join(METRICS)] + [",".join(str(row[key]) for key in METRICS) for row in _metric_rows(path)
                                   if row["step"] <= step]
    write_atomic(path, "\n".join(lines) + "\n")
