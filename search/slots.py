"""Which generation and slot a trial fills, which slots are open, running, settled or pruned: one owner.

The evolution numbers its candidates: generation g has a fixed number of slots, and each slot is
settled by one trial (complete or pruned). A slot is stored on its trial as one system attribute, so
any driver of the study (and a resumed one) reads the same book from storage alone. The driver asks
this book what to score next; the evolutionary sampler asks it only which slot a new trial fills.
Optuna's own samplers have no slots: `NoSlots` asks plain trials, and the study decides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from search import trial_keys as keys
from search.guard import rank
from search.trial_keys import DUPLICATE, ERROR, GENERATION, INTERRUPTED, SLOT

NO_SLOT = -1  # asked when another driver had just taken the last open slot

SETTLED = (TrialState.COMPLETE, TrialState.PRUNED)


def slot_of(trial: FrozenTrial) -> tuple[int, int] | None:
    attrs = trial.system_attrs
    return tuple(attrs[SLOT]) if SLOT in attrs else None


@dataclass
class SlotState:
    generation: int  # the first generation with unsettled slots (== generations when the search is done)
    open_slots: list[int]  # slots to ask now
    running: int  # slots being evaluated (here or by another driver)

    @property
    def finished(self) -> bool:
        return not self.open_slots and not self.running


class Taken(NamedTuple):
    """One row of a group to score: its trial (None: settled already, scored again only so the batch is
    the same whichever slots were left open), its parameters, and whether it goes past a first stage."""

    trial: object | None
    params: dict
    goes_on: bool = True


def finished_history(study, before_generation: int) -> list[FrozenTrial]:
    """One complete trial per slot of the generations before `before_generation`, best first."""
    chosen: dict[tuple[int, int], FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        slot = slot_of(trial)
        if slot and slot[0] < before_generation and (slot not in chosen or trial.number < chosen[slot].number):
            chosen[slot] = trial
    return sorted(chosen.values(), key=lambda t: (*rank(t), slot_of(t)))  # feasible first


def pruned_before(study, generation: int) -> list[FrozenTrial]:
    """Trials pruned in generations before `generation`: never proposed again."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return [t for t in trials if (slot := slot_of(t)) and slot[0] < generation]


def is_earlier(other: FrozenTrial, trial: FrozenTrial) -> bool:
    """Settled before `trial` was proposed: an earlier generation, or without slots an earlier number."""
    mine, theirs = slot_of(trial), slot_of(other)
    if mine is not None and theirs is not None:
        return theirs[0] < mine[0]
    return other.number < trial.number


def _fail(study, trial, error: str) -> None:
    keys.set_trial_system_attr(study, trial, ERROR, error)
    study.tell(trial, state=TrialState.FAIL)


class NoSlots:
    """Optuna's own samplers: no generations; each ask sees the latest tells."""

    total = None

    def state(self, study) -> None:
        return None

    def finished(self, study) -> bool:
        return True

    def take(self, study, ask: Callable, limit: int, k: int, pruning: bool) -> list[list[Taken]]:
        # `limit` is at most one job's worth, so this is one group
        return [[Taken(trial, trial.params) for trial in (ask() for _ in range(limit))]]


