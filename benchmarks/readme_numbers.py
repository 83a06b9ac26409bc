"""Every number the README's `## Results` section and docs/results.md quote comes from a committed file in
benchmarks/results/.

A quoted number is found when some number in a results file (JSON, CSV, YAML; every value, at any
depth) gives it at the quoted precision, directly or in a simple derived form: as a percentage
(0.376 -> 37.6 %), as a change in percent (1.033 -> +3.3 %), as minutes and seconds (431 s ->
"7 min 11 s"), or as minutes (210 s -> "3.5 min"). A ratio ("0.69x") or a percentage quoted to a
decimal may also be the ratio of two numbers of one file (or its change in percent).
Numbers that are not measurements (bar thresholds, sizes and settings of a run) are listed in
`NOT_MEASURED` with the phrase they stand in, so the list stays short and reviewable.

    python -m benchmarks.readme_numbers        # prints what is not found; exit 1 if anything
"""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
import sys
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# A number with its unit as the README writes it: "1.235", "82 %", "+3.3 %", "0.69x", "7 min 11 s".
NUMBER = re.compile(
    r"(?P<sign>[+−-])?(?P<value>\d[\d,]*(?:\.\d+)?)"
    r"(?:\s*(?P<unit>%|x\b|min(?:\s+(?P<sec>\d+)\s*s\b)?|s\b|GB\b|GPU-minutes))?"
)
# Numbers that are not measurements: bars, settings and sizes of a run. Matched on the text just
# before a number (BEFORE) or just after it (AFTER); each rule names the kind of phrase it stands in.
BEFORE = [
    r"[≥≤~]\s*$",  # a bar ("≥ 30 %", "≤ 10 min") or an approximate setting ("~2s")
    r"bar:\s*(within\s*)?$",  # "bar: within 10 %"
    r"(above|nearer|pair|keep_best:|documents:|seed)\s*$",  # the guard's limit, config values
    r"@$",  # a length in a table header (@1024)
    r"LongRoPE's\s*$",  # the LongRoPE formula's value, sqrt(1 + ln s / ln L): computed, not measured
]
AFTER = [
    r"\s*x\b(?!\S)",  # placeholder, see is_setting
    r"\s*(search |held-out )?(documents|generations|steps|evaluations|windows|cores|Ray workers|formats)\b",
    r"\s*of \d+ documents",  # "8 of 32 documents": the first stage's size
    r"\s*(and \d+ )?generations",
]


def is_setting(match: re.Match, before: str, after: str) -> bool:
    if match.group("unit") == "x" and "." not in match.group("value"):
        return True  # a scale (4x, 2x): set by the config
    return any(re.search(rule, before) for rule in BEFORE) or any(re.match(rule, after) for rule in AFTER[1:])


def results_section(readme: Path = REPO / "README.md") -> str:
    text = readme.read_text()
    start = text.index("## Results")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


SECONDS = re.compile(r"second|_s$|^wall|duration")  # keys whose numbers are durations in seconds


def file_numbers(path: Path) -> list[tuple[float, str]]:
    """Every number in a results file, with the key it stands under ("" where it has none)."""
    found: list[tuple[float, str]] = []

    def walk(node, key=""):
        if isinstance(node, bool):
            return
        if isinstance(node, (int, float)):
            if math.isfinite(node):
                found.append((float(node), key))
        elif isinstance(node, dict):
            for name, value in node.items():
                walk(value, str(name))
        elif isinstance(node, list):
            for value in node:
                walk(value, key)
        elif isinstance(node, str):
            for match in re.finditer(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", node):
                found.append((float(match.group()), ""))

    if path.suffix == ".json":
        walk(json.loads(path.read_text()))
    elif path.suffix in (".yaml", ".yml"):
        walk(yaml.safe_load(path.read_text()))
    elif path.suffix == ".db":
        found += study_numbers(path)
    elif path.suffix == ".csv":
        with path.open() as f:
            for row in csv.reader(f):
                for cell in row:
                    try:
                        walk(float(cell), "seconds" if "second" in ",".join(row[:1]) else "")
                    except ValueError:
                        pass
    return found


def study_numbers(path: Path) -> list[tuple[float, str]]:
    """A committed Optuna study: its values, its trials' float parameters and numeric attributes (a
    trial's attention factor, its short-window cost), and its search loop's span (first trial's start to
    the last one's end, seconds), evaluations and documents scored per second (with the run's config
    beside it)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        values = [v for (v,) in db.execute("SELECT value FROM trial_values") if v is not None]
        values += [v for (v,) in db.execute("SELECT param_value FROM trial_params") if v is not None]
        attributes = [json.loads(v) for (v,) in db.execute("SELECT value_json FROM trial_user_attributes")]
        values += [v for v in attributes if isinstance(v, (int, float)) and not isinstance(v, bool)]
        first, last, count = db.execute(
            "SELECT min(datetime_start), max(datetime_complete), count(*) FROM trials WHERE state = 'COMPLETE'"
        ).fetchone()
    found = [(v, "value") for v in values] + [(float(count), "evaluations")]
    if first and last:
        span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
        found.append((span, "span_seconds"))
        config = path.with_name(path.name.replace("-study.db", "-config.yaml"))
        if config.exists() and span > 0:
            documents = yaml.safe_load(config.read_text())["needles"]["documents"]
            found.append((count * documents / span, "documents_per_s"))
    return found


def all_files() -> dict[Path, list[tuple[float, str]]]:
    kinds = (".json", ".yaml", ".yml", ".csv", ".db")
    return {p: file_numbers(p) for p in sorted(RESULTS.rglob("*")) if p.suffix in kinds}


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _matches(value: float, quoted: float, decimals: int) -> bool:
    return abs(round(value, decimals) - quoted) < 0.5 * 10**-decimals + 1e-12


def candidates_for(match: re.Match) -> tuple[list[tuple[float, int]], str]:
    """The forms a file's number may take to give this quote: [(quoted value, decimals)] and the kind."""
    raw = match.group("value").replace(",", "")
    value, decimals = float(raw), _decimals(raw)
    sign = -1.0 if match.group("sign") in ("−", "-") else 1.0
    unit = (match.group("unit") or "").split()[0] if match.group("unit") else ""
    if unit == "min" and match.group("sec"):
        return [(value * 60 + float(match.group("sec")), 0)], "seconds"
    if unit == "min" or unit == "GPU-minutes":
        return [(value, decimals)], "minutes"
    if unit == "%":
        return [(sign * value, decimals)], "percent"
    if unit == "x":
        return [(value, decimals)], "ratio"
    if unit == "GB":
        return [(value * 1e9, decimals - 9)], "plain"  # bytes, to the quoted GB's precision
    return [(sign * value if match.group("sign") else value, decimals)], "plain"


def found_in(quote: re.Match, files: dict[Path, list[tuple[float, str]]]) -> Path | None:
    forms, kind = candidates_for(quote)
    for path, keyed in files.items():
        for quoted, decimals in forms:
            for n, key in keyed:
                if kind in ("seconds", "minutes") and not SECONDS.search(key):
                    continue  # a duration is only read from a duration
                if kind in ("plain", "ratio") and _matches(n, quoted, decimals):
                    return path
                as_percent = (100 * n, 100 * (n - 1), n)  # a fraction, a change, or already in percent
                if kind == "percent" and any(_matches(v, quoted, decimals) for v in as_percent):
                    return path
                if kind == "seconds" and abs(n - quoted) < 0.5:
                    return path
                if kind == "minutes" and _matches(n / 60, quoted, decimals):
                    return path
    # a ratio of two numbers of one file: for "0.69x" and for percentages quoted to a decimal (an
    # integer percentage is too easily hit by chance among the ratios of a few hundred numbers)
    if not (kind == "ratio" or kind == "percent" and forms[0][1] >= 1):
        return None
    for path, keyed in files.items():
        numbers = [n for n, _ in keyed]
        if len(numbers) <= 400:
            scale = 100.0 if kind == "percent" else 1.0
            for quoted, decimals in forms:
                for a in numbers:
                    for b in numbers:
                        if b and a != b:
                            r = a / b
                            if _matches(scale * r, quoted, decimals) or (kind == "percent" and (
                                    _matches(scale * (r - 1), quoted, decimals)
                                    or _matches(scale * (1 - r), quoted, decimals))):
                                return path
    return None


def quotes(section: str):
    """(match, the text before it on its line) for each number that is a measurement."""
    for line in section.splitlines():
        if line.startswith("#") or "`" in line and not re.search(r"\d", re.sub(r"`[^`]*`", "", line)):
            continue
        clean = re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line)  # file names, config keys
        for match in NUMBER.finditer(clean):
            before = clean[max(0, match.start() - 40) : match.start()]
            after = clean[match.end() : match.end() + 30]
            if re.search(r"[A-Za-z_]$", before) or re.match(r"[A-Za-z]", after) and not match.group("unit"):
                continue  # part of a name: SmolLM2-135M, H100, bf16, 8k
            if is_setting(match, before, after):
                continue
            yield match, line


RESULTS_PAGE = REPO / "docs" / "results.md"


def check(readme: Path = REPO / "README.md", page: Path | None = RESULTS_PAGE) -> list[str]:
    """What the README's Results section and the results page (all of it) quote and no file holds."""
    files = all_files()
    missing = []
    texts = [(readme.name, results_section(readme))] + ([(page.name, page.read_text())] if page else [])
    for name, text in texts:
        for match, line in quotes(text):
            if found_in(match, files) is None:
                missing.append(f"{name}: {match.group().strip()!r} in: {line.strip()[:110]}")
    return missing


def main() -> int:
    missing = check()
    for item in missing:
        print(item)
    print(f"{len(missing)} number(s) of the README's Results and docs/results.md in no file under "
          f"{RESULTS.relative_to(REPO)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
