"""Needle documents: exact length, labels as they stand in the input, determinism, bad input."""

import pytest
import torch

from fitness.errors import RopeSearchError
from fitness.needles import NeedleSettings, build_needle_set, sentences


@pytest.fixture(scope="module")
def tokenizer():
    from fitness.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.mark.parametrize("length", [200, 777, 2048])
def test_exact_length_and_answer_at_the_end(tokenizer, length):
    needles = build_needle_set(tokenizer, NeedleSettings(documents=6, needles_per_document=2), length)
    assert needles.input_ids.shape == (6, length)
    for j in range(6):
        positions = needles.answers[j]
        assert positions[-1].item() == length - 1  # the answer is the very end: never truncated
        assert torch.equal(positions, torch.arange(positions[0], length))


def test_labels_are_the_answer_tokens_of_the_input(tokenizer):
    needles = build_needle_set(tokenizer, NeedleSettings(documents=8), 600)
    for j, meta in enumerate(needles.meta):
        value = meta["values"][meta["asked"]]
        assert tokenizer.decode(needles.answer_ids(j)).strip() == value
        text = tokenizer.decode(needles.input_ids[j])
        assert text.endswith(value) and text.count(value) == 2  # the needle and the answer
        assert f"for {meta['keys'][meta['asked']]} is: {value}." in text


def test_labels_match_offsets_when_tokenized_whole(tokenizer):
    """Tokenizing the document's tail as one string gives the same answer tokens."""
    needles = build_needle_set(tokenizer, NeedleSettings(documents=3), 500)
    for j in range(3):
        tail = tokenizer.decode(needles.input_ids[j, -80:])
        again = tokenizer(tail, add_special_tokens=False)["input_ids"]
        n = len(needles.answers[j])
        assert again[-n:] == needles.answer_ids(j).tolist()


def test_needle_depths(tokenizer):
    settings = NeedleSettings(documents=4, depths=[0.0, 0.5, 1.0, 0.25])
    needles = build_needle_set(tokenizer, settings, 1500)
    for j, depth in enumerate(settings.depths):
        ids = needles.input_ids[j].tolist()
        value_ids = tokenizer(" " + needles.meta[j]["values"][0], add_special_tokens=False)["input_ids"][-7:]
        first = next(i for i in range(len(ids)) if ids[i : i + 7] == value_ids)
        assert abs(first / 1500 - depth) < 0.12


def test_deterministic_per_seed(tokenizer):
    a = build_needle_set(tokenizer, NeedleSettings(documents=4, seed=3), 400, cache=False)
    b = build_needle_set(tokenizer, NeedleSettings(documents=4, seed=3), 400, cache=False)
    c = build_needle_set(tokenizer, NeedleSettings(documents=4, seed=4), 400, cache=False)
    assert torch.equal(a.input_ids, b.input_ids) and a.meta == b.meta
    assert not torch.equal(a.input_ids, c.input_ids)


def test_cache_round_trip(tokenizer, tmp_path):
    settings = NeedleSettings(documents=3)
    first = build_needle_set(tokenizer, settings, 300)
    cached = list((tmp_path / "cache" / "needles").glob("*.pt"))
    assert len(cached) == 1
    second = build_needle_set(tokenizer, settings, 300)
    assert torch.equal(first.input_ids, second.input_ids) and first.meta == second.meta
    assert all(torch.equal(x, y) for x, y in zip(first.answers, second.answers))


def test_short_haystack_is_cycled_not_padded(tokenizer, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. A second sentence follows here."
    (tmp_path / "small.txt").write_text(text)
    needles = build_needle_set(tokenizer, NeedleSettings(documents=2, haystack=[str(tmp_path / "small.txt")]), 900)
    decoded = tokenizer.decode(needles.input_ids[0])
    assert decoded.count("lazy dog") >= 20
    hay = decoded.replace(" One of the special magic numbers", "\x00").split("\x00")[0]
    assert set(hay.split()) <= set(text.split()) | {"The", "quick", "A"}


def test_haystack_formats(tokenizer, tmp_path):
    folder = tmp_path / "hay"
    folder.mkdir()
    (folder / "a.md").write_text("# Title\nMarkdown text lives here. It has two sentences.")
    (folder / "b.jsonl").write_text('{"text": "Lines of JSON carry text fields."}\n{"text": "And more of them."}\n')
    needles = build_needle_set(tokenizer, NeedleSettings(documents=1, haystack=[str(folder)]), 300)
    text = tokenizer.decode(needles.input_ids[0])
    assert "JSON" in text and "Markdown" in text


def test_sentences_start_at_whitespace():
    pieces = sentences("First one. Second one!\nThird line")
    assert pieces == [" First one.", " Second one!", "\nThird line"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: NeedleSettings(haystack=[str(p / "empty.txt")]), "empty"),
        (lambda p: NeedleSettings(haystack=[str(p / "missing.txt")]), "no such file"),
        (lambda p: NeedleSettings(haystack=[str(p / "bad.jsonl")]), "text"),
    ],
)
def test_bad_haystack_is_one_line(tokenizer, tmp_path, make, message):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "bad.jsonl").write_text('{"body": "no text key"}\n')
    with pytest.raises(RopeSearchError, match=message) as err:
        build_needle_set(tokenizer, make(tmp_path), 300)
    assert "\n" not in str(err.value)


def test_too_short_target(tokenizer):
    with pytest.raises(RopeSearchError, match="too short"):
        build_needle_set(tokenizer, NeedleSettings(documents=1), 40)


@pytest.mark.parametrize(
    "field, template",
    [
        ("question_template", "What is the number for {key}?"),
        ("question_template", "The number {value} belongs to {key}."),
        ("needle_template", "A needle without a value for {key}."),
    ],
)
def test_template_without_answer_slot(field, template):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="value"):
        NeedleSettings(**{field: template})
