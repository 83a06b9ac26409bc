"""Needle formats: every format and wording gives a token-exact document whose labels are its answer;
documents mix formats evenly; the default stays byte-identical; reports break results down by format."""

import hashlib
import math

import pytest
import torch

from fitness.errors import RopeSearchError
from fitness.evaluation import baseline_method, evaluate_methods
from fitness.geometry import geometry_from_config
from fitness.needle_formats import NEEDLE_FORMATS, WORDINGS
from fitness.needles import Haystack, NeedleSettings, build_document, build_needle_set
from search.report import format_report, gap_closed

EVERY_WORDING = [(name, i) for name in NEEDLE_FORMATS for i in range(len(WORDINGS[name]))]


@pytest.fixture(scope="module")
def tokenizer():
    from fitness.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def pydoc(tokenizer):
    return Haystack(tokenizer, ["pydoc"])


def test_at_least_five_formats_each_with_several_wordings():
    assert len(NEEDLE_FORMATS) >= 5 and all(len(WORDINGS[name]) >= 3 for name in NEEDLE_FORMATS)


@pytest.mark.parametrize("format_name, wording", EVERY_WORDING, ids=[f"{n}-{i}" for n, i in EVERY_WORDING])
def test_every_wording_is_token_exact_with_its_answer_as_labels(tokenizer, pydoc, format_name, wording):
    import random

    settings = NeedleSettings(formats=[format_name], wordings="all")
    ids, answers, meta = build_document(tokenizer, pydoc, settings, 400, random.Random(wording), 0.5, format_name,
                                        wording)
    assert len(ids) == 400 and answers[-1] == 399
    answer = meta["values"][meta["asked"]]
    assert tokenizer.decode([ids[i] for i in answers]).strip() == answer
    text = tokenizer.decode(ids)
    assert text.endswith(answer) and text.count(answer) >= 2  # in a needle and as the answer
    assert (meta["format"], meta["wording"]) == (format_name, wording)
    assert len(meta["depths"]) == len(meta["keys"]) and meta["depths"][meta["asked"]] == 0.5
    if format_name == "word":
        assert not any(c.isdigit() for c in answer)


def test_documents_mix_formats_evenly_and_deterministically(tokenizer):
    settings = NeedleSettings(documents=10, formats=list(NEEDLE_FORMATS), wordings="all", seed=5)
    a = build_needle_set(tokenizer, settings, 300, cache=False)
    b = build_needle_set(tokenizer, settings, 300, cache=False)
    assert torch.equal(a.input_ids, b.input_ids) and a.meta == b.meta
    assert {name: len(docs) for name, docs in a.formats().items()} == {name: 2 for name in NEEDLE_FORMATS}
    assert len({(m["format"], m["wording"]) for m in a.meta}) > len(NEEDLE_FORMATS)  # wordings vary too


# The bundled model's committed search history was made from these documents: the default (one format,
# its first wording) must keep building them byte for byte. Pinned for the haystack text this Python
# ships (its fingerprint); another Python's pydoc topics make other documents anyway.
PINNED = {  # (haystack, fingerprint, seed, depths): sha256 of the 32 documents of 1024 tokens and their labels
    ("pydoc", "461301e7ee2221fd", 0, None): "58818d7dd06b1ad8",
    ("docstrings", "dc5d20735a32775a", 1000, (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)):
        "4daa9f93a4c1eb36",
}


@pytest.mark.parametrize("haystack, fingerprint, seed, depths", list(PINNED), ids=["search", "holdout"])
def test_tiny_default_documents_are_unchanged(tokenizer, haystack, fingerprint, seed, depths):
    if Haystack(tokenizer, [haystack]).fingerprint != fingerprint:
        pytest.skip(f"this Python's {haystack} text differs from the one the pin was made with")
    settings = NeedleSettings(haystack=[haystack], documents=32, seed=seed, **({"depths": depths} if depths else {}))
    needles = build_needle_set(tokenizer, settings, 1024, cache=False)
    digest = hashlib.sha256(needles.input_ids.numpy().tobytes())
    for answer in needles.answers:
        digest.update(answer.numpy().tobytes())
    assert digest.hexdigest()[:16] == PINNED[(haystack, fingerprint, seed, depths)]
    assert {m["format"] for m in needles.meta} == {"magic_number"}


def test_idle_haystack_is_prose_of_some_size(tokenizer):
    idle = Haystack(tokenizer, ["idle"])
    assert sum(map(len, idle.pieces)) > 60_000
    text = tokenizer.decode([t for piece in idle.pieces[:400] for t in piece])
    assert "<p>" not in text and "IDLE" in text


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"formats": ["magic_number", "haiku"]}, "unknown needle format.*haiku.*known: magic_number, pass_key"),
        ({"formats": ["pass_key"], "wordings": {"pass_key": [9]}}, "wordings of 'pass_key' must be indices"),
        ({"formats": ["pass_key"], "wordings": {"word": [0]}}, "not in formats"),
    ],
)
def test_bad_format_settings_name_the_key(fields, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        NeedleSettings(**fields)


def test_unknown_format_in_build_document_is_one_line(tokenizer, pydoc):
    import random

    with pytest.raises(RopeSearchError, match="known: magic_number") as err:
        build_document(tokenizer, pydoc, NeedleSettings(), 300, random.Random(0), 0.5, "haiku")
    assert "\n" not in str(err.value)


def test_evaluation_and_report_break_results_down_by_format(tiny):
    model, tokenizer = tiny
    geometry = geometry_from_config(model.config)
    settings = NeedleSettings(documents=4, formats=["magic_number", "word"], seed=3)
    methods = {name: baseline_method(name, geometry) for name in ("none", "yarn")}
    results = evaluate_methods(model, tokenizer, settings, [512], methods, 4, 2, show_progress=False)
    for rows in results.values():
        row = rows[512]
        assert set(row["formats"]) == {"magic_number", "word"}
        assert sum(part["documents"] for part in row["formats"].values()) == 4
        # the overall PPL is the geometric mean of the per-format ones, weighted by documents
        mean_log = sum(math.log(p["needle_ppl"]) * p["documents"] for p in row["formats"].values()) / 4
        assert math.log(row["needle_ppl"]) == pytest.approx(mean_log, rel=1e-6)

    report = {"length": 512, "original_window": 256, "documents": 4, "haystack": ["pydoc"], "seed": 3,
              "methods": {"none": results["none"][512], "yarn": results["yarn"][512],
                          "searched": results["yarn"][512]}, "in_window": 1.5}
    summary = gap_closed(report)
    assert set(summary["formats"]) == {"magic_number", "word"}
    assert summary["formats"]["word"]["vs_yarn"] == 0
    text = format_report(report)
    assert "per format" in text and "word" in text and "searched vs YaRN per format" in text
