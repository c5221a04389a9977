"""The run folder of ``jlora finetune`` (both tasks): refused early, made late, removed when a run made it
and stopped before it saved anything.

A run checks its ``--out`` before anything loads (:func:`check_out`), makes it only once the model, data
and adapter plan passed their checks (:func:`prepare_out`), and :func:`jlora.app.finetune.finetune`
runs the job inside :func:`removed_if_unstarted`: a refused run leaves no folder
behind, and with ``--overwrite`` the old one stays until the new run can start.
"""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def check_out(options: Any) -> Path:
    """The run folder, refused early (before anything is loaded): ``--resume`` needs its checkpoints,
    an existing non-empty folder needs ``--overwrite``, a file is no folder. Nothing is created or removed here."""
    out = Path(options.out)
    for folder in (out, *out.parents):  # the nearest one that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise FileExistsError(f"--out {out}{'' if folder == out else f': {folder}'} is a file, not a folder; "
                                      "the run writes a folder there: choose another --out")
            break
    if options.resume:
        if not (out / "checkpoints").is_dir():
            raise FileNotFoundError(f"--resume: {out} has no checkpoints/ to resume from")
    elif out.exists() and any(out.iterdir()) and not options.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it or "
                              "--resume to continue it")
    return out


_MADE: set[Path] = set()  # run folders prepare_out made (or emptied) in this process, while their run lasts


def prepare_out(options: Any) -> Path:
    """:func:`check_out`, then the folder made (emptied first with ``--overwrite``). Call it once the
    run's checks passed: a refused run must leave no folder, and with ``--overwrite`` the old one."""
    out = check_out(options)
    if options.resume:
        return out
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _MADE.add(out.absolute())
    return out


@contextlib.contextmanager
def removed_if_unstarted(out: str | Path) -> Iterator[None]:
    """Around a run: if :func:`prepare_out` made ``out`` in it and the run stops (an error, Ctrl-C) before
    it saved anything (no ``metrics.jsonl``, no checkpoint), the folder is removed."""
    key = Path(out).absolute()
    try:
        yield
    except BaseException:
        checkpoints = key / "checkpoints"
        if key in _MADE and not (key / "metrics.jsonl").exists() and \
                not (checkpoints.is_dir() and any(checkpoints.iterdir())):
            shutil.rmtree(key, ignore_errors=True)
        raise
    finally:
        _MADE.discard(key)
