"""The front door: --help everywhere; bad input is one line on stderr, exit code 2, nothing written."""

import json
import subprocess
import sys
import time
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
    ("unknown pruner", _set("pruning.name", "hyperband"), "pruning.name"),
    ("first stage not a subset", _set("pruning", {"name": "earlier_trials", "documents": 32}), "pruning.documents"),
    ("attention bound without a cost limit", _set("short_guard.bound_attention", True), "bound_attention"),
    ("attention bound under TPE", lambda d: (_set("short_guard", {"max_cost": 0.01, "bound_attention": True})(d),
                                             _set("sampler.name", "tpe")(d)), "sampler evolution"),
    ("scale infinite", _set("scale", float("inf")), "scale: must be a finite number"),
    ("scale NaN", _set("scale", float("nan")), "scale: must be a finite number"),
    ("upper infinite", _set("space.upper", float("inf")), "space.upper: must be a finite number"),
    ("depth NaN", _set("needles.depths", [0.5, float("nan")]), "needles.depths[1]"),
    ("minutes infinite", _set("budget.minutes", float("inf")), "budget.minutes"),
    ("scale huge", _set("scale", 1e6), "scale"),
    ("target window huge", lambda d: d.pop("scale") and d.update(target_window=10**9), "target_window"),
    ("documents huge", _set("needles.documents", 1_000_000_000), "needles.documents"),
    ("holdout documents huge", _set("holdout.documents", 1_000_000_000), "holdout.documents"),
    ("population huge", _set("sampler.evolution.population", 10**9), "sampler.evolution.population"),
    ("generations huge", _set("sampler.evolution.generations", 10**12), "sampler.evolution.generations"),
    ("workers huge", _set("workers.count", 10**6), "workers.count"),
    ("name 300 characters", _set("name", "x" * 300), "name"),
    ("seed negative", _set("sampler.seed", -1), "sampler.seed"),
    ("seed beyond 2^32", _set("sampler.seed", 99999999999999999999), "sampler.seed"),
    ("storage empty", _set("storage", ""), "storage"),
    ("journal in a missing folder", _set("storage", "/nonexistent/dir/x.journal.log"), "no such folder"),
    ("sqlite in a missing folder", _set("storage", "sqlite:////nonexistent/dir/x.db"), "no such folder"),
    ("threads 0", _set("model.threads", 0), "model.threads"),
    ("model name empty", _set("model.name", ""), "model.name: empty"),
    ("haystack empty list", _set("needles.haystack", []), "needles.haystack: empty"),
    ("holdout haystack empty list", _set("holdout.haystack", []), "holdout.haystack: empty"),
    ("malformed ray address", _set("workers.address", "nowhere"), "workers.address"),
    ("scale a string", _set("scale", "big"), "scale"),
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


