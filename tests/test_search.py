"""The search service end to end on the bundled model: real Optuna storage, real Ray workers."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fitness.factors import RopeCandidate
from search import driver, runs

SMALL = {
    "name": "small",
    "model": {"name": "tiny", "device": "cpu", "threads": 1},
    "scale": 4,
    "needles": {"documents": 4, "seed": 3},
    "holdout": {"documents": 4, "seed": 99, "haystack": ["docstrings"]},
    "sampler": {"seed": 5, "evolution": {"population": 8, "parents": 4, "mutations": 2, "crossovers": 2,
                                        "generations": 4}},  # fmt: skip
    "workers": {"backend": "local", "count": 1, "candidates_per_forward": 2, "documents_per_forward": 2},
    "baselines": ["none", "yarn", "critical_ntk"],
}


def write_config(tmp_path, **changes):
    config = json.loads(json.dumps(SMALL))
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def history_of(run_dir):
    config = runs.load(run_dir)
    ctx = driver.open_context(Path(run_dir), config)
    return driver.history(ctx)


def test_local_search_writes_a_complete_run_folder(tmp_path):
    config = runs.prepare(write_config(tmp_path))
    run_dir = runs.create(config, tmp_path / "runs")
    summary = runs.run(run_dir, quiet=True)
    assert summary["completed"] == 8 + 3 * 4
    for name in ("config.yaml", "study.db", "best_factors.json", "report.json", "factors.png", "fitness.png"):
        assert (run_dir / name).is_file(), name
    best = RopeCandidate.load(run_dir / "best_factors.json")
    rows = history_of(run_dir)
    assert best.params["fitness"] == min(r["value"] for r in rows)
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["methods"]) == {"none", "yarn", "critical_ntk", "searched"}
    assert report["in_window"] < report["methods"]["none"]["needle_ppl"]
    assert "critical_dim" in best.params and list(best.long_factors) == sorted(best.long_factors)


@pytest.fixture(scope="module")
def reference_history(tmp_path_factory):
    """An uninterrupted run with Ray and one worker: what every other way of running must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    config = runs.prepare(write_config(tmp, **{"workers.backend": "ray", "workers.count": 1}))
    run_dir = runs.create(config, tmp / "runs")
    runs.run(run_dir, quiet=True)
    return history_of(run_dir), RopeCandidate.load(run_dir / "best_factors.json")


@pytest.mark.slow
def test_two_ray_workers_give_the_same_history(tmp_path, reference_history):
    config = runs.prepare(write_config(tmp_path, **{"workers.backend": "ray", "workers.count": 2}))
    run_dir = runs.create(config, tmp_path / "runs")
    runs.run(run_dir, quiet=True)
    history, best = reference_history
    assert history_of(run_dir) == history
    assert RopeCandidate.load(run_dir / "best_factors.json").long_factors == best.long_factors


def completed_in(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def launch(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


@pytest.mark.slow
def test_kill_9_three_times_and_resume_gives_the_same_history(tmp_path, reference_history):
    config = write_config(tmp_path, **{"workers.backend": "ray", "workers.count": 1})
    repo = Path(__file__).resolve().parents[1]
    process = launch(["search", str(config), "--runs-dir", str(tmp_path / "runs")], repo)
    run_dir = None
    for kill_at in (3, 9, 15):
        deadline = time.time() + 240
        while time.time() < deadline:
            found = list((tmp_path / "runs").glob("small-*"))
            run_dir = found[0] if found else None
            if run_dir and completed_in(run_dir / "study.db") >= kill_at:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the search never reached {kill_at} evaluations: {process.stderr.read().decode()[-2000:]}")
        os.kill(process.pid, signal.SIGKILL)  # the driver alone, as a crash would
        process.wait()
        process = launch(["resume", str(run_dir)], repo)
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
    history, best = reference_history
    assert history_of(run_dir) == history
    assert RopeCandidate.load(run_dir / "best_factors.json").long_factors == best.long_factors
