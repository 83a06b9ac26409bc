"""Two drivers of one study at the same moment, replayed step by step on the bundled model, real storage:
each slot ends with one COMPLETE trial whichever driver finishes first; a driver starting up never fails a
trial that another driver is asking right now; a driver waiting for a dead one's slot takes it over."""

import dataclasses
import socket
import subprocess
import threading
import time
from collections import deque

import pytest
from optuna.trial import TrialState

from search import driver, long_stage, runs
from search import trial_keys as keys
from search.liveness import Heartbeat, fail_interrupted
from search.slots import slot_of
from search.trial_keys import DRIVER, DUPLICATE, ERROR, HEARTBEAT, INTERRUPTED, SLOT
from search.workers import Job, make_pool
from tests.search_helpers import write_config

PRUNING = {"pruning.name": "earlier_trials", "pruning.documents": 2, "pruning.min_reference": 4}


def two_drivers(tmp_path, **changes):
    config = runs.load_search_config(write_config(tmp_path, **{"workers.candidates_per_forward": 1}, **changes))
    run_dir = runs.create(config, tmp_path / "runs")
    first = long_stage.open_context(run_dir, config)
    second = dataclasses.replace(long_stage.open_context(run_dir, config), driver_id="elsewhere:1:0")
    return first, second


def settle_all(ctx, pool, outcome) -> int:
    """Settle an outcome and, under pruning, score and settle its second stage too: evaluations settled."""
    settled, follow_up = driver.settle(ctx, outcome)
    if follow_up is not None:
        settled += settle_all(ctx, pool, next(pool.run(deque([follow_up]))))
    return settled


@pytest.mark.parametrize("changes", [{}, PRUNING], ids=["whole", "pruning"])
def test_a_slot_taken_by_both_drivers_is_completed_once_whoever_finishes_first(tmp_path, changes):
    first, second = two_drivers(tmp_path, **changes)
    [mine] = driver.next_jobs(first, limit=1)
    [theirs] = driver.next_jobs(second, limit=1)
    earlier, later = mine.tag[0].trial, theirs.tag[0].trial
    # the race: the second driver read the book before the first one's slot was written, so it took the
    # same slot (and, as the proposals are the same on both sides, the same candidate)
    keys.set_trial_system_attr(second.study, later, SLOT, list(slot_of(first.study.trials[earlier.number])))
    theirs = Job([driver.Asked(later, mine.tag[0].candidate)], list(mine.candidates), mine.documents)
    pool = make_pool(first.config.workers, first.setup)
    outcomes = list(pool.run(deque([theirs, mine])))  # the later trial finishes first
    assert driver.settle(second, outcomes[0]) == (0, None)  # stepped back: no second stage either
    assert settle_all(first, pool, outcomes[1]) == 1

    trials = {t.number: t for t in first.study.get_trials()}
    assert trials[earlier.number].state == TrialState.COMPLETE
    assert trials[later.number].state == TrialState.FAIL
    assert trials[later.number].system_attrs[ERROR] == f"{DUPLICATE} of trial {earlier.number}"
    state = first.slots.state(first.study)
    assert 0 not in state.open_slots and 1 in state.open_slots  # a duplicate is no failed attempt


def test_a_driver_starting_up_leaves_a_trial_being_asked_alone(tmp_path):
    first, second = two_drivers(tmp_path)
    Heartbeat(first.study, first.driver_id)()  # the first driver runs (this process)
    asked = first.study.ask(first.space.distributions())  # its driver has not written its name yet
    assert fail_interrupted(second.study, second.driver_id) == 0
    assert first.study.trials[asked.number].state == TrialState.RUNNING


def test_a_trial_whose_driver_died_in_the_ask_is_failed_when_no_other_driver_lives(tmp_path):
    first, second = two_drivers(tmp_path)
    keys.set_study_system_attr(first.study, HEARTBEAT + "vm:999999999:0", 0.0)  # long dead
    asked = first.study.ask(first.space.distributions())
    assert fail_interrupted(second.study, second.driver_id) == 1
    assert first.study.trials[asked.number].system_attrs[ERROR] == INTERRUPTED


def test_a_driver_waiting_for_another_ones_slot_takes_it_over_when_that_driver_dies(tmp_path):
    first, second = two_drivers(tmp_path)
    other = subprocess.Popen(["sleep", "600"])  # the other driver: alive on this host while this runs
    held = first.study.ask(first.space.distributions())
    keys.set_trial_system_attr(first.study, held, DRIVER, f"{socket.gethostname()}:{other.pid}:0")
    done = []
    waiting = threading.Thread(target=lambda: done.append(driver.search(second, stop_after=8, quiet=True)),
                               daemon=True)
    waiting.start()
    deadline = time.time() + 120
    while driver.completed(first) < 7 and time.time() < deadline:  # every slot of generation 0 but the held one
        time.sleep(0.2)
    other.kill()
    other.wait()
    waiting.join(timeout=120)
    assert done and done[0]["evaluated"] == 8
    assert first.study.trials[held.number].system_attrs[ERROR] == INTERRUPTED
