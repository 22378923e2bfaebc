"""Reports: the one home of how evaluation results are written down.

What `vlmkit eval` leaves on disk, in DIR (`write_report`):

  DIR/<stem>.json             the summary (n, accuracy, per_category, yes_no, circular, bad rows)
  DIR/<stem>.md               the same as Markdown tables
  DIR/<stem>.png              accuracy per category as a bar chart (matplotlib, Agg backend)
  DIR/<stem>.predictions.jsonl one line per evaluated row (reply, parsed answer, correct, scores)

and the pieces every report is built from, `vlmkit demo`'s included (train/demo.py):

  percent(x)                                      0.8312 -> "83.1"
  category_table(per_category, columns)           the per-category Markdown table
  plot_categories(per_category, series, path)     the per-category bar chart, one bar per series
  plot_stage_values(stages, values, path)         one value after each stage of a curriculum, as a line
  benchmark_chance(per_category, chance_of)       chance accuracy of a benchmark, per category and
                                                  overall (weighted by questions)
  compare_with_baselines(model, blind, chance_of) a model's accuracy beside its blind baseline and
                                                  chance, per category and overall
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

REPORT_STEM = "eval"
MARKDOWN_BAD_ROWS = 50
"""Bad rows listed in the Markdown report (the JSON lists all of them)."""
SERIES_COLORS = ("#4c72b0", "#dd8452", "#999999")
"""Bar colours of a chart's series, in order (model, blind baseline, chance)."""
OVERALL_COLOR = "#c44e52"
BASELINE_SERIES = [("accuracy", "model"), ("blind_accuracy", "blind (no image)"), ("chance_accuracy", "chance")]
"""The series of a `compare_with_baselines` table: key in each category's row, chart label."""

PerCategory = dict[str, dict[str, Any]]
"""{category: {"n": questions, <accuracy keys>: float in [0, 1], ...}}"""


def percent(x: float) -> str:
    """A ratio as a percentage with one decimal, the form every report table uses."""
    return f"{100 * x:.1f}"


def category_table(per_category: PerCategory, columns: list[tuple[str, str]]) -> list[str]:
    """Markdown lines of a table with a row per category: its name, its questions, then one
    percentage column per (header, key) of `columns`."""
    lines = ["| category | questions | " + " | ".join(header for header, _ in columns) + " |",
             "| --- | ---: |" + " ---: |" * len(columns)]
    for category, row in per_category.items():
        lines.append(f"| {category} | {row['n']} | " + " | ".join(percent(row[key]) for _, key in columns) + " |")
    return lines


def plot_categories(per_category: PerCategory, series: list[tuple[str, str]], path: Path, *, ylabel: str,
                    title: str | None = None, overall: float | None = None) -> None:
    """A bar chart of `per_category` written to `path` (PNG): per category, one bar per (key, label)
    of `series`, side by side; `overall` adds a dashed line at that accuracy."""
    plt = _pyplot()
    cats = list(per_category)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(4.0, (0.3 + 0.27 * len(series)) * len(cats) + 2), 3.4))
    for k, ((key, label), color) in enumerate(zip(series, SERIES_COLORS)):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(cats))], [100 * per_category[c][key] for c in cats], width,
               label=label, color=color)
    if overall is not None:
        ax.axhline(100 * overall, color=OVERALL_COLOR, linestyle="--", label=f"overall {percent(overall)}%")
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    _save(plt, fig, ax, path, ylabel=ylabel, title=title)