def test_seed_factors_from_a_shorter_target_seed_the_sampler_and_a_longer_one_is_refused(tmp_path, capsys):
    """The progressive start: a winner at 2x seeds the 4x search; one at 8x cannot, and is refused before the
    run folder exists."""
    from search import long_stage
    from search.runs import load_search_config
    from search.space import RopeSpace

    def at(target, name):
        return str(factor_file(tmp_path, lambda d: d.update(target_window=target), name=name))

    path = config_with(tmp_path, _set("sampler.evolution.seed_factors", [at(512, "2x.json")]))
    config = load_search_config(path)
    space = RopeSpace(geometry_of_tiny(), 1024, config.space)
    sampler, _ = long_stage._sampler(config, space)
    assert [w.target_window for w in sampler.earlier_winners] == [1024]

    path = config_with(tmp_path, _set("sampler.evolution.seed_factors", [at(2048, "8x.json")]))
    assert main(["search", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "seed_factors[0]" in err and "made for 2048 tokens, beyond the target 1024" in err, err
    assert not (tmp_path / "runs").exists()


def geometry_of_tiny():
    from fitness.geometry import geometry_from_config
    from fitness.models import load_config

    return geometry_from_config(load_config("tiny"))


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


def model_copy(tmp_path, drop=(), cut=None):
    """The bundled model's files in a folder of its own, some left out or the weights truncated."""
    from fitness.models import TINY_MODEL_DIR

    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    for path in TINY_MODEL_DIR.iterdir():
        if path.is_file() and path.name not in drop:
            data = path.read_bytes()
            (folder / path.name).write_bytes(data[:cut] if cut and path.suffix == ".safetensors" else data)
    return str(folder)


BAD_MODELS = [
    ("model without tokenizer", lambda p: model_copy(p, drop=("tokenizer.json", "tokenizer_config.json")), "tokenizer"),
    ("model without weights", lambda p: model_copy(p, drop=("model.safetensors",)), "no weights"),
    ("model with truncated weights", lambda p: model_copy(p, cut=1_000_000), "truncated"),
    ("model a text file", lambda p: str(write(p, "model.txt", "hello")), "model.name"),
]


@pytest.mark.parametrize("label, make, message", BAD_MODELS, ids=[b[0] for b in BAD_MODELS])
@pytest.mark.parametrize("command", ["search", "train"])
def test_bad_model_folders(tmp_path, capsys, command, label, make, message):
    """A model folder that cannot load is refused before any folder is made, naming the file and key."""
    model = make(tmp_path)
    if command == "search":
        path, out = config_with(tmp_path, _set("model.name", model)), ["--runs-dir", str(tmp_path / "runs")]
    else:
        path, out = train_config(tmp_path, _set("model.name", model)), ["--out", str(tmp_path / "runs" / "o")]
    code = main([command, str(path), *out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and str(path) in err, err
    assert not (tmp_path / "runs").exists()


TRAIN = yaml.safe_load((REPO / "configs" / "train-tiny.yaml").read_text())


def train_config(tmp_path, change, name="train.yaml"):
    data = json.loads(json.dumps(TRAIN))
    data["factors"] = str(REPO / data["factors"])
    change(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# fmt: off
BAD_TRAIN = [
    ("factors not JSON", lambda p: _set("factors", str(write(p, "f.json", "[1, 2"))), "f.json"),
    ("factors of another base", lambda p: _set("factors", str(factor_file(p, _geometry("base", 5e5)))), "base"),
    ("factors of another window", lambda p: _set("factors", str(factor_file(p, _geometry("original_window", 512)))),
     "original_window"),
    ("factors NaN", lambda p: _set("factors", str(factor_file(p, lambda d: d["long_factors"].__setitem__(2, "nan")))),
     "long_factors"),
    ("factors a folder without them", lambda p: _set("factors", str(p)), "no best_factors.json"),
    ("missing model", lambda p: _set("model.name", "/nowhere/model"), "model.name"),
    ("threads 0", lambda p: _set("model.threads", 0), "model.threads"),
    ("lr NaN", lambda p: _set("train.lr", float("nan")), "train.lr"),
    ("lr infinite", lambda p: _set("train.lr", float("inf")), "train.lr"),
    ("steps negative", lambda p: _set("train.steps", -1), "train.steps"),
    ("steps huge", lambda p: _set("train.steps", 10**12), "train.steps"),
    ("batch huge", lambda p: _set("train.batch_size", 10**9), "train.batch_size"),
    ("seed negative", lambda p: _set("train.seed", -1), "train.seed"),
    ("name 300 characters", lambda p: _set("name", "x" * 300), "name"),
    ("haystack empty list", lambda p: _set("data.haystack", []), "data.haystack: empty"),
    ("evaluation documents huge", lambda p: _set("evaluation.needles.documents", 10**9),
     "evaluation.needles.documents"),
    ("steps a string", lambda p: _set("train.steps", "many"), "train.steps"),
    ("adapter on a layer the model lacks", lambda p: _set("adapter", {"targets": ["q_proj", "query_key_value"]}),
     "adapter.targets: tiny has no linear layer named query_key_value"),
    ("adapter rank 0", lambda p: _set("adapter", {"rank": 0}), "adapter.rank"),
]
# fmt: on


@pytest.mark.parametrize("label, change, message", BAD_TRAIN, ids=[b[0] for b in BAD_TRAIN])
def test_bad_train_config(tmp_path, capsys, label, change, message):
    path = train_config(tmp_path, change(tmp_path))
    code = main(["train", str(path), "--out", str(tmp_path / "runs" / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


def _good_train(p):
    return str(train_config(p, lambda d: None))


def _good_search(p):
    return str(config_with(p, lambda d: None))


def _pretrain_recipe(p, change=lambda d: None):
    data = {"train": {"steps": 10}, "data": {"haystack": ["docstrings"]}, "out": str(p / "pre" / "model")}
    change(data)
    path = p / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# fmt: off
BAD_COMMAND_LINES = [
    # (label, argv from tmp_path, exit code, message); nothing may be left under tmp_path/runs or /pre
    ("search --seed -1", lambda p: ["search", _good_search(p), "--seed", "-1"], 2, "sampler.seed"),
    ("search --seed huge", lambda p: ["search", _good_search(p), "--seed", "99999999999999999999"], 2, "sampler.seed"),
    ("search --workers 0", lambda p: ["search", _good_search(p), "--workers", "0"], 2, "workers.count"),
    ("search --storage empty", lambda p: ["search", _good_search(p), "--storage", ""], 2, "storage"),
    ("search --storage missing folder", lambda p: ["search", _good_search(p), "--storage",
                                                   "sqlite:////nonexistent/dir/x.db"], 2, "no such folder"),
    ("search --storage journal missing folder", lambda p: ["search", _good_search(p), "--storage",
                                                           str(p / "none" / "x.journal.log")], 2, "no such folder"),
    ("search --runs-dir a file", lambda p: ["search", _good_search(p), "--runs-dir", str(write(p, "runs", "x"))], 2,
     "--runs-dir"),
    ("search --address nobody", lambda p: ["search", _good_search(p), "--address", "127.0.0.1:1"], 1,
     "no Ray cluster answers"),
    ("search --address malformed", lambda p: ["search", _good_search(p), "--address", "127.0.0.1"], 2,
     "workers.address"),
    ("train --out a file", lambda p: ["train", _good_train(p), "--out", str(write(p, "runs", "x"))], 2, "a file"),
    ("train --out inside a file", lambda p: ["train", _good_train(p), "--out", str(write(p, "runs", "x") / "o")], 2,
     "a file"),
    ("export --out an existing file", lambda p: ["export", str(factor_file(p)), "--to", "json", "--out",
                                                 str(write(p, "taken.json", "{}"))], 2, "exists"),
    ("export --out in a missing folder", lambda p: ["export", str(factor_file(p)), "--to", "json", "--out",
                                                    str(p / "runs" / "x.json")], 2, "does not exist"),
    ("eval multiples NaN", lambda p: ["eval", str(write(p, "e.yaml", "multiples: [.nan]")), "--out",
                                      str(p / "runs")], 2, "multiples[0]"),
    ("eval multiples huge", lambda p: ["eval", str(write(p, "e.yaml", "multiples: [1000000]")), "--out",
                                       str(p / "runs")], 2, "multiples"),
    ("eval target_window inside the window", lambda p: ["eval", str(write(p, "e.yaml", "target_window: 128")),
                                                       "--out", str(p / "runs")], 2, "target_window: 128 must lie"),
    ("eval threads 0", lambda p: ["eval", str(write(p, "e.yaml", "model: {threads: 0}")), "--out", str(p / "runs")],
     2, "model.threads"),
    ("pretrain --seed -1", lambda p: ["pretrain", _pretrain_recipe(p), "--seed", "-1"], 2, "train.seed"),
    ("pretrain --out a file", lambda p: ["pretrain", _pretrain_recipe(p), "--out", str(write(p, "runs", "x"))], 2,
     "a file"),
    ("pretrain --work-dir a file", lambda p: ["pretrain", _pretrain_recipe(p), "--work-dir",
                                              str(write(p, "runs", "x"))], 2, "--work-dir"),
    ("pretrain window huge", lambda p: ["pretrain", _pretrain_recipe(p, _set("window", 10**9))], 2, "window"),
    ("pretrain architecture huge", lambda p: ["pretrain", _pretrain_recipe(p, _set("architecture.layers", 10**6))], 2,
     "architecture"),
    ("pretrain lr infinite", lambda p: ["pretrain", _pretrain_recipe(p, _set("train.lr", float("inf")))], 2,
     "train.lr"),
    ("pretrain haystack missing", lambda p: ["pretrain", _pretrain_recipe(p, _set("data.haystack", ["/nowhere"]))], 2,
     "data.haystack"),
    ("pretrain haystack empty", lambda p: ["pretrain", _pretrain_recipe(p, _set("data.haystack", []))], 2,
     "data.haystack: empty"),
]
# fmt: on


@pytest.mark.parametrize("label, argv, code, message", BAD_COMMAND_LINES, ids=[b[0] for b in BAD_COMMAND_LINES])
def test_bad_command_lines(tmp_path, capsys, label, argv, code, message):
    """Bad options exit 2 (an unreachable cluster: 1) in one line, within seconds, and leave nothing behind."""
    args = argv(tmp_path)
    started = time.time()
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err and "RUN_DIR" not in err, err
    assert time.time() - started < 30
    runs = tmp_path / "runs"
    assert not runs.is_dir() or not any(runs.iterdir())
    assert not (tmp_path / "pre").exists()


def test_not_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    assert main(["search", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_argparse_errors_exit_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "search.cli", "export", "x.json", "--to", "onnx"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr


def factor_file(tmp_path, change=None, name="f.json"):
    from fitness.baselines import baseline
    from fitness.geometry import RopeGeometry

    geometry = RopeGeometry(rotary_dim=64, base=10000.0, original_window=256, head_dim=64)
    data = baseline("yarn", geometry, 1024).model_dump(mode="json")
    if change:
        change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data) if isinstance(data, dict) else data)
    return path


def _geometry(field, value):
    return lambda data: data["geometry"].__setitem__(field, value)


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# fmt: off
BAD_INPUTS = [
    # factor files
    ("factors: one entry short", lambda p: ["export", str(factor_file(p, lambda d: d["long_factors"].pop())), "--to",
                                            "json", "--out", str(p / "out.json")], "long_factors has 31 entries"),
    ("factors: NaN", lambda p: ["export", str(factor_file(p, lambda d: d["long_factors"].__setitem__(3, float("nan")))),
                                "--to", "json", "--out", str(p / "out.json")], "long_factors[3]"),
    ("factors: negative", lambda p: ["export", str(factor_file(p, lambda d: d["long_factors"].__setitem__(0, -1.0))),
                                     "--to", "json", "--out", str(p / "out.json")], "long_factors[0]"),
    ("factors: not JSON", lambda p: ["export", str(write(p, "f.json", "long_factors: [1, 2]")), "--to", "json",
                                     "--out", str(p / "out.json")], "f.json"),
    ("factors: unknown key", lambda p: ["export", str(factor_file(p, lambda d: d.__setitem__("colour", 1))), "--to",
                                        "json", "--out", str(p / "out.json")], "colour"),
    ("factors: other base", lambda p: ["export", str(factor_file(p, _geometry("base", 5e5))), "--to", "hf",
                                       "--model", "tiny", "--out", str(p / "out")], "base"),
    ("factors: other window", lambda p: ["export", str(factor_file(p, _geometry("original_window", 512))), "--to",
                                         "hf", "--model", "tiny", "--out", str(p / "out")], "original_window"),
    ("factors: odd rotary dim", lambda p: ["export", str(factor_file(p, _geometry("rotary_dim", 63))), "--to", "json",
                                           "--out", str(p / "out.json")], "rotary_dim"),
    ("export: no model named", lambda p: ["export", str(factor_file(p)), "--to", "hf", "--out", str(p / "out")],
     "--model is needed"),
    # model paths
    ("model: folder without config", lambda p: ["export", str(factor_file(p)), "--to", "hf", "--model",
                                                str((p / "empty").mkdir() or p / "empty"), "--out", str(p / "out")],
     "not a model"),
    ("model: a text file", lambda p: ["export", str(factor_file(p)), "--to", "hf", "--model",
                                      str(write(p, "model.txt", "hello")), "--out", str(p / "out")], "not a model"),
    ("model: no such alias", lambda p: ["export", str(factor_file(p)), "--to", "hf", "--model", "llama-9000",
                                        "--out", str(p / "out")], "no such alias"),
    # GGUF files
    ("gguf: not a GGUF", lambda p: ["export", str(factor_file(p)), "--to", "gguf", "--model",
                                    str(write(p, "fake.gguf", b"\x00" * 64)), "--out", str(p / "out.gguf")], "fake.gguf"),
    ("gguf: truncated", lambda p: ["export", str(factor_file(p)), "--to", "gguf", "--model",
                                   str(write(p, "cut.gguf", b"GGUF\x03\x00\x00\x00" + b"\x01" * 9)),
                                   "--out", str(p / "out.gguf")], "cut.gguf"),
    ("gguf: of an HF model", lambda p: ["export", str(factor_file(p)), "--to", "gguf", "--model", "tiny",
                                        "--out", str(p / "out.gguf")], "copies a .gguf"),
]
# fmt: on


@pytest.mark.parametrize("label, argv, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(tmp_path, capsys, label, argv, message):
    code = main(argv(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not any((tmp_path / name).exists() for name in ("out", "out.json", "out.gguf"))


BAD_HAYSTACKS = [
    ("haystack: empty file", lambda p: write(p, "empty.txt", "  \n"), "empty"),
    ("haystack: not UTF-8", lambda p: write(p, "latin.txt", "caf\xe9 au lait".encode("latin-1")), "not UTF-8"),
    ("haystack: jsonl without text", lambda p: write(p, "bad.jsonl", '{"body": 1}\n'), "'text' field"),
    ("haystack: empty folder", lambda p: (p / "none").mkdir() or p / "none", "no .txt, .md or .jsonl"),
]


@pytest.mark.parametrize("label, make, message", BAD_HAYSTACKS, ids=[b[0] for b in BAD_HAYSTACKS])
def test_bad_haystacks(tmp_path, capsys, label, make, message):
    path = config_with(tmp_path, _set("holdout.haystack", [str(make(tmp_path))]))
    assert main(["search", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_train_and_eval_configs(tmp_path, capsys):
    train = yaml.safe_load((REPO / "configs" / "train-tiny.yaml").read_text())
    cases = [
        ("train", dict(train, factors=str(tmp_path / "missing.json")), "no such factor file"),
        ("train", dict(train, optimizer="sgd"), "optimizer: unknown key"),
        ("train", dict(train, train=dict(train["train"], lr=-1)), "train.lr"),
        ("eval", {"methods": ["yarn", "magic"]}, "magic"),
        ("eval", {"factors": {"x": str(factor_file(tmp_path, _geometry("base", 5e5), "other.json"))}}, "base"),
        ("pretrain", {"train": {"steps": 0}}, "train.steps"),
    ]
    for command, data, message in cases:
        path = tmp_path / f"{command}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main([command, str(path), "--out" if command != "pretrain" else "--work-dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (command, err)
        assert not (tmp_path / "o").exists()
