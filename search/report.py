"""Tables and plots: the held-out report, the status of a study, factor curves, fitness over time."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from optuna.trial import TrialState

from fitness.baselines import baseline
from fitness.factors import RopeCandidate
from fitness.geometry import RopeGeometry
from search.guard import CONSTRAINTS, SHORT_COST, VIOLATION, best_trial, violation
from search.objective import LABELS, NEEDLE_PPL, objective_value
from search.trial_keys import ERROR

CURVES = ("pi", "ntk", "yarn", "critical_ntk")


def _matplotlib():
    """pyplot, or None (with a warning) where matplotlib is missing: a search never fails on a plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots (pip install matplotlib)", stacklevel=3)
        return None
    return plt


def format_names(methods: dict) -> list[str]:
    """The needle formats a table of methods was broken down by (none for reports older than formats)."""
    names: list[str] = []
    for row in methods.values():
        names += [name for name in row.get("formats", {}) if name not in names]
    return names


def by_format(report: dict) -> dict[str, dict]:
    """Per needle format: searched against the best baseline on that format, and against YaRN (the bar
    the issue sets), needle PPL and retrieval."""
    summary = {}
    for name in format_names(report["methods"]):
        rows = {k: v["formats"][name] for k, v in report["methods"].items() if name in v.get("formats", {})}
        if "searched" not in rows:
            continue
        searched = rows.pop("searched")
        entry = {"documents": searched["documents"], "searched_ppl": searched["needle_ppl"],
                 "searched_retrieval": searched["retrieval"]}
        if rows:
            best = min(rows, key=lambda k: rows[k]["needle_ppl"])
            entry.update(best_baseline=best, best_baseline_ppl=rows[best]["needle_ppl"],
                         vs_best_baseline=searched["needle_ppl"] / rows[best]["needle_ppl"] - 1)
        if "yarn" in rows:
            entry.update(yarn_ppl=rows["yarn"]["needle_ppl"], yarn_retrieval=rows["yarn"]["retrieval"],
                         vs_yarn=searched["needle_ppl"] / rows["yarn"]["needle_ppl"] - 1)
        summary[name] = entry
    return summary


def gap_closed(report: dict) -> dict:
    """How much of the gap between the best baseline and the model's own in-window PPL the search closed;
    under "formats", searched against the baselines on each needle format."""
    baselines = {k: v["needle_ppl"] for k, v in report["methods"].items() if k != "searched"}
    best_name = min(baselines, key=baselines.get)
    best, searched, own = baselines[best_name], report["methods"]["searched"]["needle_ppl"], report["in_window"]
    gap = best - own
    return {
        "best_baseline": best_name,
        "best_baseline_ppl": best,
        "searched_ppl": searched,
        "in_window_ppl": own,
        "gap_closed": (best - searched) / gap if gap > 0 else float("nan"),
        "vs_best_baseline": searched / best - 1,
        "formats": by_format(report),
    }


def format_table_by_format(methods: dict, indent: str = "  ") -> list[str]:
    """Rows of methods, a "needle PPL (retrieval)" column per needle format; nothing for one format."""
    names = format_names(methods)
    if len(names) < 2:
        return []
    width = max(18, *(len(n) + 2 for n in names))
    lines = [f"{indent}{'per format':<14}" + "".join(f"{n:>{width}}" for n in names)]
    for method, row in sorted(methods.items(), key=lambda item: item[1]["needle_ppl"]):
        cells = ""
        for name in names:
            cell = row.get("formats", {}).get(name)
            text = f"{cell['needle_ppl']:.4g} ({cell['retrieval']:.0%})" if cell else "-"
            cells += f"{text:>{width}}"
        lines.append(f"{indent}{method:<14}{cells}")
    counts = {n: next(r["formats"][n]["documents"] for r in methods.values() if n in r.get("formats", {}))
              for n in names}
    lines.append(f"{indent}{'(documents)':<14}" + "".join(f"{counts[n]:>{width}}" for n in names))
    return lines


