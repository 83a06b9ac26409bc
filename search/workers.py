"""Scoring workers: each holds one model replica and the tokenized needle documents.

`ScoringWorker` is a plain class. `RayPool` runs one per Ray actor (local cluster by default, an
existing one by address), replaces an actor that dies and re-runs its batch; `LocalPool` runs one
in this process (tests, notebooks, and the reference for Ray's overhead). Both take jobs from a
deque that the caller may extend while results come back, and hand back results in completion
order; a batch that fails comes back as an error string, never as an exception that stops the search.

What crosses to a worker is typed and already validated: a setup once per worker (`WorkerSetup`:
needle documents, the long stage; `TextSetup`: general-text windows, the short-factor stage), a
`Batch` (candidates and documents) per job, and a list of `CandidateScore` back; Ray pickles them as
they are.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from fitness.errors import RopeSearchError
from fitness.factors import RopeCandidate
from fitness.general_text import (
    GENERAL_ENGLISH,
    candidate_perplexities,
    candidate_window_nll,
    haystack_windows,
    perplexity,
    text_windows,
    window_nll,
)
from fitness.geometry import geometry_from_config
from fitness.models import ModelSettings, load_model
from fitness.needles import NeedleSettings, build_needle_set
from fitness.patch import pin_geometry
from fitness.scoring import Score, fitness_by_group, fitness_of, score_candidates
from search.guard import ShortGuardSettings, WindowNeedleSettings, group_scores, window_needle_violation

log = logging.getLogger("ropesearch")
Tag = TypeVar("Tag")
RAY_CONNECT_TIMEOUT_S = 5.0  # Ray itself retries a dead address for about a minute, silently


def check_ray_address(address: str | None) -> None:
    """A cluster named by address (or $RAY_ADDRESS) must answer within seconds."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RopeSearchError(f"workers.address {address!r}: give host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        from search.storage import EnvironmentFault

        raise EnvironmentFault(f"no Ray cluster answers at {address} ({err.strerror or type(err).__name__}); start "
                               "it (`ray start --head`) or leave out --address for a local one") from None


class WorkerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["ray", "local"] = "ray"
    count: int = Field(default=1, gt=0, le=1_024)
    cpus_per_worker: float = Field(default=1.0, ge=0, le=1_024)
    gpus_per_worker: float = Field(default=0.0, ge=0, le=64)
    address: str | None = None  # an existing Ray cluster ("auto", "ray://host:10001"); None starts a local one
    candidates_per_forward: int = Field(default=4, gt=0, le=1_024)
    documents_per_forward: int = Field(default=1, gt=0, le=1_024)
    max_restarts: int = Field(default=3, ge=0, le=100)  # per batch, when its actor dies
    in_flight: int = Field(default=2, gt=0, le=64)  # batches queued per worker: hides the driver's time between them


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker is built from, validated once by the config on the driver's side."""

    model: ModelSettings
    needles: NeedleSettings
    length: int  # the target window the needle documents are built at
    documents_per_forward: int = 1
    guard: ShortGuardSettings | None = None  # the short-window guard's text and length; None: not measured


@dataclass(frozen=True)
class TextSetup:
    """A short-factor worker: text windows (the search part) at lengths inside the window, and the
    in-window needle documents its guard scores against the reference candidate."""

    model: ModelSettings
    lengths: tuple[int, ...]
    windows: tuple[int, ...]  # one count per length
    worst_ratio: bool = False  # told value: the largest PPL ratio to the model's own over the lengths, not the PPL
    text: tuple[str, ...] = (GENERAL_ENGLISH,)  # text sources (fitness.general_text.text_windows)
    needles: NeedleSettings | None = None  # in-window needle documents; None: no needle guard
    needle_lengths: tuple[int, ...] = ()
    reference: RopeCandidate | None = None  # the guard's reference (ones: what the long stage alone exports)
    guard: WindowNeedleSettings | None = None


@dataclass(frozen=True)
class Batch:
    """One job as it goes to a worker: candidates scored together, on all documents or the given ones."""

    candidates: tuple[RopeCandidate, ...]
    documents: list[int] | None = None


