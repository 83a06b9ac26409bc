"""Faults: what breaks must not cost the run. Real Ray, real storage, the bundled model.

Each fault shows: no finished evaluation lost or duplicated (one COMPLETE trial per slot, the same
history as an uninterrupted run), a one-line message naming the cause, and `resume` finishing.
"""

import json
import os
import resource
import signal
import sqlite3
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import long_stage, runs
from search.cli import main
from search.slots import slot_of
from search.storage import open_storage
from search.trial_keys import DRIVER
from tests.search_helpers import completed_in, history, history_of, launch, write_config

TOTAL = 8 + 3 * 4  # the small config's evaluations


def one_complete_per_slot(study: optuna.Study, total: int = TOTAL) -> None:
    slots = [slot_of(t) for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(slots) == len(set(slots)) == total


def study_of(run_dir: Path) -> optuna.Study:
    return long_stage.open_context(run_dir, runs.load(run_dir)).study


def new_run(tmp_path, **changes) -> Path:
    return runs.create(runs.load_search_config(write_config(tmp_path, **changes)), tmp_path / "runs")


def finish(run_dir: Path, env=None) -> None:
    process = launch(["resume", str(run_dir)], env=env)
    assert process.wait(timeout=600) == 0, process.stderr.read().decode()[-2000:]


def worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ScoringWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_evaluation_is_replaced(tmp_path, reference_history, caplog):
    run_dir = new_run(tmp_path, **{"workers.backend": "ray", "workers.count": 1})
    killed = []

    def kill_a_worker():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if completed_in(run_dir / "study.db") >= 6 and (pids := worker_pids()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    thread = threading.Thread(target=kill_a_worker, daemon=True)
    thread.start()
    with caplog.at_level("WARNING", logger="ropesearch"):
        runs.run(run_dir, quiet=True)
    thread.join()
    assert killed, "no worker was killed"
    assert any("died" in r.getMessage() and "restarted" in r.getMessage() for r in caplog.records)
    one_complete_per_slot(study_of(run_dir))
    assert history_of(run_dir) == reference_history[0]


CRASH_POINTS = [
    # (where, the function to die in, at which call): a driver SIGKILLed there, then resumed
    ("during a proposal", "search.evolution:EvolutionarySampler._children", 2),
    ("during an evaluation", "fitness.scoring:answer_nll", 15),
    ("during a storage write", "sqlalchemy.orm.session:Session.commit", 60),
]


@pytest.mark.slow
@pytest.mark.parametrize("where, target, call", CRASH_POINTS, ids=[c[0] for c in CRASH_POINTS])
def test_driver_killed_then_resumed(tmp_path, reference_history, where, target, call):
    run_dir = new_run(tmp_path)
    crashed = launch([target, str(call), "--", "resume", str(run_dir)], module="tests.die_at")
    assert crashed.wait(timeout=600) == -signal.SIGKILL, crashed.stderr.read().decode()[-2000:]
    assert completed_in(run_dir / "study.db") < TOTAL
    finish(run_dir)
    one_complete_per_slot(study_of(run_dir))
    assert history_of(run_dir) == reference_history[0]


@pytest.mark.slow
def test_a_locked_study_database(tmp_path, reference_history):
    run_dir = new_run(tmp_path)
    holder = sqlite3.connect(run_dir / "study.db", timeout=1, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        blocked = launch(["resume", str(run_dir)], env={"ROPESEARCH_SQLITE_TIMEOUT": "1"})
        assert blocked.wait(timeout=300) == 1
        err = blocked.stderr.read().decode()
        assert err.count("\n") == 1 and "locked by another process" in err and "Traceback" not in err, err
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    finish(run_dir)
    one_complete_per_slot(study_of(run_dir))
    assert history_of(run_dir) == reference_history[0]


def _cap_file_size(limit: int):
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return cap


@pytest.mark.slow
def test_a_full_disk(tmp_path, reference_history):
    run_dir = new_run(tmp_path)
    crashed = launch(["fitness.scoring:answer_nll", "12", "--", "resume", str(run_dir)], module="tests.die_at")
    assert crashed.wait(timeout=600) == -signal.SIGKILL
    before = completed_in(run_dir / "study.db")
    assert before < TOTAL
    size = (run_dir / "study.db").stat().st_size
    full = launch(["resume", str(run_dir)], preexec_fn=_cap_file_size(size))  # the study cannot grow
    assert full.wait(timeout=600) == 1
    err = full.stderr.read().decode()
    failures = [line for line in err.splitlines() if line.startswith("ropesearch: failed:")]
    assert len(failures) == 1 and "disk of the run folder is full" in failures[0] and "Traceback" not in err, err
    assert completed_in(run_dir / "study.db") >= before  # nothing finished was lost
    finish(run_dir)
    one_complete_per_slot(study_of(run_dir))
    assert history_of(run_dir) == reference_history[0]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_two_drivers_share_one_study(tmp_path, reference_history, backend):
    if backend == "postgresql":
        url = os.environ.get("ROPESEARCH_TEST_POSTGRES")
        if not url:
            pytest.skip("set ROPESEARCH_TEST_POSTGRES to a database URL (.ci/run starts a PostgreSQL server)")
        # an empty schema of its own: the two drivers also race to create Optuna's tables, as on a new database
        name = f"shared{os.getpid()}{int(time.time())}"
        psycopg = pytest.importorskip("psycopg")
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {name}")
        url = f"{url}?options=-csearch_path%3D{name}"
    else:
        url, name = str(tmp_path / "shared.journal.log"), "shared"
    # 12 generations (52 evaluations), long enough that both drivers take part; the first 4 are the
    # reference's: a generation depends only on the ones before it
    config = write_config(tmp_path, name=name, storage=url, **{"sampler.evolution.generations": 12})
    drivers = [launch(["search", str(config), "--runs-dir", str(tmp_path / f"runs{i}")]) for i in range(2)]
    for process in drivers:
        assert process.wait(timeout=600) == 0, process.stderr.read().decode()[-2000:]
    study = optuna.load_study(study_name=name, storage=open_storage(url, tmp_path))
    one_complete_per_slot(study, total=8 + 11 * 4)
    assert history(study)[:TOTAL] == reference_history[0]
    drivers_seen = {t.system_attrs.get(DRIVER) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(drivers_seen) == 2  # both drivers really evaluated


# ---------------------------------------------------------------- a run folder damaged or misused
STUDY_DAMAGE = [
    ("missing", lambda db: db.unlink(), "is missing"),
    ("empty", lambda db: db.write_bytes(b""), "is empty"),
    ("not a database", lambda db: db.write_bytes(b"not a database " * 100), "damaged"),
    ("truncated", lambda db: db.write_bytes(db.read_bytes()[: db.stat().st_size // 2]), "damaged"),
]


def folder_state(run_dir: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(run_dir.iterdir())}


@pytest.mark.parametrize("command", ["resume", "status"])
@pytest.mark.parametrize("damage, change, message", STUDY_DAMAGE, ids=[d[0] for d in STUDY_DAMAGE])
def test_a_lost_study_is_never_started_over(tmp_path, capsys, command, damage, change, message):
    """resume refuses and status reads nothing new: neither makes an empty study in place of a lost one."""
    run_dir = new_run(tmp_path)
    change(run_dir / "study.db")
    before = folder_state(run_dir)
    assert main([command, str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "ropesearch search" in err and "Traceback" not in err, err
    assert folder_state(run_dir) == before


def test_status_only_reads(tmp_path, capsys):
    run_dir = new_run(tmp_path)
    before = folder_state(run_dir)
    assert main(["status", str(run_dir)]) == 0
    assert "0 evaluations of 20" in capsys.readouterr().out
    assert folder_state(run_dir) == before  # no lock file, no journal: it works on a read-only folder too


def test_an_edited_config_is_not_resumed(tmp_path, capsys):
    run_dir = new_run(tmp_path)
    saved = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(saved.replace("population: 8", "population: 6"))
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sampler.evolution.population differ" in err, err
    # where and how fast it runs may change
    (run_dir / "config.yaml").write_text(saved.replace("count: 1", "count: 2"))
    assert runs.open_run(run_dir, runs.load(run_dir)).config.workers.count == 2


def test_a_second_resume_of_a_run_is_refused(tmp_path, capsys):
    run_dir = new_run(tmp_path)
    with runs.driver_lock(run_dir):  # a driver is resuming it
        assert main(["resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "being resumed elsewhere" in err and "Traceback" not in err, err
    assert completed_in(run_dir / "study.db") == 0


def test_best_factors_are_never_replaced_by_worse(tmp_path):
    run_dir = new_run(tmp_path)
    runs.run(run_dir, stop_after=2, quiet=True)
    best = json.loads((run_dir / "best_factors.json").read_text())
    best["params"]["needle_ppl"] = 0.5  # better than anything this run will find
    (run_dir / "best_factors.json").write_text(json.dumps(best))
    runs.run(run_dir, stop_after=2, quiet=True)
    assert completed_in(run_dir / "study.db") == 4
    assert json.loads((run_dir / "best_factors.json").read_text()) == best


def test_a_run_from_before_needle_ppl_was_named_still_reads(tmp_path, capsys):
    """Studies and run folders of older releases (committed results, users' runs) stored "fitness"."""
    run_dir = new_run(tmp_path)
    runs.run(run_dir, stop_after=2, quiet=True)
    study = study_of(run_dir)
    rows = study.user_attrs["baselines"]
    assert all("needle_ppl" in row and "fitness" not in row for row in rows.values())
    old = {name: {"fitness" if k == "needle_ppl" else k: v for k, v in row.items()} for name, row in rows.items()}
    study.set_user_attr("baselines", old)
    (run_dir / "baselines.json").write_text(json.dumps(old))
    best = json.loads((run_dir / "best_factors.json").read_text())
    del best["params"]["needle_ppl"]
    best["params"]["fitness"] = 0.5  # better than anything this run will find
    (run_dir / "best_factors.json").write_text(json.dumps(best))

    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for name, row in old.items():
        assert f"  {name:<14}{row['fitness']:>10.4g}  (" in out, out
    runs.run(run_dir, stop_after=2, quiet=True)
    assert completed_in(run_dir / "study.db") == 4
    assert json.loads((run_dir / "best_factors.json").read_text()) == best


def test_run_times_add_up_the_pieces_of_a_run_resumed_after_a_pause(tmp_path):
    """A GPU search runs in calls of at most 10 minutes; the results give each call's evaluations and
    seconds from the study's own records."""
    from benchmarks.run_times import run_times

    run_dir = new_run(tmp_path)
    runs.run(run_dir, stop_after=3, quiet=True)
    time.sleep(8)  # the next GPU call
    runs.run(run_dir, stop_after=2, quiet=True)
    times = run_times(run_dir, gap_seconds=5.0)["long"]
    assert [p["evaluations"] for p in times["pieces"]] == [3, 2]
    assert times["evaluations"] == completed_in(run_dir / "study.db") == 5
    assert times["seconds"] == pytest.approx(sum(p["seconds"] for p in times["pieces"]))
    assert 0 < times["pieces"][1]["seconds"] < 8  # the pause is between the pieces, not in them