def plot_stage_values(stages: list[str], values: list[float], path: Path, *, ylabel: str, title: str | None = None,
                      log_y: bool = False) -> None:
    """A line chart written to `path` (PNG): one value measured after each stage (e.g. held-out text
    perplexity), the stage names on the x axis in curriculum order, each point labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(stages) + 2), 3.4))
    ax.plot(range(len(stages)), values, "o-", color=SERIES_COLORS[0])
    for i, value in enumerate(values):
        ax.annotate(f"{value:.3g}", (i, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _save(plt, fig, ax, path, ylabel=ylabel, title=title)


def _pyplot():
    """matplotlib's pyplot on the Agg backend. Imported only when a chart is drawn: it takes a
    second to import, and the commands that never draw one should not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, *, ylabel: str, title: str | None) -> None:
    """Label the y axis (and title), lay out, write the PNG and free the figure."""
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def benchmark_chance(per_category: PerCategory, chance_of: Callable[[str], float]) -> tuple[float, dict[str, float]]:
    """Expected accuracy of uniform guessing on a benchmark: `chance_of(category)` per category
    (e.g. data/synth.py's `chance_accuracy`), overall the mean weighted by each category's questions."""
    per_cat = {c: chance_of(c) for c in per_category}
    total = sum(row["n"] for row in per_category.values())
    overall = sum(per_cat[c] * row["n"] for c, row in per_category.items()) / total if total else 0.0
    return overall, per_cat


def compare_with_baselines(model: dict[str, Any], blind: dict[str, Any],
                           chance_of: Callable[[str], float]) -> dict[str, Any]:
    """A model's evaluation summary beside its blind baseline's (the same questions, images blanked;
    eval/runner.py's `evaluate_with_blind`) and chance:

        {"accuracy", "blind_accuracy", "chance_accuracy", "n",
         "per_category": {category: {"n", "accuracy", "blind_accuracy", "chance_accuracy"}}}
    """
    chance, chance_per_cat = benchmark_chance(model["per_category"], chance_of)
    per_category = {c: {"n": row["n"], "accuracy": row["accuracy"],
                        "blind_accuracy": blind["per_category"][c]["accuracy"],
                        "chance_accuracy": chance_per_cat[c]}
                    for c, row in model["per_category"].items()}
    return {"accuracy": model["accuracy"], "blind_accuracy": blind["accuracy"], "chance_accuracy": chance,
            "n": model["n"], "per_category": per_category}


def markdown_report(report: dict[str, Any]) -> str:
    """Markdown tables: the headline, per category, the yes/no metrics and the bad rows."""
    title = f"# {report['benchmark']} ({report['mode']}{', circular' if report.get('circular') else ''}" \
            f"{', blind' if report.get('blind') else ''})"
    lines = [title, "", "| questions | correct | accuracy (%) |", "| ---: | ---: | ---: |",
             f"| {report['n']} | {report['correct']} | {percent(report['accuracy'])} |", ""]
    if report.get("vanilla"):
        v = report["vanilla"]
        lines += [f"Without rotations (vanilla): {percent(v['accuracy'])}% of {v['n']}.", ""]
    lines += category_table(report["per_category"], [("accuracy (%)", "accuracy")])
    if report.get("yes_no"):
        y = report["yes_no"]
        lines += ["", "| yes/no | accuracy | precision | recall | F1 | yes-ratio |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {y['n']} | {percent(y['accuracy'])} | {percent(y['precision'])} | {percent(y['recall'])} | "
                  f"{percent(y['f1'])} | {percent(y['yes_ratio'])} |"]
    bad = report.get("bad_rows", {})
    if bad.get("count"):
        lines += ["", f"{bad['count']} row(s) skipped:", "", "| row | id | reason |", "| ---: | --- | --- |"]
        lines += [f"| {b['index']} | {b['id'] or ''} | {b['reason']} |" for b in bad["rows"][:MARKDOWN_BAD_ROWS]]
    return "\n".join(lines) + "\n"



def plot_report(report: dict[str, Any], path: Path) -> None:
    """Accuracy per category, with the overall accuracy as a dashed line."""
    plot_categories(report["per_category"], [("accuracy", "accuracy")], path, ylabel="accuracy (%)",
                    title=f"{report['benchmark']} ({report['mode']})", overall=report["accuracy"])


def write_report(report: dict[str, Any], rows: list[dict[str, Any]], out_dir: str | Path,
                 stem: str = REPORT_STEM) -> dict[str, Path]:
    """Write the JSON, Markdown, PNG and per-row predictions; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png",
             "predictions": out / f"{stem}.predictions.jsonl"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown_report(report))
    plot_report(report, paths["png"])
    with open(paths["predictions"], "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return paths