class GenerationSlots:
    """The book of a sampler that works by generations (the evolution, generational CMA-ES).
    `generation_size(g)` slots in generation g, `generations` in all; `propose(study, generation)` is the
    generation's list of parameters (the sampler's pure function of the seed and the earlier generations);
    a slot is given up after `max_attempts` failed evaluations."""

    def __init__(self, generation_size: Callable[[int], int], generations: int, max_attempts: int,
                 propose: Callable[[object, int], list[dict]]):
        self.generation_size, self.generations, self.max_attempts = generation_size, generations, max_attempts
        self.propose = propose

    @property
    def total(self) -> int:
        return sum(self.generation_size(g) for g in range(self.generations))

    def state(self, study) -> SlotState:
        by_slot = defaultdict(list)
        for trial in study.get_trials(deepcopy=False):
            if (slot := slot_of(trial)) is not None:
                by_slot[slot].append(trial)
        for generation in range(self.generations):
            open_slots, running = [], 0
            for slot in range(self.generation_size(generation)):
                trials = by_slot.get((generation, slot), [])
                states = {t.state for t in trials}
                if states & set(SETTLED):
                    continue
                if states & {TrialState.RUNNING, TrialState.WAITING}:
                    running += 1
                    continue
                failures = [
                    t for t in trials if not str(t.system_attrs.get(ERROR, "")).startswith((INTERRUPTED, DUPLICATE))
                ]
                if len(failures) < self.max_attempts:
                    open_slots.append(slot)
            if open_slots or running:
                return SlotState(generation, open_slots, running)
        return SlotState(self.generations, [], 0)

    def finished(self, study) -> bool:
        return self.state(study).finished

    def assign(self, study, trial) -> tuple[int, int]:
        """The slot a new trial fills (called by the sampler as the study asks)."""
        state = self.state(study)
        # another driver may have taken the last open slots since this one looked: slot -1 says "none left"
        assigned = (state.generation, state.open_slots[0] if state.open_slots else NO_SLOT)
        keys.set_trial_system_attr(study, trial, SLOT, list(assigned))
        keys.set_trial_user_attr(study, trial, GENERATION, assigned[0])  # for display; SLOT is the book
        return assigned

    def pruned(self, study, generation: int) -> set[int]:
        trials = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        return {slot[1] for t in trials if (slot := slot_of(t)) and slot[0] == generation}

    def take(self, study, ask: Callable, limit: int, k: int, pruning: bool) -> list[list[Taken]] | None:
        """Ask the open slots of the current generation, a whole group of k slots at a time (a group is
        always scored together, so its numbers never depend on which slots a crash left open, or on which
        driver took them). None: nothing can be asked now (the search is finished, or its generation is
        being finished here or by another driver)."""
        state = self.state(study)
        if not state.open_slots:
            return None
        by_slot = {}
        for _ in _whole_groups(state.open_slots, k, limit):
            trial = ask()
            _, slot = keys.trial_system_attrs(study, trial)[SLOT]
            if slot == NO_SLOT:
                _fail(study, trial, f"{DUPLICATE}: no open slot left")
                break
            by_slot[slot] = trial
        _drop_duplicates(study, state.generation, by_slot)
        if not by_slot:
            return None
        proposals = self.propose(study, state.generation)
        pruned = self.pruned(study, state.generation) if pruning else set()
        groups = []
        for group in sorted({slot // k for slot in by_slot}):
            slots = range(group * k, min((group + 1) * k, len(proposals)))
            groups.append([Taken(by_slot.get(s), proposals[s], s not in pruned) for s in slots])
        return groups


Slots = GenerationSlots | NoSlots  # the driver's view: take, state, finished, total


def _whole_groups(open_slots: list[int], k: int, limit: int) -> list[int]:
    """Open slots of the first groups of k slots: whole groups while they fit in `limit` (and at least
    part of one), so a driver does not score slots it has not asked, only to see them asked again."""
    groups: dict[int, list[int]] = {}
    for slot in open_slots:
        groups.setdefault(slot // k, []).append(slot)
    taken: list[int] = []
    for slots in groups.values():
        if taken and len(taken) + len(slots) > limit:
            break
        taken += slots[: limit - len(taken)]
    return taken


def _drop_duplicates(study, generation: int, by_slot: dict) -> None:
    """Two drivers may take the same slot at the same moment; the lower trial number keeps it."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, *SETTLED)):
        slot = slot_of(trial)
        if slot and slot[0] == generation and slot[1] in by_slot and trial.number < by_slot[slot[1]].number:
            _fail(study, by_slot.pop(slot[1]), f"{DUPLICATE} of trial {trial.number}")


def step_back_if_duplicate(study, trial) -> bool:
    """Fail `trial` as a duplicate if a lower-numbered trial holds its slot (running or settled); True if so.
    Called again just before a trial settles: at the ask, the other driver's trial may exist without its
    slot written yet, so both drivers kept the slot and scored it."""
    slot = keys.trial_system_attrs(study, trial).get(SLOT)
    if slot is None:
        return False
    for other in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, *SETTLED)):
        if other.number < trial.number and slot_of(other) == tuple(slot):
            _fail(study, trial, f"{DUPLICATE} of trial {other.number}")
            return True
    return False


class SlotSampler(BaseSampler):
    """The Optuna side of a sampler that works by generations (the evolution, CMA-ES): each new trial is
    given a slot of `self.slots`, and its parameters are that slot's proposal, `self.proposals(study,
    generation)[slot]`, a pure function the subclass writes. Only the study calls these methods."""

    space = None  # the subclass's search space: its distributions are the relative search space
    slots: GenerationSlots

    def __init__(self, seed: int):
        self._assigned: dict[int, tuple[int, int]] = {}
        self._fallback = RandomSampler(seed=seed)

    def proposals(self, study, generation: int) -> list[dict]:
        raise NotImplementedError

    def infer_relative_search_space(self, study, trial):
        return self.space.distributions()

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self._assigned[keys.trial_id(trial)] = self.slots.assign(study, trial)

    def sample_relative(self, study, trial: FrozenTrial, search_space) -> dict:
        generation, slot = self._assigned.pop(keys.trial_id(trial))
        return {} if slot == NO_SLOT else dict(self.proposals(study, generation)[slot])

    def sample_independent(self, study, trial, param_name, param_distribution):
        # only a trial that found no open slot gets here; it is failed as a duplicate, never scored
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)
