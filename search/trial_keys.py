"""Every key the project writes into Optuna storage, and the one wrapper of Optuna's private calls.

Optuna's public API sets a trial's user attributes through a live `Trial` and a study's through the
study; a driver also has to write system attributes (which the dashboard hides) and attributes of
trials it holds only as frozen records, from other processes, after the fact. Those calls go through
`study._storage` with `_study_id` / `_trial_id`: private names, so they stand here alone, and an
Optuna release that moves them breaks one file.

Trial system attributes (the book the drivers share):
    SLOT            [generation, slot] of a sampler that works by generations (search.slots)
    DRIVER          host:pid:start of the driver that asked the trial
    ERROR           why an evaluation failed ("interrupted", "duplicate ..." or the exception)
    CONSTRAINTS     Optuna's own key: constraint values, <= 0 feasible (search.guard)
Trial user attributes (shown by optuna-dashboard): GENERATION, SHORT_COST, WINDOW_NEEDLES, "retrieval",
    "seconds", "document_nll", "ppl:FORMAT", "retrieval:FORMAT"
Study system attributes: CONFIG (the config a study was created with), LONG_CANDIDATE (the short
    stage's long factors), HEARTBEAT + driver id (liveness)
Study user attributes: BASELINES (each seed's scores), STOPPED (a stop by the clock)
"""

from __future__ import annotations

from typing import Any

# trial system attributes
SLOT = "ropesearch:slot"  # one attribute, so another driver never sees half of it
DRIVER = "ropesearch:driver"
ERROR = "ropesearch:error"
CONSTRAINTS = "constraints"
# trial user attributes
GENERATION = "generation"  # the slot's generation again: optuna-dashboard shows only user attributes
SHORT_COST = "short_cost"
WINDOW_NEEDLES = "window_needles"  # the short stage's in-window needle scores, per "LENGTH/FORMAT" group
# study system attributes
CONFIG = "ropesearch:config"
LONG_CANDIDATE = "ropesearch:long_candidate"
HEARTBEAT = "ropesearch:heartbeat:"  # + driver id
# study user attributes
BASELINES = "baselines"
STOPPED = "ropesearch:stopped"

# what an ERROR begins with when the failure was no attempt at the candidate
INTERRUPTED = "interrupted"  # its driver died: the slot is asked again
DUPLICATE = "duplicate"  # two drivers took one slot at once: the later trial steps back


def trial_id(trial) -> int:
    return trial._trial_id


def set_trial_system_attr(study, trial, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial_id(trial), key, value)


def set_trial_user_attr(study, trial, key: str, value: Any) -> None:
    study._storage.set_trial_user_attr(trial_id(trial), key, value)


def trial_system_attrs(study, trial) -> dict:
    """As stored now, not as the (possibly stale) trial object says."""
    return study._storage.get_trial_system_attrs(trial_id(trial))


def fail_trial(study, trial) -> None:
    """Mark a trial failed without telling the study (a dead driver's RUNNING trial, from another process)."""
    from optuna.trial import TrialState

    study._storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)


def study_system_attrs(study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)
