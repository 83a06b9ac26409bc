"""The search service end to end on the bundled model: real Optuna storage, real Ray workers."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from fitness.factor_files import load_factor_file
from search import runs
from tests.search_helpers import completed_in, history_of, launch, write_config


def test_local_search_writes_a_complete_run_folder(tmp_path):
    config = runs.load_search_config(write_config(tmp_path))
    run_dir = runs.create(config, tmp_path / "runs")
    summary = runs.run(run_dir, quiet=True)
    assert summary["completed"] == 8 + 3 * 4
    for name in ("config.yaml", "study.db", "best_factors.json", "report.json", "factors.png", "fitness.png"):
        assert (run_dir / name).is_file(), name
    best = load_factor_file(run_dir / "best_factors.json")
    rows = history_of(run_dir)
    assert best.params["needle_ppl"] == min(r["value"] for r in rows)
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["methods"]) == {"none", "yarn", "critical_ntk", "searched"}
    assert report["in_window"] < report["methods"]["none"]["needle_ppl"]
    assert "critical_dim" in best.params and list(best.long_factors) == sorted(best.long_factors)


@pytest.mark.slow
def test_two_ray_workers_give_the_same_history(tmp_path, reference_history):
    config = runs.load_search_config(write_config(tmp_path, **{"workers.backend": "ray", "workers.count": 2}))
    run_dir = runs.create(config, tmp_path / "runs")
    runs.run(run_dir, quiet=True)
    history, best = reference_history
    assert history_of(run_dir) == history
    assert load_factor_file(run_dir / "best_factors.json").long_factors == best.long_factors


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
    assert load_factor_file(run_dir / "best_factors.json").long_factors == best.long_factors


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_optuna_samplers_search_the_same_space(tmp_path, sampler):
    changes = {"sampler.name": sampler, "budget.evaluations": 10, "pruning.name": "earlier_trials",
               "pruning.documents": 2, "pruning.min_reference": 4}
    config = runs.load_search_config(write_config(tmp_path, **changes))
    run_dir = runs.create(config, tmp_path / "runs")
    summary = runs.run(run_dir, quiet=True)
    assert summary["completed"] == 10
    rows = history_of(run_dir)
    assert [r["slot"] for r in rows] == [[n] for n in range(10)]
    best = load_factor_file(run_dir / "best_factors.json")
    assert list(best.long_factors) == sorted(best.long_factors)  # every proposal repaired into the space
    assert best.params["needle_ppl"] == min(r["value"] for r in rows if "pruned_at" not in r)


def test_a_stop_by_the_clock_is_said_and_a_resume_finishes_the_run(tmp_path, capsys, reference_history):
    """budget.minutes stops a call, not the run: the last line and `status` say so, nothing is reported as
    finished, and `resume` (here after raising the minutes) completes the generations with the history of
    a run that was never stopped."""
    from search.cli import main

    path = write_config(tmp_path, **{"budget.minutes": 0.04})
    assert main(["search", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("stopped by its time budget (0.04 minutes a call) after") and str(run_dir) in last
    assert not (run_dir / "report.json").exists() and len(history_of(run_dir)) < 20
    assert "stopped by its time budget" in runs.status(run_dir)
    config = (run_dir / "config.yaml").read_text().replace("minutes: 0.04", "minutes: 30.0")
    (run_dir / "config.yaml").write_text(config)
    assert main(["resume", str(run_dir)]) == 0
    assert "held-out needle set" in capsys.readouterr().out and (run_dir / "report.json").exists()
    history, best = reference_history
    assert history_of(run_dir) == history
    assert load_factor_file(run_dir / "best_factors.json").long_factors == best.long_factors
    assert "stopped by" not in runs.status(run_dir)


def test_ctrl_c_names_the_run_folder_to_resume(tmp_path):
    config = write_config(tmp_path, **{"sampler.evolution.generations": 50})
    process = launch(["search", str(config), "--runs-dir", str(tmp_path / "runs")])
    deadline = time.time() + 120
    while time.time() < deadline and not (found := list((tmp_path / "runs").glob("small-*/study.db"))):
        time.sleep(0.1)
    assert found, process.stderr.read().decode()[-2000:]
    while time.time() < deadline and completed_in(found[0]) < 1:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGINT)
    assert process.wait(timeout=60) == 130
    err = process.stderr.read().decode().strip().splitlines()
    assert err[-1] == f"ropesearch: interrupted; `ropesearch resume {found[0].parent}` continues it"


def test_a_guard_haystack_too_small_for_one_window_is_refused_before_the_run(tmp_path, capsys):
    from search.cli import main

    small = tmp_path / "small.txt"
    small.write_text("A sentence or two. " * 5)
    path = write_config(tmp_path, **{"needles.haystack": [str(small)], "short_guard.max_cost": 0.02})
    assert main(["search", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "short_guard (needles.haystack)" in err and "too few for one window" in err and str(path) in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
