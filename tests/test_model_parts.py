"""A model shipped as chunk packages: assembled once into the cache, used only with the publisher's hash.

The assembly is tested on small packages made here; the real Qwen2.5-Coder-0.5B (six packages, 491 MB)
where `ropesearch[qwen]` is installed (in CI it is: a missing one fails there)."""

from __future__ import annotations

import hashlib
import os

import pytest

from fitness import model_parts
from fitness.errors import RopeSearchError
from fitness.model_parts import QWEN25_CODER_05B, ChunkedModel, assembled


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """Three installed chunk packages (not importable as code, found by their location) and the model."""
    site = tmp_path / "site"
    chunks = [os.urandom(1000 + k) for k in range(3)]
    for k, chunk in enumerate(chunks, 1):
        (site / f"chunky_part{k}" / "data").mkdir(parents=True)
        (site / f"chunky_part{k}" / "__init__.py").write_text("raise ImportError('never imported')\n")
        (site / f"chunky_part{k}" / "data" / f"part{k}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    model = ChunkedModel(alias="chunky", file_name="chunky.gguf",
                         parts=tuple((f"chunky-part{k}", f"data/part{k}.bin") for k in range(1, 4)),
                         size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), install="pip install chunky")
    return model, site, whole


def test_parts_are_assembled_in_order_once(chunked):
    model, _, whole = chunked
    path = assembled(model)
    assert path.read_bytes() == whole and path.parent == model_parts.models_cache()
    assert sorted(p.name for p in path.parent.iterdir()) == ["chunky.gguf", "chunky.gguf.verified"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_a_verified_file_is_not_hashed_again_but_a_changed_one_is(chunked, monkeypatch):
    model, _, _ = chunked
    path = assembled(model)
    real_hash = model_parts._hash
    monkeypatch.setattr(model_parts, "_hash", lambda p: pytest.fail("hashed again"))
    assert assembled(model) == path
    monkeypatch.setattr(model_parts, "_hash", real_hash)
    before = path.stat().st_mtime_ns
    path.write_bytes(b"x" + path.read_bytes()[1:])  # same size, new mtime: checked again, refused
    # the clock behind mtime is coarse (a few ms): a rewrite within the same tick would keep it, as no
    # real edit of a verified file does
    os.utime(path, ns=(before + 10**9, before + 10**9))
    with pytest.raises(RopeSearchError, match="is not model 'chunky'.*delete it"):
        assembled(model)


def test_wrong_parts_leave_nothing_behind(chunked):
    model, site, _ = chunked
    (site / "chunky_part2" / "data" / "part2.bin").write_bytes(b"torn")
    with pytest.raises(RopeSearchError, match="concatenate to .* not .*reinstall them"):
        assembled(model)
    assert list(model_parts.models_cache().iterdir()) == []


def test_a_missing_package_names_what_to_install(chunked):
    model, site, _ = chunked
    (site / "chunky_part3" / "data" / "part3.bin").unlink()
    with pytest.raises(RopeSearchError, match="'chunky' needs chunky-part3: pip install chunky"):
        assembled(model)


def _qwen_installed() -> bool:
    try:
        QWEN25_CODER_05B.part_paths()
        return True
    except RopeSearchError:
        return False


@pytest.mark.skipif(not _qwen_installed() and os.environ.get("CI") != "true",
                    reason="ropesearch[qwen] is not installed (six packages, 491 MB)")
def test_qwen_is_a_named_model_with_its_geometry():
    from fitness.geometry import geometry_from_config
    from fitness.models import load_config, load_tokenizer

    geometry = geometry_from_config(load_config("qwen2.5-coder-0.5b"))
    assert (geometry.pairs, geometry.base, geometry.original_window) == (32, 1e6, 32768)
    assert type(load_config("qwen2.5-coder-0.5b")).__name__ == "Qwen2Config"
    assert load_tokenizer("qwen2.5-coder-0.5b")("def f(x):").input_ids
