"""CMA-ES by generations, as an Optuna sampler: the short-factor stage's search.

Optuna's own `CmaEsSampler` samples each trial from the tells it has seen so far. A driver keeps
several jobs in flight, so it asks a dozen trials before the first is told, and those fall back to
independent random sampling; after a resume its random state starts again from the seed. Here, as in
the evolution (search/evolution.py), every trial fills a (generation, slot) of `search.slots`:
generation 0 holds the seeds (short = long^p), and generation g >= 1 is one CMA-ES population. Its
proposals are a pure function of the seed and the finished trials of the generations before it: the
optimizer is rebuilt by replaying its asks and tells from the study, so the history does not depend on
the number of workers, on which driver asked, or on how often the driver was killed.

CMA-ES (`cmaes.CMA`) runs on the raw factors, one coordinate per pair, inside `[low, high]`; what a
trial stores is the space's repair of the point it asked (sorted, in `mode: monotone`), and CMA-ES is
told the rank of each point of its population (feasible first, then the lower value): it only ever
uses the order, so ranks are what it sees anyway, and infeasible points rank last without a penalty
weight to tune.
"""

from __future__ import annotations

import copy
import math

import numpy as np
from cmaes import CMA
from optuna.trial import TrialState

from search.guard import rank
from search.slots import GenerationSlots, SlotSampler, slot_of
from search.space import ShortSpace


def default_population(dimensions: int) -> int:
    """CMA-ES's own default population: 4 + floor(3 ln n)."""
    return 4 + math.floor(3 * math.log(dimensions))


def generations_for(evaluations: int, seeds: int, population: int) -> int:
    """Enough generations for `evaluations` trials: the seeds' generation, then whole populations."""
    return 1 + max(1, math.ceil((evaluations - seeds) / population))


class GenerationalCmaEs(SlotSampler):
    def __init__(self, space: ShortSpace, seeds: list[dict], sigma: float, population: int | None,
                 generations: int, seed: int = 0, max_attempts: int = 2):
        super().__init__(seed)
        self.space, self.seeds, self.sigma, self.seed = space, [space.repair(s) for s in seeds], sigma, seed
        self.names = list(space.distributions())
        self.population = population or default_population(len(self.names))
        self.bounds = np.array([[space.low, space.high]] * len(self.names))
        self._ready: dict[int, CMA] = {}  # generation -> the optimizer about to ask it
        self._proposals: dict[int, list[dict]] = {}
        self.slots = GenerationSlots(self.generation_size, generations, max_attempts, self.proposals)

    def generation_size(self, generation: int) -> int:
        return len(self.seeds) if generation == 0 else self.population

    # ---------------------------------------------------------------- proposals
    def proposals(self, study, generation: int) -> list[dict]:
        if generation not in self._proposals:
            if generation == 0:
                self._proposals[0] = list(self.seeds)
            else:
                asked = self._asks(self._optimizer_before(study, generation), generation)
                self._proposals[generation] = [self._params(x) for x in asked]
        return self._proposals[generation]

    def _asks(self, optimizer: CMA, generation: int) -> list[np.ndarray]:
        """The generation's population. Its random numbers come from (seed, generation) alone: a copied
        `CMA` draws a fresh, unseeded generator, so its own state cannot carry them."""
        optimizer.reseed_rng(np.random.SeedSequence([self.seed, generation]).generate_state(1)[0])
        return [optimizer.ask() for _ in range(self.population)]

    def _params(self, x: np.ndarray) -> dict:
        return self.space.repair(dict(zip(self.names, (float(v) for v in x))))

    def _optimizer_before(self, study, generation: int) -> CMA:
        """A copy of the optimizer about to ask `generation`: generation 1 starts at the best seed; each
        later one replays the asks of the generation before it and tells it their ranks."""
        if generation not in self._ready:
            if generation == 1:
                keys = self._rank_key(study, 0)
                best = min(range(len(self.seeds)), key=lambda slot: (keys.get(slot, _LAST), slot))
                mean = np.array([self.seeds[best][name] for name in self.names])
                optimizer = CMA(mean=np.clip(mean, self.space.low, self.space.high), sigma=self.sigma,
                                bounds=self.bounds, seed=self.seed, population_size=self.population)
            else:
                optimizer = self._optimizer_before(study, generation - 1)
                asked = self._asks(optimizer, generation - 1)
                keys = self._rank_key(study, generation - 1)
                order = sorted(range(self.population), key=lambda slot: (keys.get(slot, _LAST), slot))
                ranks = {slot: float(position) for position, slot in enumerate(order)}
                optimizer.tell([(asked[slot], ranks[slot]) for slot in range(self.population)])
            self._ready[generation] = optimizer
        return copy.deepcopy(self._ready[generation])

    @staticmethod
    def _rank_key(study, generation: int) -> dict[int, tuple]:
        """slot -> (violation, value) of its complete trial; a slot given up after failures has none and
        ranks last. Ties go to the lower slot, never to a trial number, which a resume may change."""
        keys: dict[int, tuple] = {}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            slot = slot_of(trial)
            if slot is not None and slot[0] == generation:
                keys.setdefault(slot[1], rank(trial))
        return keys


_LAST = (math.inf, math.inf)
