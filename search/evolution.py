"""LongRoPE2's evolutionary search as an Optuna sampler.

Generation 0 is the population: seeds (YaRN's ramp, PI, NTK, critical-dim NTK at every critical
pair of the range, and the winners of earlier searches at shorter targets, stretched: LongRoPE's
progressive start) and random points. Each later generation is `mutations + crossovers` children
of the best `parents` found so far. Every trial is a (generation, slot) pair stored in its system
attributes; the proposals of generation g are a pure function of the seed, g and the finished
trials of earlier generations, so they need no RNG state to resume and do not depend on how many
workers score them or how often the driver was killed. The slots themselves are kept by
`search.slots`; only the study calls this sampler.
"""

from __future__ import annotations

import random

from optuna.trial import FrozenTrial
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fitness.baselines import baseline
from fitness.factors import RopeCandidate
from search.guard import SHORT_COST
from search.slots import GenerationSlots, SlotSampler, finished_history, pruned_before
from search.space import RopeSpace


class EvolutionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    population: int = Field(default=64, gt=1, le=10_000)
    parents: int = Field(default=32, gt=1, le=10_000)
    mutations: int = Field(default=16, ge=0, le=10_000)
    crossovers: int = Field(default=16, ge=0, le=10_000)
    mutation_prob: float = Field(default=0.3, gt=0, le=1)
    mutation_step: float = Field(default=0.05, gt=0)  # std of a factor step, as a fraction of s
    critical_dim_prob: float = Field(default=0.3, ge=0, le=1)
    generations: int = Field(default=40, gt=0, le=100_000)
    # factor files or run folders of earlier searches of this model at a target no longer than this one:
    # each joins generation 0 stretched to this target (`stretched`), as LongRoPE seeded its 2048k search
    # from the 256k one
    seed_factors: list[str] = Field(default_factory=list, max_length=64)
    max_attempts: int = Field(default=2, gt=0, le=100)  # evaluations of a slot that may fail before it is given up

    @model_validator(mode="after")
    def _children(self) -> EvolutionSettings:
        if self.mutations + self.crossovers == 0:
            raise ValueError("mutations + crossovers must be at least 1")
        return self


def attention_edge(history: list[FrozenTrial], max_cost: float) -> float | None:
    """The attention factor above 1 at which the short guard's cost reaches `max_cost`, interpolated between
    the largest factor measured inside the guard and the next one measured over it; None without both.
    In the long stage the cost is the attention factor's alone (no short factors inside the window) and
    grows faster than linearly above 1, so the chord crosses `max_cost` at or below the true edge."""
    cost = {t.params["attention_factor"]: t.user_attrs[SHORT_COST] for t in history
            if "attention_factor" in t.params and SHORT_COST in t.user_attrs}
    inside = [a for a, c in cost.items() if a >= 1.0 and c <= max_cost]
    if not inside:
        return None
    a_in = max(inside)
    over = [a for a, c in cost.items() if a > a_in and c > max_cost]
    if not over:
        return None
    a_out = min(over)
    return a_in + (max_cost - cost[a_in]) * (a_out - a_in) / (cost[a_out] - cost[a_in])


def stretched(candidate: RopeCandidate, target_window: int) -> RopeCandidate:
    """Factors found for a shorter target, for `target_window`: every factor times the ratio of the targets
    (the pairs above the critical one keep their place in [s, upper s]; those below are NTK's in the
    space and rebuilt there), the same critical pair and attention factor."""
    ratio = target_window / candidate.target_window
    return candidate.model_copy(update={
        "target_window": target_window,
        "long_factors": tuple(f * ratio for f in candidate.long_factors),
        "short_factors": None,
        "method": f"stretched {candidate.method}",
    })


