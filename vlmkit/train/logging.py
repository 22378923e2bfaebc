"""What a run tells its user: a tqdm progress bar, metrics as JSONL and TensorBoard, and a
loss-curve PNG at the end.

DIR/metrics.jsonl holds one JSON object per logged step (global_step, stage, loss, loss/<source>,
lr, grad_norm, tokens_per_s, packing_efficiency, moe load ...) and one per eval point
(`"eval": true`). On resume the file is cut back to the resumed step, so a killed-and-resumed
run leaves the same lines as an uninterrupted one (apart from timings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """JSONL always; TensorBoard and the progress bar when asked (rank 0 only)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 progress: bool = True, resume_step: int = 0):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.path = self.out_dir / METRICS_FILE
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # deferred: slow to import, and optional

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)
        self.progress = progress

    def _truncate(self, resume_step: int) -> None:
        """Drop lines past the resumed step (they belong to work the resume will redo)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("global_step", 0) <= resume_step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is gone too
        self.path.write_text("".join(line + "\n" for line in keep))

    def start_stage(self, name: str, total: int, done: int) -> None:
        if self.enabled and self.progress:
            self.close_bar()
            self.bar = tqdm(total=total, initial=done, desc=name, unit="step", dynamic_ncols=True, leave=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("global_step", 0)
        if self.tb is not None:
            prefix = "eval/" if record.get("eval") else "train/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "global_step":
                    self.tb.add_scalar(prefix + key, value, step)

    def advance(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.1e}"}
            if "tokens_per_s" in record:
                post["tok/s"] = f"{record['tokens_per_s']:.0f}"
            self.bar.set_postfix(post, refresh=False)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(out_dir: str | Path, file_name: str = "loss.png") -> Path | None:
    """Training loss (per source, faint) and eval loss over global steps, stage boundaries marked."""
    records = read_metrics(out_dir)
    train = [r for r in records if not r.get("eval") and "loss" in r]
    if not train:
        return None
    import matplotlib  # deferred: slow to import, needed once at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["global_step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="train loss", lw=1.2)
    sources = sorted({k for r in train for k in r if k.startswith("loss/")})
    for key in sources:
        pts = [(r["global_step"], r[key]) for r in train if key in r and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), lw=0.6, alpha=0.5, label=key)
    for key in sorted({k for r in records if r.get("eval") for k in r if k.startswith("eval_loss/")}):
        pts = [(r["global_step"], r[key]) for r in records if r.get("eval") and key in r]
        ax.plot(*zip(*pts), "o--", ms=3, label=key)
    prev = None
    for r in train:
        if prev is not None and r["stage"] != prev:
            ax.axvline(r["global_step"] - 0.5, color="grey", lw=0.6, ls=":")
        prev = r["stage"]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = Path(out_dir) / file_name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
