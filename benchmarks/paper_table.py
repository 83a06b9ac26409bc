"""LongRoPE2's comparison, the table users read: base, YaRN and the searched factors, each before and after
the same mixed-window fine-tune, per held-out needle format at each target length, with the general-text
perplexity inside the window and the GPU time of each fine-tune.

It reads the fine-tunes' own `evaluation.json` files (`ropesearch train` writes them; a searched config
and its YaRN control at one target, same data, steps, seed and tokens) and writes one JSON file with the
rows and the searched-vs-YaRN change of needle PPL per format, and prints the table in Markdown:

    python -m benchmarks.paper_table --pair 32768 benchmarks/results/h200/train-smollm2-32k-evaluation.json \
        benchmarks/results/h200/train-smollm2-32k-yarn-evaluation.json --out benchmarks/results/h200/paper-table.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BASE, BEFORE, AFTER = "base (no scaling)", "base + searched factors", "mixed-window trained"  # evaluation.json's rows


def _row(model: dict, key: str = "formats") -> dict:
    return {name: {"needle_ppl": cell["needle_ppl"], "retrieval": cell["retrieval"]} for name, cell in model[key].items()}


def paired(searched_nll: list[float], yarn_nll: list[float], draws: int = 10_000, seed: int = 0) -> dict:
    """The searched model against YaRN's on the same documents: on how many it has the lower answer NLL,
    and a bootstrap 90 % interval (documents resampled) of its needle PPL relative to YaRN's, which is
    exp(mean NLL difference) - 1: with 8 documents a format, a difference is a claim only outside it."""
    difference = np.asarray(searched_nll, dtype=float) - np.asarray(yarn_nll, dtype=float)
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, len(difference), (draws, len(difference)))].mean(axis=1)
    low, high = np.exp(np.quantile(means, [0.05, 0.95])) - 1
    return {"documents_lower": int((difference < 0).sum()), "documents": len(difference),
            "needle_ppl_vs_yarn_90": [float(low), float(high)]}


def length_table(length: int, searched_file: Path, yarn_file: Path) -> dict:
    """One target length: the rows of both fine-tunes' evaluations and the change the searched factors make."""
    searched, yarn = (json.loads(Path(f).read_text()) for f in (searched_file, yarn_file))
    s, y = searched["evaluation"], yarn["evaluation"]
    base_s, base_y = _row(s[BASE]), _row(y[BASE])
    if base_s.keys() != base_y.keys() or any(
            not np.isclose(base_s[n]["needle_ppl"], base_y[n]["needle_ppl"], rtol=1e-3) for n in base_s):
        # the base model is scored in both: different scores mean different documents (or a changed config)
        raise ValueError(f"{searched_file} and {yarn_file} score the base model differently: not the same "
                         "held-out documents, so not a comparison")
    rows = {
        "base": {"formats": _row(s[BASE]), "short_ppl": s[BASE]["short_ppl"]},
        "base, in window": {"formats": _row(s[BASE], "formats_in_window")},
        "yarn": {"formats": _row(y[BEFORE]), "short_ppl": y[BEFORE]["short_ppl"]},
        "searched": {"formats": _row(s[BEFORE]), "short_ppl": s[BEFORE]["short_ppl"]},
        "yarn + fine-tune": {"formats": _row(y[AFTER]), "short_ppl": y[AFTER]["short_ppl"]},
        "searched + fine-tune": {"formats": _row(s[AFTER]), "short_ppl": s[AFTER]["short_ppl"]},
    }
    base_short = s[BASE]["short_ppl"]
    for row in rows.values():
        if "short_ppl" in row:
            row["short_cost"] = {n: ppl / base_short[n] - 1 for n, ppl in row["short_ppl"].items()}
    change = {}
    for name, cell in rows["searched + fine-tune"]["formats"].items():
        control = rows["yarn + fine-tune"]["formats"][name]
        change[name] = {
            "needle_ppl_vs_yarn": cell["needle_ppl"] / control["needle_ppl"] - 1,
            "retrieval_at_least_yarns": cell["retrieval"] >= control["retrieval"],
            "base_retrieval_in_window": rows["base, in window"]["formats"][name]["retrieval"],
        }
        documents = s[AFTER]["formats"][name].get("document_nll"), y[AFTER]["formats"][name].get("document_nll")
        if None not in documents:  # evaluations written before each document's NLL was kept have none
            change[name].update(paired(*documents))
    return {
        "length": length,
        "files": {"searched": str(searched_file), "yarn": str(yarn_file)},
        "rows": rows,
        "searched_vs_yarn_after_fine_tune": change,
        # each fine-tune's GPU time, its evaluation included
        "searched_gpu_seconds": searched["seconds"] + searched["evaluation_seconds"],
        "yarn_gpu_seconds": yarn["seconds"] + yarn["evaluation_seconds"],
    }


def markdown(table: dict) -> str:
    names = list(table["rows"]["base"]["formats"])
    lengths = list(table["rows"]["base"]["short_ppl"])
    head = "| model | " + " | ".join(names) + " | " + " | ".join(f"text cost @{n}" for n in lengths) + " |"
    lines = [f"at {table['length']} tokens, needle PPL (retrieval)", head, "|" + "---|" * (1 + len(names) + len(lengths))]
    for label, row in table["rows"].items():
        if label == "base, in window":
            continue
        cells = [f"{row['formats'][n]['needle_ppl']:.4g} ({row['formats'][n]['retrieval']:.0%})" for n in names]
        costs = [f"{row['short_cost'][n]:+.1%}" for n in lengths]
        lines.append(f"| {label} | " + " | ".join(cells + costs) + " |")
    change = table["searched_vs_yarn_after_fine_tune"]
    lines.append("| searched vs YaRN, both fine-tuned | " + " | ".join(
        f"{change[n]['needle_ppl_vs_yarn']:+.1%}" for n in names) + " |" + " |" * len(lengths))
    if all("documents_lower" in change[n] for n in names):
        lines.append("| documents where searched is lower; 90 % interval | " + " | ".join(
            f"{change[n]['documents_lower']}/{change[n]['documents']}; "
            f"{change[n]['needle_ppl_vs_yarn_90'][0]:+.0%} to {change[n]['needle_ppl_vs_yarn_90'][1]:+.0%}"
            for n in names) + " |" + " |" * len(lengths))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LENGTH", "SEARCHED", "YARN"),
                        help="a target length and the evaluation.json of its searched fine-tune and its YaRN control")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()
    try:
        tables = [length_table(int(length), Path(s), Path(y)) for length, s, y in args.pair]
    except (OSError, ValueError, KeyError) as error:
        print(f"paper_table: {error}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps({"lengths": tables}, indent=2) + "\n")
    for table in tables:
        print(markdown(table), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
