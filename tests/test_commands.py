"""train, eval, export and pretrain meet the search's standard: bad input is one line and exit 2, a fault
of the environment one line and exit 1, in seconds; nothing is left behind and nothing of the user's
is changed, whatever the case."""

import contextlib
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from search.cli import main
from tests.test_cli import _set, config_with, factor_file, train_config, write

EVAL = {"name": "e", "model": {"name": "tiny", "device": "cpu", "threads": 1},
        "needles": {"documents": 2, "haystack": ["docstrings"]}, "multiples": [1, 2], "methods": ["none", "yarn"],
        "short_windows": 2}
RECIPE = {"train": {"steps": 10}, "data": {"haystack": ["docstrings"]}}
# a YAML "billion laughs": 9^9 values once expanded, a few hundred bytes on disk
LAUGHS = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))


def eval_config(p, change=lambda d: None, name="e.yaml"):
    data = yaml.safe_load(yaml.safe_dump(EVAL))
    change(data)
    return str(write(p, name, yaml.safe_dump(data)))


def recipe(p, change=lambda d: None):
    data = {**yaml.safe_load(yaml.safe_dump(RECIPE)), "out": str(p / "pre" / "model")}
    change(data)
    return str(write(p, "recipe.yaml", yaml.safe_dump(data)))


def small(change=lambda d: None):
    """train-tiny.yaml cut to one step and one document: a refusal that a bug turns into a run ends soon."""
    def changed(data):
        data["train"].update(steps=1, batch_size=1, warmup=0)
        data["evaluation"] = {"needles": {"documents": 1, "haystack": ["docstrings"]}, "short_windows": 1}
        change(data)

    return changed


def train(p, change):
    return ["train", str(train_config(p, small(change))), "--out", str(p / "runs" / "o")]


def bomb_factor_file(p):
    """A YAML factor file whose params hold the billion laughs (an export would write them out whole)."""
    data = yaml.safe_load(factor_file(p, name="good.json").read_text())
    data.pop("params")
    laughs = "".join(f"  {line}\n" for line in LAUGHS.splitlines())
    return write(p, "bomb.yaml", yaml.safe_dump(data) + "params:\n" + laughs)


def damaged_run_folder(p):
    folder = p / "run"
    folder.mkdir()
    factor_file(folder, name="best_factors.json")
    write(folder, "config.yaml", "name: x\n  bad: [indent\n")
    return str(folder)


def user_folder(p, name):
    """A folder of the user's, with files a careless command would overwrite."""
    folder = p / name
    (folder / "model").mkdir(parents=True)
    write(folder / "model", "model.safetensors", b"the user's weights")
    write(folder, "metrics.csv", "the user's numbers\n")
    return str(folder)


def another_run(p):
    """A training run folder of another config (more steps)."""
    from mixed_window_train.finetune import load_finetune_config

    config, _ = load_finetune_config(train_config(p, small(_set("train.steps", 2)), name="other.yaml"))
    (p / "other").mkdir()
    write(p / "other", "config.json", config.model_dump_json(indent=2))
    return str(p / "other")


def earlier_eval(p):
    folder = p / "earlier"
    folder.mkdir()
    write(folder, "eval.json", '{"results": "an earlier evaluation"}')
    return str(folder)