def format_report(report: dict) -> str:
    formats = format_names(report["methods"])
    lines = [
        f"held-out needle set at {report['length']} tokens ({report['documents']} documents, "
        f"haystack {', '.join(report['haystack'])}, " + (f"formats {', '.join(formats)}, " if formats else "")
        + f"seed {report['seed']}):",
        f"  {'method':<14}{'needle PPL':>12}{'retrieval':>11}",
    ]
    for name, row in sorted(report["methods"].items(), key=lambda item: item[1]["needle_ppl"]):
        lines.append(f"  {name:<14}{row['needle_ppl']:>12.4g}{row['retrieval']:>10.0%}")
    lines.append(
        f"  {'(in window)':<14}{report['in_window']:>12.4g}   at {report['original_window']} tokens, no scaling"
    )
    lines += format_table_by_format(report["methods"])
    summary = gap_closed(report)
    lines.append(
        f"searched vs best baseline ({summary['best_baseline']}): {summary['vs_best_baseline']:+.1%} needle PPL; "
        f"gap to the in-window PPL closed: {summary['gap_closed']:.0%}"
    )
    if len(summary["formats"]) > 1:
        lines.append("searched vs YaRN per format: " + ", ".join(
            f"{name} {row['vs_yarn']:+.1%} (retrieval {row['searched_retrieval']:.0%} vs {row['yarn_retrieval']:.0%})"
            for name, row in summary["formats"].items() if "vs_yarn" in row
        ))
    return "\n".join(lines)


def _cost(short_cost: float | None) -> str:
    return "" if short_cost is None else f", short-window cost {short_cost:+.1%}"


def _retrieval(retrieval: float | None) -> str:
    return "" if retrieval is None else f", retrieval {retrieval:.0%}"


def format_status(study, baselines: dict, total: int | None, sampler_state=None, what: str = "needle PPL") -> str:
    trials = study.get_trials(deepcopy=False)
    count = {state: sum(t.state == state for t in trials) for state in TrialState}
    settled = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
    lines = [
        f"study {study.study_name}: {settled} evaluations" + (f" of {total}" if total else "")
        + (f" ({count[TrialState.PRUNED]} pruned)" if count[TrialState.PRUNED] else "")
        + f", {count[TrialState.RUNNING]} running, {count[TrialState.FAIL]} failed"
    ]
    if sampler_state is not None:
        lines.append("all generations done" if sampler_state.finished else
                     f"generation {sampler_state.generation}: {len(sampler_state.open_slots)} slots open, "
                     f"{sampler_state.running} running")
    if count[TrialState.COMPLETE]:
        best = best_trial(study)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        guarded = [t for t in complete if t.system_attrs.get(CONSTRAINTS)]
        if guarded:  # the best below is the best feasible one: say how many the guards let through
            feasible = sum(violation(t) <= 0 for t in complete)
            lines.append(f"within the guards: {feasible} of {len(complete)} evaluations"
                         + ("" if violation(best) <= 0 else "; none yet, so the best is the least violating"))
        lines.append(f"best so far on the search documents: {what} {best.value:.4g} (trial {best.number}"
                     f"{_retrieval(best.user_attrs.get('retrieval'))}{_cost(best.user_attrs.get(SHORT_COST))})")
        for name, row in sorted(baselines.items(), key=lambda item: objective_value(item[1])):
            value = objective_value(row)
            lines.append(f"  {name:<14}{value:>10.4g}  ({best.value / value - 1:+.1%} searched vs it)"
                         + _cost(row.get(SHORT_COST))
                         + (f", outside the guards (by {row[VIOLATION]:.3g})" if row.get(VIOLATION, 0) > 0 else ""))
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        reasons = {}
        for t in failed:
            reason = str(t.system_attrs.get(ERROR, "unknown")).split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        lines.append("failures: " + ", ".join(f"{n}x {r}" for r, n in reasons.items()))
    return "\n".join(lines)


def short_text_table(short_text: dict, title: str, indent: str = "") -> list[str]:
    """Rows of methods, a "PPL (cost)" column per short length; one number format for the whole table."""
    lengths = list(next(iter(short_text.values())))
    large = any(rows[n]["ppl"] >= 1e5 for rows in short_text.values() for n in lengths)
    number = "{:>11.4e}" if large else "{:>11.5g}"
    width = max([16, *(len(name) + 2 for name in short_text)])
    lines = [title, f"{indent}{'method':<{width}}" + "".join(f"{n:>21}" for n in lengths)]
    for name, rows in short_text.items():
        cells = "".join(number.format(rows[n]["ppl"]) + f" ({rows[n]['cost']:>+7.1%})" for n in lengths)
        lines.append(f"{indent}{name:<{width}}{cells}")
    return lines


