"""The front door: --help everywhere; bad input is one line on stderr, exit code 2, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from search.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())


def test_help_for_every_command(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"search", "resume", "status", "eval", "export", "pretrain"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert "usage: ropesearch " + name in capsys.readouterr().out


def config_with(tmp_path, change):
    data = json.loads(json.dumps(GOOD))
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(path, value):
    def change(data):
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return change


def _delete(key):
    return lambda data: data.pop(key)


BAD_CONFIGS = [
    ("unknown top-level key", _set("colour", "blue"), "colour: unknown key"),
    ("unknown nested key", _set("sampler.evolution.populaton", 10), "populaton: unknown key"),
    ("wrong type", _set("needles.documents", "many"), "needles.documents"),
    ("out of range", _set("needles.documents", 0), "needles.documents"),
    ("no target", _delete("scale"), "exactly one of scale and target_window"),
    ("scale not above 1", _set("scale", 1), "scale"),
    ("unknown sampler", _set("sampler.name", "bayes"), "sampler.name"),
    ("unknown backend", _set("workers.backend", "mpi"), "workers.backend"),
    ("unknown baseline", _set("baselines", ["yarn", "rope-magic"]), "rope-magic"),
    ("missing model", _set("model.name", "/nowhere/model"), "no such alias"),
    ("missing haystack", _set("needles.haystack", ["/nowhere/books"]), "no such file or folder"),
    ("template without answer", _set("needles.question_template", "What is {key}?"), "value"),
    ("bad critical range", _set("space.critical_dim_range", [12, 3]), "critical_dim_range"),
    ("critical range outside", _set("space.critical_dim_range", [1, 40]), "critical_dim_range"),
    ("bad attention", _set("space.attention", "loud"), "space.attention"),
    ("negative budget", _set("budget.minutes", -1), "budget.minutes"),
    ("bad depth", _set("needles.depths", [0.5, 1.5]), "depths"),
    ("bad storage", _set("storage", "postgres-somewhere"), "storage"),
    ("bad name", _set("name", "has spaces/slash"), "name"),
    ("bad dtype", _set("model.dtype", "float8"), "model.dtype"),
]


@pytest.mark.parametrize("label, change, message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_search_config(tmp_path, capsys, label, change, message):
    path = config_with(tmp_path, change)
    code = main(["search", str(path), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("ropesearch: error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "no-such.yaml"], "no such config file"),
        (["resume", "no-such-run"], "not a run folder"),
        (["status", "."], "not a run folder"),
        (["export", "no-such.json", "--to", "json"], "no such factor file"),
        (["eval", "no-such.yaml"], "no such config file"),
        (["pretrain", "no-such.yaml"], "no such config file"),
    ],
)
def test_bad_paths(tmp_path, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_not_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    assert main(["search", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_argparse_errors_exit_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "search.cli", "export", "x.json", "--to", "onnx"],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr
