"""The one training loop of ``jlora finetune``, shared by its tasks (classification, causal LM).

A task hands over a jitted ``step(trainable, opt_state, frozen, batch)``, a ``batch_at(step)``
that is a function of the step alone (so a resumed run sees the same batches as an uninterrupted
one), an ``evaluate(trainable)`` for the held-out metrics and ``units(batch)``, the units that a
batch holds (``{"examples": 16}``, ``{"tokens": 2048}``) for the progress bar's rates. The loop
logs a row per step, evaluates and checkpoints every ``eval_every`` steps, writes the metrics,
and on Ctrl-C saves the last finished step and says how to continue.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jlora.app.report import write_metrics


@dataclasses.dataclass
class Loop:
    """What a task gives the loop (see the module docstring)."""

    step_fn: Callable[[Any, Any, Any, Any], tuple[Any, Any, Any]]
    batch_at: Callable[[int], Any]
    evaluate: Callable[[Any], dict[str, float]]
    units: Callable[[Any], dict[str, int]]
    out: Path
    steps: int
    eval_every: int
    checkpointer: Any = None
    progress: bool = True
    place: Callable[[Any], Any] = lambda batch: batch  # host batch -> device batch (e.g. on a mesh)
    primary: bool = True  # writes the metrics (process 0 of a multi-process run)
    describe: Callable[[dict[str, Any]], str] = lambda row: ", ".join(
        f"{k} {v:.4f}" for k, v in row.items() if k.startswith("eval_"))


def run(loop: Loop, trainable: Any, frozen: Any, opt_state: Any, start: int,
        history: list[dict[str, Any]]) -> tuple[Any, Any, float]:
    """Train steps ``start .. loop.steps - 1``; returns ``(trainable, opt_state, train_seconds)``.

    ``history`` (rows of finished steps, ``{"step": n}`` counting from 1) grows in place.
    """
    from tqdm import tqdm

    completed, t0 = start - 1, time.time()
    seen: dict[str, int] = {}
    bar = tqdm(range(start, loop.steps), initial=start, total=loop.steps, disable=not loop.progress,
               desc="finetune", unit="step")
    try:
        for step in bar:
            batch = loop.batch_at(step)
            new_trainable, new_opt_state, loss = loop.step_fn(trainable, opt_state, frozen, loop.place(batch))
            loss = float(loss)  # waits for the step: an interrupt before here leaves the previous step's state
            trainable, opt_state, completed = new_trainable, new_opt_state, step  # (nothing is donated)
            for unit, n in loop.units(batch).items():
                seen[unit] = seen.get(unit, 0) + n
            elapsed = time.time() - t0
            row = {"step": step + 1, "loss": loss, **{f"{u}_per_s": n / elapsed for u, n in seen.items()}}
            history.append(row)  # before anything an interrupt could cut short; eval adds to it
            bar.set_postfix(loss=f"{row['loss']:.4f}", **{u: f"{n / elapsed:.1f}/s" for u, n in seen.items()})
            if (step + 1) % loop.eval_every == 0 or step + 1 == loop.steps:
                row.update(loop.evaluate(trainable))
                bar.write(f"step {step + 1}: loss {row['loss']:.4f}, {loop.describe(row)}")
                if loop.checkpointer:
                    loop.checkpointer.save(step, trainable, opt_state, metrics=row)
            if (step + 1) % loop.eval_every == 0 and loop.primary:
                write_metrics(loop.out, history)
    except KeyboardInterrupt:
        bar.close()
        if loop.checkpointer and completed >= start:
            loop.checkpointer.save(completed, trainable, opt_state, metrics={"interrupted": True})
            loop.checkpointer.close()
            if loop.primary:
                write_metrics(loop.out, [row for row in history if row["step"] <= completed + 1])
            print(f"\ninterrupted after step {completed + 1}: checkpoint saved in {loop.out / 'checkpoints'}; "
                  f"continue with the same command plus --resume")
        raise
    bar.close()
    if loop.primary:
        write_metrics(loop.out, history)
    return trainable, opt_state, time.time() - t0
