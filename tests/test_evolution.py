"""The evolutionary sampler on a real Optuna study: deterministic proposals, no duplicates, slots."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from fitness.geometry import RopeGeometry
from search import trial_keys as keys
from search.evolution import EvolutionarySampler, EvolutionSettings
from search.slots import slot_of
from search.space import RopeSpace, SpaceSettings
from search.trial_keys import ERROR, INTERRUPTED

GEOMETRY = RopeGeometry(rotary_dim=64, base=10000.0, original_window=256, head_dim=64)
SETTINGS = EvolutionSettings(population=12, parents=4, mutations=3, crossovers=3, generations=4)


def objective(candidate):
    """A smooth stand-in *objective* for sampler mechanics only (the product scores real models)."""
    return (
        sum((math.log(f) - math.log(4.5)) ** 2 for f in candidate.long_factors[13:]) + candidate.params["critical_dim"]
    )


def run_study(tmp_path, name, seed=0, settings=SETTINGS, storage=None):
    space = RopeSpace(GEOMETRY, 1024, SpaceSettings())
    sampler = EvolutionarySampler(space, settings, seed=seed)
    storage = storage or f"sqlite:///{tmp_path / (name + '.db')}"
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True)
    while not (state := sampler.slots.state(study)).finished:
        for _ in state.open_slots:
            trial = study.ask(space.distributions())
            study.tell(trial, objective(space.decode(trial.params)))
    return study, sampler, space


def signature(study):
    rows = []
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        rows.append((slot_of(t), tuple(sorted(t.params.items())), t.value))
    return sorted(rows)


def test_generations_and_determinism(tmp_path):
    first, sampler, space = run_study(tmp_path, "a")
    second, _, _ = run_study(tmp_path, "b")
    other, _, _ = run_study(tmp_path, "c", seed=1)
    assert len(first.trials) == sampler.slots.total == 12 + 3 * 6
    assert signature(first) == signature(second)
    assert signature(first) != signature(other)


def test_no_candidate_is_evaluated_twice(tmp_path):
    study, _, space = run_study(tmp_path, "d")
    keys = [space.key(t.params) for t in study.trials]
    assert len(keys) == len(set(keys))


def test_seeds_come_first_and_children_improve(tmp_path):
    study, sampler, space = run_study(tmp_path, "e", settings=SETTINGS.model_copy(update={"generations": 8}))
    by_generation = {}
    for t in study.trials:
        by_generation.setdefault(slot_of(t)[0], []).append(t.value)
    assert min(by_generation[7]) <= min(by_generation[0])
    first = study.trials[0]
    assert space.key(first.params) == space.key(sampler.seeds()[0])


def test_failed_slots_are_retried_then_given_up_and_interrupted_ones_are_no_attempt(tmp_path):
    space = RopeSpace(GEOMETRY, 1024, SpaceSettings())
    sampler = EvolutionarySampler(space, SETTINGS, seed=0)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'f.db'}", study_name="f", sampler=sampler)
    trial = study.ask(space.distributions())
    assert sampler.slots.state(study).running == 1 and 0 not in sampler.slots.state(study).open_slots
    keys.set_trial_system_attr(study, trial, ERROR, INTERRUPTED)
    study.tell(trial, state=TrialState.FAIL)
    for attempt in range(SETTINGS.max_attempts):
        assert sampler.slots.state(study).open_slots[0] == 0
        again = study.ask(space.distributions())
        assert again.params == trial.params  # the same proposal for the same slot
        keys.set_trial_system_attr(study, again, ERROR, "RuntimeError: boom")
        study.tell(again, state=TrialState.FAIL)
    assert 0 not in sampler.slots.state(study).open_slots  # given up after max_attempts real failures


def test_journal_storage_works_too(tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log")))
    study, _, _ = run_study(tmp_path, "g", storage=storage)
    reference, _, _ = run_study(tmp_path, "h")
    assert signature(study) == signature(reference)


def test_optuna_samplers_share_the_space(tmp_path):
    space = RopeSpace(GEOMETRY, 1024, SpaceSettings())
    for sampler in (optuna.samplers.TPESampler(seed=0), optuna.samplers.CmaEsSampler(seed=0),
                    optuna.samplers.RandomSampler(seed=0)):
        study = optuna.create_study(sampler=sampler)
        for _ in range(12):
            trial = study.ask(space.distributions())
            candidate = space.decode(trial.params)
            assert list(candidate.long_factors) == sorted(candidate.long_factors)
            study.tell(trial, objective(candidate))


def test_an_earlier_winner_joins_generation_zero_stretched(tmp_path):
    """LongRoPE's progressive start: factors found at 2x seed the 4x search, every factor doubled, scored
    in generation 0 before the baselines."""
    from fitness.baselines import critical_dim_shape
    from fitness.factors import make_candidate
    from search.evolution import stretched

    space = RopeSpace(GEOMETRY, 1024, SpaceSettings())
    tail = [2.0 + 0.05 * i for i in range(GEOMETRY.pairs - 14)]  # a searched-like rising tail at 2x
    earlier = make_candidate(GEOMETRY, 512, critical_dim_shape(GEOMETRY.pairs, 14, tail[0], tail),
                             attention_factor=1.1, method="searched", params={"critical_dim": 14})
    longer = stretched(earlier, 1024)
    assert longer.long_factors == tuple(2 * f for f in earlier.long_factors) and longer.target_window == 1024
    sampler = EvolutionarySampler(space, SETTINGS, earlier_winners=(earlier,))
    plain = EvolutionarySampler(space, SETTINGS)
    assert sampler.seeds() == [space.encode(longer), *plain.seeds()]
    assert space.key(space.encode(longer)) not in {space.key(seed) for seed in plain.seeds()}
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'w.db'}", study_name="w", sampler=sampler)
    trial = study.ask(space.distributions())
    assert slot_of(study.trials[0]) == (0, 0) and space.key(trial.params) == space.key(space.encode(longer))


@pytest.mark.parametrize("bad", [{"mutations": 0, "crossovers": 0}, {"population": 1}])
def test_bad_settings(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EvolutionSettings(**bad)
