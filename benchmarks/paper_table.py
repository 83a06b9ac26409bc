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
from pathlib import Path

BASE, BEFORE, AFTER = "base (no scaling)", "base + searched factors", "mixed-window trained"  # evaluation.json's rows


def _row(model: dict, key: str = "formats") -> dict:
    return {name: {"needle_ppl": cell["needle_ppl"], "retrieval": cell["retrieval"]} for name, cell in model[key].items()}


def length_table(length: int, searched_file: Path, yarn_file: Path) -> dict:
    """One target length: the rows of both fine-tunes' evaluations and the change the searched factors make."""
    searched, yarn = (json.loads(Path(f).read_text()) for f in (searched_file, yarn_file))
    s, y = searched["evaluation"], yarn["evaluation"]
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
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LENGTH", "SEARCHED", "YARN"),
                        help="a target length and the evaluation.json of its searched fine-tune and its YaRN control")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()
    tables = [length_table(int(length), Path(s), Path(y)) for length, s, y in args.pair]
    Path(args.out).write_text(json.dumps({"lengths": tables}, indent=2) + "\n")
    for table in tables:
        print(markdown(table), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