@dataclass
class CandidateScore:
    """One candidate's score as it comes back from a worker."""

    value: float  # the told value: needle PPL (exp of the mean answer-token NLL) or, for TextWorker, text PPL or its worst ratio
    retrieval: float | None
    document_nll: list[float]
    document_exact: list[bool]
    seconds: float  # the batch's time, shared evenly by its candidates
    short_cost: float | None = None  # search.guard.SHORT_COST; None: not measured (no guard text, or a second stage)
    # each document's needle format, in the order of document_nll; empty for general-text windows
    document_format: list[str] = field(default_factory=list)
    # the short stage's in-window needles: {"LENGTH/FORMAT": {"needle_ppl", "retrieval"}} and the guard's
    # violation of them (search.guard.window_needle_violation); None: not measured
    window_needles: dict | None = None
    window_violation: float | None = None

    @classmethod
    def of(cls, score: Score, seconds: float, short_cost: float | None = None,
           document_format: Sequence[str] = ()) -> CandidateScore:
        return cls(score.fitness, score.retrieval, score.document_nll, score.document_exact, seconds, short_cost,
                   list(document_format))

    def then(self, second: CandidateScore) -> CandidateScore:
        """This first-stage score joined with the same candidate's score on the remaining documents."""
        joined = fitness_of(self.document_nll + second.document_nll, self.document_exact + second.document_exact)
        return CandidateScore.of(joined, self.seconds + second.seconds, self.short_cost,
                                 self.document_format + second.document_format)

    def by_format(self) -> dict[str, Score]:
        """Needle PPL and retrieval over the documents of each needle format, in first-seen order; computed
        here, from the documents, so a pruned search's two stages join like the overall score."""
        return fitness_by_group(self.document_format, self.document_nll, self.document_exact)


class ScoringWorker:
    """One model replica and its needle set; scores batches of candidates."""

    def __init__(self, setup: WorkerSetup):
        self.model, self.tokenizer = load_model(setup.model)
        pin_geometry(self.model)  # its config never changes here: read the geometry once, not per batch
        self.needles = build_needle_set(self.tokenizer, setup.needles, setup.length)
        self.documents_per_forward = setup.documents_per_forward
        self.guard_windows, self.guard_base = None, None
        if setup.guard is not None:  # the short-window guard's text: plain haystack at a short length
            window = geometry_from_config(self.model.config).original_window
            self.guard_windows = haystack_windows(self.tokenizer, setup.needles.haystack,
                                                  setup.guard.length or window, setup.guard.windows)
            self.guard_base = perplexity(self.model, self.guard_windows)

    def info(self) -> dict:
        device = next(self.model.parameters()).device
        return {"pid": os.getpid(), "device": str(device), "documents": len(self.needles)}

    def score(self, batch: Batch) -> list[CandidateScore]:
        """Scores of the batch's candidates on its documents (all when None)."""
        documents, candidates = batch.documents, list(batch.candidates)
        needles = self.needles if documents is None else self.needles.subset(documents)
        started = time.perf_counter()
        scores = score_candidates(self.model, needles, candidates, self.documents_per_forward)
        costs = [None] * len(scores)
        if self.guard_windows is not None and (documents is None or 0 in documents):  # not again in a 2nd stage
            costs = [ppl / self.guard_base - 1 for ppl in candidate_perplexities(self.model, self.guard_windows,
                                                                                  candidates)]
        seconds = (time.perf_counter() - started) / len(candidates)
        formats = needles.document_formats()
        return [CandidateScore.of(s, seconds, cost, formats) for s, cost in zip(scores, costs)]


class TextWorker:
    """One model replica and general-text windows; scores a batch of candidates by their perplexity
    (every window counts once, whatever its length) or, with `worst_ratio`, by the largest ratio of a
    length's perplexity to the model's own there, so no length pays for another. Either way its
    `short_cost` is that worst length's cost (ratio - 1), the figure the per-length bars are about."""

    def __init__(self, setup: TextSetup):
        self.model, self.tokenizer = load_model(setup.model)
        pin_geometry(self.model)
        self.windows = [text_windows(self.tokenizer, setup.text, n, count, part="search")
                        for n, count in zip(setup.lengths, setup.windows)]
        self.own_ppl = [math.exp(window_nll(self.model, ids).mean().item()) for ids in self.windows]
        self.worst_ratio = setup.worst_ratio
        self.guard, self.needle_sets, self.reference = setup.guard, {}, None
        if setup.needles is not None:
            self.needle_sets = {n: build_needle_set(self.tokenizer, setup.needles, n) for n in setup.needle_lengths}
            self.reference = self._window_needles([setup.reference])[0]

    def info(self) -> dict:
        return {"pid": os.getpid(), "device": str(next(self.model.parameters()).device),
                "documents": sum(len(ids) for ids in self.windows) + sum(map(len, self.needle_sets.values()))}

    def _window_needles(self, candidates: list[RopeCandidate]) -> list[dict]:
        by_length = {n: score_candidates(self.model, needles, candidates) for n, needles in self.needle_sets.items()}
        return [group_scores({n: fitness_by_group(self.needle_sets[n].document_formats(), scores[c].document_nll,
                                                  scores[c].document_exact)
                              for n, scores in by_length.items()})
                for c in range(len(candidates))]

    def score(self, batch: Batch) -> list[CandidateScore]:
        started = time.perf_counter()
        candidates = list(batch.candidates)
        by_length = [candidate_window_nll(self.model, ids, candidates) for ids in self.windows]
        nll = torch.cat(by_length, dim=1)
        needles = self._window_needles(candidates) if self.needle_sets else [None] * len(candidates)
        seconds = (time.perf_counter() - started) / len(candidates)
        scores = []
        for c, row in enumerate(nll):
            ratio = max(math.exp(n[c].mean().item()) / own for n, own in zip(by_length, self.own_ppl))
            told = ratio if self.worst_ratio else math.exp(row.mean().item())
            violation = None if needles[c] is None else window_needle_violation(needles[c], self.reference, self.guard)
            scores.append(CandidateScore(told, None, row.tolist(), [], seconds, short_cost=ratio - 1,
                                         window_needles=needles[c], window_violation=violation))
        return scores