BAD = [  # (label, argv from tmp_path, exit code, what the one line says)
    # train: values checked against the model before anything is written
    ("train betas at 1", lambda p: train(p, _set("train.betas", [0.9, 1.0])), 2, "train.betas"),
    ("train min_lr above lr", lambda p: train(p, _set("train.min_lr", 1.0)), 2, "min_lr"),
    ("train short_min above the window", lambda p: train(p, _set("data.short_min", 300)), 2, "data.short_min"),
    ("train window-long short rows of a target not a multiple of the window",
     lambda p: train(p, lambda d: d.update(factors="yarn", target_window=1000, data={**d["data"], "short_rows": "window"})),
     2, "data.short_rows"),
    ("train short_lengths 100000", lambda p: train(p, _set("evaluation.short_lengths", [100000])), 2,
     "evaluation.short_lengths"),
    ("train short_lengths 0", lambda p: train(p, _set("evaluation.short_lengths", [0])), 2, "evaluation.short_lengths"),
    ("train short_lengths -5", lambda p: train(p, _set("evaluation.short_lengths", [-5])), 2,
     "evaluation.short_lengths"),
    ("train template with an unknown slot", lambda p: train(p, _set("evaluation.needles.needle_template",
                                                                    "{key} is {value} ({colour})")), 2, "colour"),
    ("train name .", lambda p: train(p, _set("name", ".")), 2, "name"),
    ("train haystack /dev/zero", lambda p: train(p, _set("data.haystack", ["/dev/zero"])), 2, "not a regular file"),
    ("train method without a target", lambda p: train(p, _set("factors", "yarn")), 2, "needs a target"),
    ("train method that rescales by length", lambda p: train(p, lambda d: d.update(factors="dynamic_ntk", scale=4)),
     2, "rescales by each input's length"),
    ("train method inside the window", lambda p: train(p, lambda d: d.update(factors="yarn", target_window=200)), 2,
     "target_window"),
    ("train factors for another target", lambda p: train(p, _set("target_window", 2048)), 2, "made for 1024"),
    ("train scale and target_window", lambda p: train(p, lambda d: d.update(factors="yarn", scale=4,
                                                                           target_window=1024)), 2, "not both"),
    ("train factors not UTF-8", lambda p: train(p, _set("factors", str(write(p, "f.json", b"\xff\xfe{")))), 2,
     "not UTF-8"),
    ("train factors with laughing params", lambda p: train(p, _set("factors", str(bomb_factor_file(p)))), 2,
     "aliases are expanded"),
    ("train factors referring to themselves", lambda p: train(p, _set("factors", str(write(p, "f.yaml", "&a [*a]")))),
     2, "refers to itself"),
    ("train factors in a folder with a damaged config.yaml", lambda p: train(p, _set("factors", damaged_run_folder(p))),
     2, "config.yaml"),
    ("train --out a user's folder", lambda p: ["train", str(train_config(p, small())), "--out",
                                               user_folder(p, "mine")], 2, "holds files this command did not make"),
    ("train --out a run of another config", lambda p: ["train", str(train_config(p, small())), "--out",
                                                       another_run(p)], 2, "another config"),
    ("search name .", lambda p: ["search", str(config_with(p, _set("name", "."))), "--runs-dir", str(p / "runs")], 2,
     "name"),
    # eval
    ("eval multiples empty", lambda p: ["eval", eval_config(p, _set("multiples", []))], 2, "multiples"),
    ("eval nothing to evaluate", lambda p: ["eval", eval_config(p, _set("methods", []))], 2, "nothing to evaluate"),
    ("eval short_lengths 100000", lambda p: ["eval", eval_config(p, _set("short_lengths", [100000]))], 2,
     "short_lengths"),
    ("eval short_lengths 0", lambda p: ["eval", eval_config(p, _set("short_lengths", [0]))], 2, "short_lengths"),
    ("eval short_lengths -5", lambda p: ["eval", eval_config(p, _set("short_lengths", [-5]))], 2, "short_lengths"),
    ("eval name 300 characters", lambda p: ["eval", eval_config(p, _set("name", "x" * 300))], 2, "name"),
    ("eval name .", lambda p: ["eval", eval_config(p, _set("name", "."))], 2, "name"),
    ("eval method that rescales by length", lambda p: ["eval", eval_config(p, _set("factors", {"x": "dynamic_ntk"}))],
     2, "factors.x"),
    ("eval haystack /dev/zero", lambda p: ["eval", eval_config(p, _set("needles.haystack", ["/dev/zero"]))], 2,
     "not a regular file"),
    ("eval --out an existing file", lambda p: ["eval", eval_config(p), "--out", str(write(p, "taken", "x"))], 2,
     "exists"),
    ("eval --out an earlier evaluation", lambda p: ["eval", eval_config(p), "--out", earlier_eval(p)], 2, "exists"),
    ("eval --out a 300-character name", lambda p: ["eval", eval_config(p), "--out", str(p / ("x" * 300))], 2,
     "longer than this file system allows"),
    # export
    ("export factors not UTF-8", lambda p: ["export", str(write(p, "f.json", b"{\"a\": \"\xe9\"}")), "--to", "json",
                                            "--out", str(p / "o.json")], 2, "not UTF-8"),
    ("export factors with laughing params", lambda p: ["export", str(bomb_factor_file(p)), "--to", "json", "--out",
                                                       str(p / "o.json")], 2, "aliases are expanded"),
    ("export factors with a duplicate key", lambda p: ["export", str(write(p, "f.json", '{"a": 1, "a": 2}')), "--to",
                                                       "json", "--out", str(p / "o.json")], 2, "duplicate key"),
    ("export from a folder with a damaged config.yaml", lambda p: ["export", damaged_run_folder(p), "--to", "json",
                                                                   "--out", str(p / "o.json")], 2, "config.yaml"),
    # pretrain
    ("pretrain head_dim odd", lambda p: ["pretrain", recipe(p, _set("architecture.head_dim", 63))], 2, "head_dim"),
    ("pretrain betas negative", lambda p: ["pretrain", recipe(p, _set("train.betas", [-0.1, 0.9]))], 2, "train.betas"),
    ("pretrain haystack /dev/zero", lambda p: ["pretrain", recipe(p, _set("data.haystack", ["/dev/zero"]))],
     2, "not a regular file"),
    ("pretrain --work-dir a user's folder", lambda p: ["pretrain", recipe(p), "--work-dir", user_folder(p, "mine")], 2,
     "holds files this command did not make"),
    ("pretrain out another model", lambda p: ["pretrain", recipe(p), "--out", user_folder(p, "mine")], 2,
     "holds something other than this recipe's model"),
]
HANGS = {"train haystack /dev/zero", "train factors with laughing params", "eval haystack /dev/zero",
         "export factors with laughing params", "pretrain haystack /dev/zero"}


