"""Adapter checkpoints with orbax: trainable tree + optimizer state + step + config, never the base.

Each step is an orbax ``CheckpointManager`` step holding two items:

* ``state``: ``{"trainable": ..., "opt_state": ...}`` (``StandardSave``; sharded arrays are
  written by every host in parallel and can be restored onto another mesh);
* ``meta``: JSON with the :class:`LoraConfig`, the step, user metrics and the *base fingerprint*:
  a hash of every base leaf's path, shape, dtype and first elements, so that restoring onto a
  different base model fails with an error instead of silently training a mismatched adapter.

orbax writes each step to a temporary folder and renames it when complete, so a process killed
mid-save leaves no checkpoint that ``latest_step`` would pick; ``CheckpointManager`` removes the
leftovers on the next start. Saves are asynchronous where orbax offers it (the device-to-host copy
is synchronous, the writes run in the background); ``wait`` blocks until they are on disk.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jlora.config import LoraConfig
from jlora.tree import Tree, flatten, key_path_str

FINGERPRINT_ELEMENTS = 64


def base_fingerprint(params: Tree) -> str:
    """sha256 of every base leaf's path, shape, dtype and first 64 values (cheap, exact across meshes)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(flatten(params).items()):
        digest.update(f"{key_path_str(path)}|{tuple(leaf.shape)}|{leaf.dtype}|".encode())
        head = np.asarray(jax.device_get(jax.numpy.ravel(leaf)[:FINGERPRINT_ELEMENTS]))
        digest.update(head.tobytes())
    return digest.hexdigest()


def _abstract(tree: Any, shardings: Any = None) -> Any:
    if shardings is None:
        return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class AdapterCheckpointer:
    """Save and restore LoRA training state for one base model and config.

    Args:
      directory: where the step folders go (created if missing).
      config: the run's :class:`LoraConfig` (recorded; must match on restore).
      params: the frozen base params (only fingerprinted, never written).
      max_to_keep: keep the newest N steps.
      async_save: write in the background (call :meth:`wait` before reading the files).
    """

    def __init__(self, directory: str | os.PathLike, config: LoraConfig, params: Tree, *, max_to_keep: int = 3,
                 async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep: expected >= 1, got {max_to_keep}")
        self.config, self.fingerprint = config, base_fingerprint(params)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "meta"))

    def save(self, step: int, trainable: Tree, opt_state: Any, *, metrics: dict[str, Any] | None = None,
             force: bool = True) -> bool:
        """Save ``step``; returns whether a save was started."""
        meta = {"step": int(step), "config": self.config.to_dict(), "base_fingerprint": self.fingerprint,
                "metrics": metrics or {}}
        return self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=force)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of ``step`` (default: latest)."""
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, trainable_like: Tree, opt_state_like: Any, *, step: int | None = None,
                shardings: tuple[Any, Any] | None = None) -> tuple[int, Tree, Any]:
        """``(step, trainable, opt_state)`` of ``step`` (default: latest), checked against this run.

        ``*_like`` give the structure (arrays or ``jax.ShapeDtypeStruct``s); ``shardings`` =
        ``(trainable shardings, opt_state shardings)`` places the result, e.g. on another mesh.

        Raises:
          FileNotFoundError: no complete checkpoint.
          ValueError: the checkpoint was made for another base model or another LoraConfig.
        """
        step = self._step(step)
        meta = self.read_meta(step)
        if meta["base_fingerprint"] != self.fingerprint:
            raise ValueError(f"checkpoint step {step} in {self.manager.directory} was made for another base model "
                             f"(fingerprint {meta['base_fingerprint'][:12]}..., this base {self.fingerprint[:12]}...)")
        saved = LoraConfig.from_dict(meta["config"])
        if saved != self.config:
            raise ValueError(f"checkpoint step {step} was made with {saved}, not with this run's {self.config}")
        target = {"trainable": _abstract(trainable_like, shardings and shardings[0]),
                  "opt_state": _abstract(opt_state_like, shardings and shardings[1])}
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        return step, state["trainable"], state["opt_state"]

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.manager.directory}")
        return step

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "AdapterCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
