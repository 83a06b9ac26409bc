"""How every benchmark ends: its result as JSON on stdout, and in `--out` when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(payload: dict, out: Path | None) -> None:
    text = json.dumps(payload, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