def format_short_report(result: dict) -> str:
    """Inside the window, on what the stage never read: text PPL (its text, and general English beside it)
    and held-out needles, for ones, the seeds and the searched short factors."""
    sources = ", ".join(result.get("text_sources", ["kjv"]))
    title = (f"short factors: text PPL inside the window ({sources}, evaluation part, {result['windows']} windows "
             f"per length; cost vs no scaling), attention factor {result['attention_factor']:.4g}")
    lines = short_text_table(result["methods"], title, indent="  ")
    if "general_english" in result:
        lines += short_text_table(result["general_english"], "  general English (kjv), which the model does not know",
                                  indent="  ")
    needles = result.get("window_needles")
    if needles:
        lengths = list(next(iter(needles["methods"].values())))
        lines.append(f"  held-out needles inside the window ({', '.join(needles['formats'])} on "
                     f"{', '.join(needles['haystack'])}, {needles['documents']} per length): needle PPL (retrieval)")
        lines.append(f"  {'method':<24}" + "".join(f"{n:>16}" for n in lengths))
        for name, rows in needles["methods"].items():
            cells = "".join(f"{rows[n]['needle_ppl']:>9.4g} ({rows[n]['retrieval']:>4.0%})" for n in lengths)
            lines.append(f"  {name:<24}{cells}")
    return "\n".join(lines)


def format_pruning(saved: dict) -> str:
    return (f"multi-fidelity: {saved['pruned']} of {saved['candidates']} candidates pruned after "
            f"{saved['first_stage_documents']} of {saved['documents']} documents; "
            f"{saved['scorings_saved']} candidate x document scorings saved ({saved['saved_fraction']:.0%})")


