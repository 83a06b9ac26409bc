"""Random mutations of valid configs and factor files (odd types, NaN/inf, huge or negative numbers,
missing keys): each is refused in one line (exit 2, or 1 for the environment) with nothing left
behind, or accepted; never a traceback, never a hang. Seeded, so a failure names its case.

Only the checks before a run are under test: an accepted search or training stops there.
"""

import copy
import json
import random
import signal
from pathlib import Path

import pytest
import yaml

from search import cli
from tests.search_helpers import REPO, SMALL

SEED = 15
CASES = {"search": 80, "train": 40, "factors": 40, "eval": 200}
CASE_SECONDS = 60  # a case that takes longer is a hang
ODD_VALUES = [float("nan"), float("inf"), float("-inf"), 10**12, -(10**12), 10**30, 1e308, -1, 0, 0.5, "text", "",
              [], {}, None, True, [float("nan")], [-1, "x"]]


def paths(data, prefix=()):
    """Every key path in nested dicts and lists."""
    yield prefix
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield from paths(value, (*prefix, key))


def mutate(data, rng: random.Random):
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 2)):
        path = rng.choice([p for p in paths(data) if p])
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
    return data


def _timeout(signum, frame):
    raise TimeoutError(f"a case ran past {CASE_SECONDS} s")


def check_outcome(argv, capsys, out_dir: Path) -> int:
    """Run the command; a refusal is one line and leaves `out_dir` without a folder; an acceptance
    leaves exactly one, whole."""
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(CASE_SECONDS)
    try:
        code = cli.main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    made = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    assert not any(name.endswith(".tmp") for name in made), made
    if code == 0:
        assert len(made) <= 1, made
    else:
        lines = [line for line in err.splitlines() if line.startswith("ropesearch: ")]
        assert code in (1, 2) and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(("ropesearch: error: ", "ropesearch: failed: ")), err
        assert made == [], made
    return code


@pytest.fixture
def haystack(tmp_path):
    text = " ".join(f"Sentence {i} tells of the {w} in the garden." for i, w in enumerate(["rose", "oak"] * 200))
    path = tmp_path / "hay.txt"
    path.write_text(text)
    return str(path)


def test_mutated_search_configs(tmp_path, capsys, monkeypatch, haystack):
    monkeypatch.setattr(cli, "_run", lambda run_dir, stop_after: 0)  # accepted: the run folder is the outcome
    base = {**SMALL, "needles": {**SMALL["needles"], "haystack": [haystack]},
            "holdout": {**SMALL["holdout"], "haystack": [haystack]}}
    rng, codes = random.Random(SEED), []
    for case in range(CASES["search"]):
        path = tmp_path / f"search{case}.yaml"
        path.write_text(yaml.safe_dump(mutate(base, rng)))
        runs = tmp_path / f"runs{case}"
        codes.append(check_outcome(["search", str(path), "--runs-dir", str(runs)], capsys, runs))
    assert codes.count(2) > CASES["search"] // 2  # most mutations are bad input, and are seen as such


def _train_base(tmp_path, haystack, factors: str) -> dict:
    data = yaml.safe_load((REPO / "configs" / "train-tiny.yaml").read_text())
    data["factors"] = factors
    data["data"]["haystack"] = [haystack]
    data["evaluation"]["needles"]["haystack"] = [haystack]
    return data


@pytest.mark.parametrize("what", ["train", "factors"])
def test_mutated_train_configs_and_factor_files(tmp_path, capsys, monkeypatch, haystack, what):
    from mixed_window_train import finetune

    monkeypatch.setattr(finetune, "finetune", lambda config, candidate, out, stop_after=None: {})
    factors = json.loads((REPO / "configs" / "factors" / "tiny-4x.json").read_text())
    rng, codes = random.Random(SEED), []
    for case in range(CASES[what]):
        factor_path = tmp_path / f"factors{case}.json"
        factor_path.write_text(json.dumps(mutate(factors, rng) if what == "factors" else factors))
        config = _train_base(tmp_path, haystack, str(factor_path))
        path = tmp_path / f"train{case}.yaml"
        path.write_text(yaml.safe_dump(mutate(config, rng) if what == "train" else config))
        runs = tmp_path / f"runs{case}"
        codes.append(check_outcome(["train", str(path), "--out", str(runs / "o")], capsys, runs))
    assert codes.count(2) > CASES[what] // 2


def test_mutated_eval_configs(tmp_path, capsys, monkeypatch, haystack):
    from search import evaluate

    def accepted(config, candidates, out):  # the output folder is the outcome: it must appear whole
        (out / "eval.json").write_text("{}")
        return {"results": {}, "short_text": None}

    monkeypatch.setattr(evaluate, "run_eval", accepted)
    base = yaml.safe_load((REPO / "configs" / "eval-tiny.yaml").read_text())
    base["needles"]["haystack"] = [haystack]
    base["factors"] = {"searched": str(REPO / "configs" / "factors" / "tiny-4x.json"), "static": "yarn"}
    base["short_lengths"] = [64, 256]
    rng, codes = random.Random(SEED), []
    for case in range(CASES["eval"]):
        path = tmp_path / f"eval{case}.yaml"
        path.write_text(yaml.safe_dump(mutate(base, rng)))
        runs = tmp_path / f"runs{case}"
        codes.append(check_outcome(["eval", str(path), "--out", str(runs / "o")], capsys, runs))
    assert codes.count(2) > CASES["eval"] // 2 and codes.count(0) > 0