class EvolutionarySampler(SlotSampler):
    def __init__(self, space: RopeSpace, settings: EvolutionSettings, seed: int = 0,
                 earlier_winners: tuple[RopeCandidate, ...] = (), attention_limit: float | None = None):
        super().__init__(seed)
        self.space, self.settings, self.seed = space, settings, seed
        # the short guard's max_cost when children's attention factors are held below its edge
        self.attention_limit, self._edge = attention_limit, None
        self.earlier_winners = tuple(stretched(c, space.target_window) for c in earlier_winners)
        self._proposals: dict[int, list[dict]] = {}
        # the book of slots the driver asks; the sampler itself only learns which slot a new trial fills
        self.slots = GenerationSlots(self.generation_size, settings.generations, settings.max_attempts,
                                     self.proposals)

    def generation_size(self, generation: int) -> int:
        return self.settings.population if generation == 0 else self.settings.mutations + self.settings.crossovers

    # ---------------------------------------------------------------- proposals
    def proposals(self, study, generation: int) -> list[dict]:
        if generation not in self._proposals:
            history = finished_history(study, generation)
            pruned = pruned_before(study, generation)  # never proposed again either
            seen = {self.space.key(t.params) for t in history} | {self.space.key(t.params) for t in pruned}
            rng = random.Random(f"evolution:{self.seed}:{generation}")
            if generation == 0:
                self._edge = None
                children = self._initial_population(rng, seen)
            else:
                self._edge = None if self.attention_limit is None else attention_edge(history, self.attention_limit)
                children = self._children(rng, history, seen)
            self._proposals[generation] = children
        return self._proposals[generation]

    def _novel(self, params: dict, seen: set) -> dict | None:
        params = self.space.repair(params)
        if self._edge is not None and params["attention_factor"] > self._edge:
            params["attention_factor"] = self._edge  # over it, a child could not win whatever its factors
        key = self.space.key(params)
        if key in seen:
            return None
        seen.add(key)
        return params

    def seeds(self) -> list[dict]:
        space = self.space
        g, window = space.geometry, space.target_window
        seeds = [space.encode(baseline(name, g, window)) for name in ("yarn", "pi", "ntk")]
        if space.critical:
            low, high = space.critical_range
            seeds += [space.encode(baseline("critical_ntk", g, window, critical_dim=c)) for c in range(low, high + 1)]
            theory = min(max(g.critical_dim(), low), high)
            for stretch in (1.25, 1.5, 2.0):
                factor = min(space.scale * stretch, space.factor_high)
                candidate = baseline("critical_ntk", g, window, critical_dim=theory, critical_factor=factor)
                seeds.append(space.encode(candidate))
        # earlier winners first: generation 0 keeps the first `population` seeds
        return [space.encode(candidate) for candidate in self.earlier_winners] + seeds

    def _random(self, rng: random.Random) -> dict:
        space = self.space
        params = {f"f{i}": space.factor_low + (space.factor_high - space.factor_low) * rng.random() ** 2
                  for i in range(space.first_searched, space.pairs)}
        if space.critical:
            params["critical_dim"] = rng.randint(*space.critical_range)
        if space.settings.search_attention:
            dist = space.distributions()["attention_factor"]
            params["attention_factor"] = rng.uniform(dist.low, dist.high)
        return params

    def _fill(self, rng: random.Random, make, count: int, seen: set) -> list[dict]:
        children = []
        while len(children) < count:
            for _ in range(100):
                if (child := self._novel(make(), seen)) is not None:
                    break
            else:  # the neighbourhood is exhausted: a random point keeps the search moving
                while (child := self._novel(self._random(rng), seen)) is None:
                    pass
            children.append(child)
        return children

    def _initial_population(self, rng: random.Random, seen: set) -> list[dict]:
        population = [p for p in (self._novel(s, seen) for s in self.seeds()) if p is not None]
        population = population[: self.settings.population]
        return population + self._fill(rng, lambda: self._random(rng), self.settings.population - len(population), seen)

    def _children(self, rng: random.Random, history: list[FrozenTrial], seen: set) -> list[dict]:
        if not history:  # everything so far failed: start again from random points
            return self._fill(rng, lambda: self._random(rng), self.generation_size(1), seen)
        parents = [self.space.repair(t.params) for t in history[: self.settings.parents]]
        mutants = self._fill(rng, lambda: self._mutate(rng, rng.choice(parents)), self.settings.mutations, seen)
        crossed = self._fill(
            rng, lambda: self._cross(rng, *rng.sample(parents, 2) if len(parents) > 1 else parents * 2),
            self.settings.crossovers, seen,
        )
        return mutants + crossed

    def _mutate(self, rng: random.Random, parent: dict) -> dict:
        space, settings = self.space, self.settings
        child = dict(parent)
        if space.critical and rng.random() < settings.critical_dim_prob:
            child["critical_dim"] = parent["critical_dim"] + rng.choice((-1, 1))
        for i in range(space.first_searched, space.pairs):
            if rng.random() < settings.mutation_prob:
                child[f"f{i}"] = parent[f"f{i}"] + rng.gauss(0.0, settings.mutation_step * space.scale)
        if space.settings.search_attention and rng.random() < settings.mutation_prob:
            child["attention_factor"] = parent["attention_factor"] * (1 + rng.gauss(0.0, settings.mutation_step))
        return child

    def _cross(self, rng: random.Random, first: dict, second: dict) -> dict:
        return {name: (first if rng.random() < 0.5 else second)[name] for name in first}