def snapshot(root: Path) -> dict:
    """Every file and folder under `root` (the needle cache aside), with the files' bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*")) if p.relative_to(root).parts[0] != "cache"}


def _too_slow(signum, frame):
    raise TimeoutError("still running: a refusal takes seconds")


def refused(argv, capsys, code, message, seconds=30.0) -> str:
    """`main(argv)` exits with `code` and one line saying `message`, within `seconds` (a hang fails there)."""
    previous = signal.signal(signal.SIGALRM, _too_slow)
    signal.alarm(int(seconds) + 1)
    started = time.time()
    try:
        assert main(argv) == code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.time() - started
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert err.startswith("ropesearch: error: " if code == 2 else "ropesearch: failed: "), err
    assert elapsed < seconds, f"{elapsed:.1f} s"
    return err


@pytest.mark.parametrize("label, argv, code, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_to_the_commands_around_the_search(tmp_path, capsys, label, argv, code, message):
    args = argv(tmp_path)
    before = snapshot(tmp_path)
    refused(args, capsys, code, message, seconds=5.0 if label in HANGS else 30.0)
    assert snapshot(tmp_path) == before  # nothing left behind, nothing changed


YAML_ATTACKS = [
    ("duplicate key", "name: a\nname: b\n", "duplicate key 'name'"),
    ("laughs under an unknown key", LAUGHS, "aliases are expanded"),
    ("an alias inside itself", "colour: &a [1, *a]\n", "refers to itself"),
    ("nested 10,000 deep", "x: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested more than"),
    ("5 MiB", "# a comment\n" * (5 * 2**20 // 12), "more than a config file can be"),
]


def command_line(command, path, tmp_path):
    where = {"search": ["--runs-dir", str(tmp_path / "runs")], "train": ["--out", str(tmp_path / "o")],
             "eval": ["--out", str(tmp_path / "o")], "pretrain": ["--work-dir", str(tmp_path / "o")]}
    return [command, str(path), *where[command]]


@pytest.mark.parametrize("command", ["search", "train", "eval", "pretrain"])
@pytest.mark.parametrize("label, text, message", YAML_ATTACKS, ids=[a[0] for a in YAML_ATTACKS])
def test_yaml_is_read_with_bounds(tmp_path, capsys, command, label, text, message):
    """Duplicate keys, alias bombs, self-reference and deep nesting are refused in one line before any walk."""
    path = write(tmp_path, "config.yaml", text)
    before = snapshot(tmp_path)
    refused(command_line(command, path, tmp_path), capsys, 2, message, seconds=5.0)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command, text, key", [
    ("search", "scale: 4\nneedles: {wordings: 5}\n", "needles.wordings"),
    ("eval", "needles: {wordings: 5}\n", "needles.wordings"),
    ("train", "factors: yarn\ntrain: {steps: 1}\nevaluation: {needles: {wordings: {word: x}}}\n",
     "evaluation.needles.wordings.word"),
])
def test_messages_name_keys_not_pydantic_union_members(tmp_path, capsys, command, text, key):
    err = refused(command_line(command, write(tmp_path, "c.yaml", text), tmp_path), capsys, 2, f"{key}: Input should")
    assert "literal[" not in err and "dict[" not in err and "list[" not in err


def test_haystack_files_are_read_with_a_bound(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fitness.haystacks.MAX_HAYSTACK_BYTES", 1000)  # 1 GiB in use: too big to write here
    big = write(tmp_path, "big.txt", "A sentence of the haystack. " * 100)
    refused(train(tmp_path, _set("data.haystack", [str(big)])), capsys, 2, "more than a haystack file can be")
    assert not (tmp_path / "runs").exists()


@contextlib.contextmanager
def read_only_folder(tmp_path):
    """A folder this process cannot write in: permissions for a user, a read-only tmpfs for root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "ropesearch-test", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("root, and no read-only file system can be mounted here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("command", ["train", "eval", "export", "pretrain"])
def test_a_read_only_destination_is_a_fault_of_the_environment(tmp_path, capsys, command):
    with read_only_folder(tmp_path) as folder:
        out = str(folder / "out")
        argv = {"train": ["train", str(train_config(tmp_path, small())), "--out", out],
                "eval": ["eval", eval_config(tmp_path), "--out", out],
                "export": ["export", str(factor_file(tmp_path)), "--to", "hf", "--model", "tiny", "--out", out],
                "pretrain": ["pretrain", recipe(tmp_path), "--work-dir", out]}[command]
        err = refused(argv, capsys, 1, "cannot write in", seconds=30.0)
        assert "choose another" in err and not any(folder.iterdir())


def test_a_full_disk_during_a_gguf_export_leaves_nothing(tmp_path, capsys):
    from tests.test_export import small_gguf

    source = small_gguf(tmp_path / "model.gguf")
    factors = factor_file(tmp_path)
    (tmp_path / "exports").mkdir()
    before = snapshot(tmp_path)
    limit = source.stat().st_size // 2  # the copy cannot be written whole, as on a full disk
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, previous[1]))
    try:
        code = main(["export", str(factors), "--to", "gguf", "--model", str(source), "--out",
                     str(tmp_path / "exports" / "out.gguf")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "cannot write" in err and "--out" in err, err
    assert "run folder" not in err and "Traceback" not in err
    assert snapshot(tmp_path) == before  # no .tmp left


def test_a_second_train_on_a_folder_in_use_is_refused(tmp_path, capsys):
    from mixed_window_train.finetune import claimed_run_folder, load_finetune_config

    path = train_config(tmp_path, small())
    config, _ = load_finetune_config(path)
    out = tmp_path / "runs" / "o"
    with claimed_run_folder(out, config):  # another `train --out` of this config holds it
        before = snapshot(tmp_path)
        err = refused(["train", str(path), "--out", str(out)], capsys, 1, "in use by another training")
        assert snapshot(tmp_path) == before and "run the same command again" in err