WORKERS = {WorkerSetup: ScoringWorker, TextSetup: TextWorker}


@dataclass
class Job(Generic[Tag]):
    """A batch of candidates to score; `tag` is the caller's (the driver's asked trials, or a seed's name)
    and stays on the caller's side."""

    tag: Tag
    candidates: Sequence[RopeCandidate]
    documents: list[int] | None = None

    def batch(self) -> Batch:
        return Batch(tuple(self.candidates), self.documents)


@dataclass
class Outcome:
    job: Job
    scores: list[CandidateScore] | None
    error: str | None = None


class LocalPool:
    """One worker in this process."""

    def __init__(self, settings: WorkerSettings, setup: WorkerSetup | TextSetup):
        self.worker = WORKERS[type(setup)](setup)

    def run(self, jobs: deque[Job]) -> Iterator[Outcome]:
        while jobs:
            job = jobs.popleft()
            try:
                yield Outcome(job, self.worker.score(job.batch()))
            except Exception as err:  # one failed batch never stops the search
                yield Outcome(job, None, f"{type(err).__name__}: {err}")

    def close(self) -> None:
        pass


class RayPool:
    """`settings.count` Ray actors; the driver reads like the local version."""

    def __init__(self, settings: WorkerSettings, setup: WorkerSetup | TextSetup):
        import ray

        self.ray, self.settings = ray, settings
        if not ray.is_initialized():
            address = settings.address or os.environ.get("RAY_ADDRESS")
            kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address:
                check_ray_address(address)
                try:
                    ray.init(address=address, **kwargs)
                except ConnectionError as err:  # "auto" with no cluster running here
                    from search.storage import EnvironmentFault

                    raise EnvironmentFault(f"Ray address {address}: {_first_line(err)}") from None
            else:  # "local": a new cluster of our own, never whatever `ray start` left running here
                # on loopback, for this process alone: Ray's token authentication only adds a line to stderr
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                cpus = max(os.cpu_count() or 1, int(settings.count * settings.cpus_per_worker + 0.999))
                ray.init(address="local", num_cpus=cpus, **kwargs)
        self.actor_class = ray.remote(WORKERS[type(setup)]).options(
            num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker, max_restarts=0
        )
        self.setup = setup
        self.actors = [self._start() for _ in range(settings.count)]
        ray.get([a.info.remote() for a in self.actors])  # fail here, clearly, if a worker cannot load

    def _start(self):
        return self.actor_class.remote(self.setup)

    def run(self, jobs: deque[Job]) -> Iterator[Outcome]:
        """Keep `in_flight` jobs queued on every actor, so a GPU never waits for the driver's bookkeeping."""
        ray, queue = self.ray, jobs
        restarts: dict[int, int] = {}
        pending: dict = {}  # ref -> (actor index, the actor it went to, job)
        busy = [0] * len(self.actors)
        while queue or pending:
            for index in range(len(self.actors)):
                while queue and busy[index] < self.settings.in_flight:
                    job = queue.popleft()
                    pending[self.actors[index].score.remote(job.batch())] = (index, self.actors[index], job)
                    busy[index] += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            index, actor, job = pending.pop(done[0])
            current = actor is self.actors[index]  # False: sent to an actor that died and was replaced
            if current:
                busy[index] -= 1
            try:
                scores = ray.get(done[0])
            except ray.exceptions.RayActorError as err:  # the worker died: replace it, run its batches again
                if current:
                    log.warning("worker %d died (%s); restarted, its batches run again", index, _first_line(err))
                    self.actors[index] = self._start()
                    busy[index] = 0
                restarts[id(job)] = restarts.get(id(job), 0) + 1
                if restarts[id(job)] <= self.settings.max_restarts:
                    queue.appendleft(job)
                else:
                    yield Outcome(job, None, f"worker died {restarts[id(job)]} times: {_first_line(err)}")
                continue
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if getattr(err, "cause", None) is not None else err
                yield Outcome(job, None, f"{type(cause).__name__}: {_first_line(cause)}")
                continue
            yield Outcome(job, scores)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


POOLS = {"ray": RayPool, "local": LocalPool}


def make_pool(settings: WorkerSettings, setup: WorkerSetup | TextSetup):
    return POOLS[settings.backend](settings, setup)
