"""Run records: metrics as JSON lines and CSV (rewritten atomically), and a PNG of loss and accuracy."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` (one row per logged step)."""
    _atomic_write(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    columns = sorted({key for row in history for key in row}, key=lambda k: (k != "step", k))
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out / "metrics.csv")


def read_metrics(out: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The logged rows of an earlier run up to ``up_to_step`` (for ``--resume``)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["step"] <= up_to_step]


def plot_metrics(out: Path, history: list[dict[str, Any]], title: str) -> Path:
    """``metrics.png``: training loss (left) and the held-out metric (right: accuracy for
    classification, perplexity for a causal LM) against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "loss" in r]
    metric = "eval_accuracy" if any("eval_accuracy" in r for r in history) else "eval_perplexity"
    evals = [r for r in history if metric in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        left.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
        right.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="tab:green")
    left.set_xlabel("step"), left.set_ylabel("cross-entropy"), left.legend()
    right.set_xlabel("step"), right.set_ylabel(metric.replace("eval_", "held-out "))
    if metric == "eval_accuracy":
        right.set_ylim(0, 1.02)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
