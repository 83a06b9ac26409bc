"""Helpers shared by the search and fault tests: a small search config on the bundled model, and
ways to launch, inspect and compare runs."""

import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from optuna.trial import TrialState

from benchmarks.small_search import SMALL, write_config  # noqa: F401  (the tests' small search)
from search import long_stage, runs
from search.slots import slot_of

REPO = Path(__file__).resolve().parents[1]


def history_of(run_dir):
    config = runs.load(run_dir)
    return history(long_stage.open_context(Path(run_dir), config).study)


def history(study) -> list[dict]:
    """The settled evaluations in (generation, slot) order: what a resumed run must reproduce."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        slot = slot_of(trial)
        row = {"slot": list(slot) if slot else [trial.number], "params": trial.params, "value": trial.value}
        if trial.state == TrialState.PRUNED:
            row["pruned_at"] = trial.last_step
        rows.append(row)
    return sorted(rows, key=lambda row: row["slot"])


def completed_in(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


class StderrFile:
    """A child's stderr kept in a file, read as a pipe would be. A pipe holds 64 KiB: a child that prints
    progress bars while the test waits on something else blocks on its next write and never exits."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the process it captures)

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def close(self):
        self.file.close()


def launch(args, cwd=REPO, env=None, module="search.cli", stdout=subprocess.DEVNULL, **kwargs):
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    stderr = StderrFile()
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=stdout,
                               stderr=stderr.file, start_new_session=True, **kwargs)
    process.stderr = stderr
    return process