def plot_factors(candidate: RopeCandidate, geometry: RopeGeometry, target: int, path: Path) -> None:
    plt = _matplotlib()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    pairs = range(geometry.pairs)
    for name in CURVES:
        ax.plot(pairs, baseline(name, geometry, target).long_factors, label=name, lw=1, alpha=0.8)
    ax.plot(pairs, candidate.long_factors, label="searched", lw=2.5, color="black")
    if "critical_dim" in candidate.params:
        ax.axvline(candidate.params["critical_dim"], color="black", ls=":", lw=1, label="searched critical pair")
    ax.axvline(geometry.critical_dim(), color="gray", ls="--", lw=1, label="theoretical critical pair")
    ax.set_yscale("log")
    ax.set_xlabel("frequency pair i (0 = highest frequency)")
    ax.set_ylabel("rescale factor λ_i")
    ax.set_title(f"rescale factors for {target} tokens (s = {target / geometry.original_window:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_short_factors(candidate: RopeCandidate, seeds: dict[str, RopeCandidate], path: Path) -> None:
    """The searched short factors against the seeds they started from and the long factors."""
    plt = _matplotlib()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    pairs = range(candidate.geometry.pairs)
    ax.plot(pairs, candidate.long_factors, label="long (fixed)", lw=1.5, color="gray")
    for name, seed in seeds.items():
        ax.plot(pairs, seed.factors(long=False), label=f"seed {name}", lw=1, ls="--")
    ax.plot(pairs, candidate.factors(long=False), label="searched short", lw=2.5, color="black")
    ax.set_yscale("log")
    ax.set_xlabel("frequency pair i (0 = highest frequency)")
    ax.set_ylabel("rescale factor λ_i")
    ax.set_title(f"short factors (inside {candidate.geometry.original_window} tokens), attention factor "
                 f"{candidate.attention_factor:.4g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fitness(study, baselines: dict, path: Path, what: str = LABELS[NEEDLE_PPL]) -> None:
    plt = _matplotlib()
    if plt is None:
        return
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    trials = sorted(study.get_trials(deepcopy=False, states=states), key=lambda t: t.number)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return
    best, running = [], math.inf
    for trial in trials:
        running = min(running, trial.value) if trial.state == TrialState.COMPLETE else running
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(1, len(trials) + 1)
    for state, marker, label in (
        (TrialState.COMPLETE, "o", "evaluation"),
        (TrialState.PRUNED, "x", "pruned (first stage)"),
    ):
        points = [(i, t.value) for i, t in zip(x, trials) if t.state == state and t.value is not None]
        if points:
            ax.scatter(*zip(*points), s=8, alpha=0.4, marker=marker, label=label)
    ax.plot(x, best, color="black", lw=2, label="best so far")
    shown = [name for name in ("yarn", "ntk", "critical_ntk") if name in baselines] or list(baselines)[:4]
    for i, name in enumerate(shown):
        ax.axhline(objective_value(baselines[name]), ls="--", lw=1, label=name, color=f"C{i + 2}")
    ax.set_yscale("log")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(what)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lengths(results: dict, original_window: int, path: Path) -> None:
    """Needle PPL and retrieval against length, one line per method."""
    plt = _matplotlib()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, by_length in results.items():
        lengths = sorted(by_length, key=int)
        left.plot([int(n) for n in lengths], [by_length[n]["needle_ppl"] for n in lengths], marker="o", label=name)
        right.plot([int(n) for n in lengths], [by_length[n]["retrieval"] for n in lengths], marker="o", label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.axvline(original_window, color="gray", ls=":", lw=1)
        ax.set_xlabel("tokens")
    left.set_yscale("log")
    left.set_ylabel("needle PPL")
    right.set_ylabel("retrieval (exact match)")
    right.set_ylim(-0.02, 1.02)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def _by_length(ruler: dict) -> dict[str, dict[int, dict]]:
    """{method: {length: row}} with int lengths, whether the rows come from a run (ints) or eval.json (strings)."""
    return {name: {int(n): row for n, row in rows.items()} for name, rows in ruler.items()}


def ruler_tables(ruler: dict) -> list[str]:
    """RULER as the paper prints it: the average (percent) by method and length, then per task at each
    length."""
    ruler = _by_length(ruler)
    lengths = sorted({n for rows in ruler.values() for n in rows})
    width = max([16, *(len(name) + 2 for name in ruler)])
    lines = ["RULER average (%) by length", f"{'method':<{width}}" + "".join(f"{n:>10}" for n in lengths)]
    for name, rows in ruler.items():
        cells = [f"{rows[n]['average']:>10.1f}" if n in rows else f"{'-':>10}" for n in lengths]
        lines.append(f"{name:<{width}}" + "".join(cells))
    for n in lengths:
        rows = {name: by_length[n] for name, by_length in ruler.items() if n in by_length}
        tasks = [task for task in next(iter(rows.values())) if task != "average"]
        column = max(8, *(len(task) + 1 for task in tasks))
        lines.append(f"RULER by task at {n} tokens (%)")
        lines.append(f"{'method':<{width}}" + "".join(f"{task:>{column}}" for task in tasks))
        for name, row in rows.items():
            lines.append(f"{name:<{width}}" + "".join(f"{row[task]:>{column}.1f}" for task in tasks))
    return lines


def plot_ruler(ruler: dict, original_window: int, path: Path) -> None:
    """RULER average against length, one line per method, and each task's score at the longest length."""
    plt = _matplotlib()
    if plt is None:
        return
    ruler = _by_length(ruler)
    longest = max(n for rows in ruler.values() for n in rows)
    at_longest = {name: rows[longest] for name, rows in ruler.items() if longest in rows}
    tasks = [task for task in next(iter(at_longest.values())) if task != "average"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    for name, rows in ruler.items():
        left.plot(sorted(rows), [rows[n]["average"] for n in sorted(rows)], marker="o", label=name)
    left.set_xscale("log", base=2)
    left.axvline(original_window, color="gray", ls=":", lw=1)
    left.set_xlabel("tokens")
    left.set_ylabel("RULER average (%)")
    left.set_ylim(-2, 102)
    left.legend(fontsize=8)
    grid = [[row[task] for task in tasks] for row in at_longest.values()]
    right.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    right.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    right.set_yticks(range(len(at_longest)), list(at_longest), fontsize=8)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            color = "white" if value < 60 else "black"
            right.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color=color)
    right.set_title(f"by task at {longest} tokens (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
