"""What an evaluation leaves on disk, in DIR:

  DIR/<stem>.json             the summary (n, accuracy, per_category, yes_no, circular, bad rows)
  DIR/<stem>.md               the same as Markdown tables
  DIR/<stem>.png              accuracy per category as a bar chart (matplotlib, Agg backend)
  DIR/<stem>.predictions.jsonl one line per evaluated row (reply, parsed answer, correct, scores)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_STEM = "eval"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_report(report: dict[str, Any]) -> str:
    """Markdown tables: the headline, per category, the yes/no metrics and the bad rows."""
    title = f"# {report['benchmark']} ({report['mode']}{', circular' if report.get('circular') else ''}" \
            f"{', blind' if report.get('blind') else ''})"
    lines = [title, "", "| questions | correct | accuracy (%) |", "| ---: | ---: | ---: |",
             f"| {report['n']} | {report['correct']} | {_pct(report['accuracy'])} |", ""]
    if report.get("vanilla"):
        v = report["vanilla"]
        lines += [f"Without rotations (vanilla): {_pct(v['accuracy'])}% of {v['n']}.", ""]
    lines += ["| category | questions | accuracy (%) |", "| --- | ---: | ---: |"]
    lines += [f"| {c} | {s['n']} | {_pct(s['accuracy'])} |" for c, s in report["per_category"].items()]
    if report.get("yes_no"):
        y = report["yes_no"]
        lines += ["", "| yes/no | accuracy | precision | recall | F1 | yes-ratio |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {y['n']} | {_pct(y['accuracy'])} | {_pct(y['precision'])} | {_pct(y['recall'])} | "
                  f"{_pct(y['f1'])} | {_pct(y['yes_ratio'])} |"]
    bad = report.get("bad_rows", {})
    if bad.get("count"):
        lines += ["", f"{bad['count']} row(s) skipped:", "", "| row | id | reason |", "| ---: | --- | --- |"]
        lines += [f"| {b['index']} | {b['id'] or ''} | {b['reason']} |" for b in bad["rows"][:50]]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(report["per_category"])
    accs = [100 * report["per_category"][c]["accuracy"] for c in cats]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(cats) + 2), 3.2))
    ax.bar(cats, accs, color="#4c72b0")
    ax.axhline(100 * report["accuracy"], color="#c44e52", linestyle="--", label=f"overall {_pct(report['accuracy'])}%")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report['benchmark']} ({report['mode']})")
    ax.legend(loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
