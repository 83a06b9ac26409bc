"""Which drivers of a study are alive: a trial left RUNNING by a dead one is failed as "interrupted",
and its slot is asked again (and is no attempt).

On the driver's own host, a driver is alive while its process is; elsewhere, while its heartbeat
(a study attribute written every 10 s) is younger than `HEARTBEAT_GRACE_S`.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from search import trial_keys as keys
from search.trial_keys import DRIVER, ERROR, HEARTBEAT, INTERRUPTED

HEARTBEAT_GRACE_S = 120.0


def _alive(driver: str, heartbeats: dict) -> bool:
    host, pid, _ = driver.split(":")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
            return True
        except (ProcessLookupError, ValueError):
            return False
        except PermissionError:
            return True
    return time.time() - heartbeats.get(driver, 0.0) < HEARTBEAT_GRACE_S


def _age_s(trial) -> float:
    started = trial.datetime_start
    if started is None:
        return float("inf")
    return (datetime.now(started.tzinfo) - started).total_seconds()  # journal: aware UTC; RDB: naive local


class Heartbeat:
    """Tells other drivers this one is alive: a storage write, so at most every `every_s` seconds."""

    def __init__(self, study, driver_id: str, every_s: float = 10.0):
        self.study, self.driver_id, self.every_s, self.last = study, driver_id, every_s, 0.0

    def __call__(self) -> None:
        now = time.time()
        if now - self.last >= self.every_s:
            keys.set_study_system_attr(self.study, HEARTBEAT + self.driver_id, now)
            self.last = now


def fail_interrupted(study, driver_id: str) -> int:
    """Mark RUNNING trials whose driver is dead as failed ("interrupted"); their slots open again. Called as
    a driver starts, and while it waits for slots that another driver holds (which may die meanwhile)."""
    attrs = keys.study_system_attrs(study)
    heartbeats = {k[len(HEARTBEAT):]: v for k, v in attrs.items() if k.startswith(HEARTBEAT)}
    others_alive = any(d != driver_id and _alive(d, heartbeats) for d in heartbeats)
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        driver = trial.system_attrs.get(DRIVER)
        if driver is None and others_alive and _age_s(trial) < HEARTBEAT_GRACE_S:
            continue  # a live driver may be asking it right now: it writes its name just after the ask
        driver = driver or "?:0:0"  # nobody alive can be asking it: its driver died in the ask
        if driver != driver_id and not _alive(driver, heartbeats):
            try:
                keys.set_trial_system_attr(study, trial, ERROR, INTERRUPTED)
                keys.fail_trial(study, trial)
            except UpdateFinishedTrialError:  # another driver starting at the same moment failed it first
                continue
            count += 1
    return count
