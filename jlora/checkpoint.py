"""Adapter checkpoints with orbax: trainable tree + optimizer state + step + config, never the base.

Each step is an orbax ``CheckpointManager`` step holding two items: ``state``, ``{"trainable": ...,
"opt_state": ...}`` (``StandardSave``; sharded arrays are written by every host in parallel and can
be restored onto another mesh), and ``meta``, JSON with the :class:`LoraConfig`, the step, user
metrics, the :func:`base_fingerprint`, the record ``arrays`` of every saved array (key path, shape,
dtype, :func:`array_checksum`), the number of saving processes, and ``meta_sha256`` over the rest.

A checkpoint is restored exactly or refused (orbax checksums only its index files): ``restore``
checks the meta JSON against its sha256, then orbax's bookkeeping files and OCDBT index, lets
orbax read the arrays, and compares each one's checksum with the record. Any failure is one
:class:`CheckpointCorruptError` naming the step, the folder and the file or array at fault.
Changes that cannot alter what is restored pass: one that leaves a bookkeeping file well formed
(a timestamp digit in ``_CHECKPOINT_METADATA``), and any to the OCDBT nodes that orbax's merge
leaves superseded in ``state/ocdbt.process_*/`` (``state/manifest.ocdbt`` points at the live ones).

orbax writes each step to a temporary folder and renames it when complete, so a process killed
mid-save leaves no checkpoint that ``latest_step`` would pick; ``CheckpointManager`` removes the
leftovers on the next start. Saves are asynchronous where orbax offers it (the device-to-host copy
is synchronous, the writes run in the background); ``wait`` blocks until they are on disk.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from jlora.config import LoraConfig
from jlora.tree import Tree, flatten, key_path_str

META_FILE = "meta/metadata"
JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding")  # orbax 0.12's bookkeeping
COMMIT_FILES = ("commit_success.txt", "state/commit_success.txt", "meta/commit_success.txt")  # + folder named
COMMIT_TEXT = "Checkpoint commit was successful to "
_SEEDS = (0x9E3779B9, 0x7F4A7C15)


class CheckpointCorruptError(ValueError):
    """A checkpoint step whose files do not give back exactly what was saved: ``step``, ``directory``
    (the checkpoint folder), ``culprit`` (the file, relative to the step folder, or the array key
    path at fault), ``other_steps`` (the folder's other steps, to restore one with ``step=``)."""

    def __init__(self, step: int, directory: Any, culprit: str, detail: str, other_steps: list[int]):
        self.step, self.directory, self.culprit, self.other_steps = step, str(directory), culprit, other_steps
        hint = (f"other steps in this folder: {other_steps}; pass step= to restore one of them" if other_steps
                else "no other step in this folder")
        super().__init__(f"checkpoint step {step} in {directory} is corrupt: {culprit}: {detail} "
                         f"(restore refused; {hint})")


class _Fault(Exception):
    """A defect found in a step folder: ``args == (culprit, detail)``, culprit a file or an array."""


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finaliser: a bijection of uint32 that mixes every input bit into every output bit."""
    h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words: one per element, two (trailing axis) for 64-bit dtypes."""
    dtype = x.dtype
    if dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return _words(jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1))
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits
    if bits >= 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {4: jnp.uint4, 8: jnp.uint8, 16: jnp.uint16}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _checksum_words(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)  # row-major position (mod 2**32), built without a reshape
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return tuple(jnp.sum(_fmix32(words ^ _fmix32(index + np.uint32(seed))), dtype=jnp.uint32) for seed in _SEEDS)


def _hex(sums: tuple[Any, Any]) -> str:
    return "".join(f"{int(np.asarray(s)):08x}" for s in sums)


def _array(x: Any) -> jax.Array:
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def array_checksum(x: Any) -> str:
    """64-bit checksum (16 hex digits) of an array's bits, the same on any mesh and any host count.

    Computed inside jax by one jitted reduction: each element's bits as uint32 words ``w`` at
    row-major position ``i`` (64-bit dtypes give two words, complex ones real and imaginary parts)
    are summed as ``sum_i fmix32(w_i ^ fmix32(i + seed)) mod 2**32`` for two seeds (``fmix32``:
    murmur3's finaliser). Integer sums mod 2**32 do not depend on the reduction order, so a sharded,
    even not fully addressable, array gives the same replicated scalars as one on a single device.
    A change of one element changes both sums; random damage goes unnoticed with odds ~2**-64.
    """
    return _hex(_checksum_words(_array(x)))


def _shapes(tree: Any) -> dict[str, dict[str, Any]]:
    """``{"a/b/0/c": {"shape", "dtype"}}`` of every leaf: arrays, ``ShapeDtypeStruct``s, orbax metadata."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {jax.tree_util.keystr(p, simple=True, separator="/"): {"shape": list(x.shape), "dtype": str(x.dtype)}
           for p, x in flat}
    if len(out) == len(flat):
        return out
    raise ValueError("two leaves have the same '/'-joined key path: rename the key that holds a '/'")


def tree_checksums(tree: Any) -> dict[str, dict[str, Any]]:
    """``{key path: {"shape", "dtype", "checksum"}}`` of every leaf (one device fetch at the end)."""
    records = _shapes(tree)
    sums = jax.device_get([_checksum_words(_array(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])
    for record, s in zip(records.values(), sums):
        record["checksum"] = _hex(s)
    return records


def base_fingerprint(params: Tree) -> str:
    """sha256 of ``path|[shape]|dtype|array_checksum`` lines of every base leaf, sorted by key path.

    Covers every element of every leaf (one jitted pass each, compiled once per shape, dtype and
    sharding) and is exact across meshes and hosts, since :func:`array_checksum` is.
    """
    records = tree_checksums({key_path_str(path): leaf for path, leaf in flatten(params).items()})
    lines = "".join(f"{path}|{r['shape']}|{r['dtype']}|{r['checksum']}\n" for path, r in sorted(records.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_text(step_dir: Any, rel: str) -> str:
    try:
        return (step_dir / rel).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Fault(rel, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise _Fault(rel, "file missing" if isinstance(e, FileNotFoundError) else f"unreadable ({e})") from None


def _read_json(step_dir: Any, rel: str) -> dict[str, Any]:
    text = _read_text(step_dir, rel)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Fault(rel, f"not valid JSON ({e.msg} at char {e.pos} of {len(text)})") from None
    if not isinstance(value, dict):
        raise _Fault(rel, f"not a JSON object ({type(value).__name__})")
    return value


def _fault_from(error: BaseException, step_dir: Any, fallback: str) -> _Fault:
    """A :class:`_Fault` for an orbax/TensorStore exception: the culprit is the step-relative file
    its chain of causes blames, else the array it was reading, else ``fallback``; the detail is the
    innermost message's first line, without file paths (never the kB-long TensorStore spec)."""
    chain: list[BaseException] = []
    while error is not None and len(chain) < 8:
        chain.append(error)
        error = error.__cause__ or error.__context__
    text = "\n".join(map(str, chain))
    files = [path for path in re.findall(r'local file "([^"]+)"', text) if not path.endswith("/")]
    array = re.search(r'Error reading "([^"/]+)/', text)
    culprit = (os.path.relpath(files[0], str(step_dir)) if files
               else f"array {array.group(1).replace('.', '/')}" if array else fallback)
    line = next((ln for ln in str(chain[-1]).splitlines() if ln.strip()), "")
    kind = "" if type(chain[-1]) in (Exception, ValueError) else f"{type(chain[-1]).__name__}: "
    return _Fault(culprit, kind + re.sub(r'(?: in OCDBT database at| of| at)? local file "[^"]+"', "", line)[:200])


_READS: list[Any] = []  # step folders whose reads orbax began and did not end well, in this process


def _orbax_leftover(error: BaseException | None, tb: Any) -> bool:
    """An exception from the reads a failed orbax restore left in flight: raised in orbax's code or
    naming a step folder of :data:`_READS` (TensorStore's), or TensorStore's closed-loop callback."""
    frames = [(f.f_code.co_name, f.f_code.co_filename) for f, _ in traceback.walk_tb(tb)]
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        # TensorStore's callback into orbax's closed loop; its traceback may be gone by the time it is reported
        return (not frames or any(name == "call_soon_threadsafe" for name, _ in frames)
                or all(f"{os.sep}asyncio{os.sep}" in file for _, file in frames))
    return (any(f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in file for _, file in frames)
            or any(str(folder) in str(error) for folder in _READS))


def _quiet_log(record: logging.LogRecord) -> bool:
    error = record.exc_info or (None, None, None)
    return not (_READS and "never retrieved" in str(record.msg) and _orbax_leftover(*error[1:]))


def _quiet_orbax_leftovers() -> None:
    """Once a restore's reads began, keep orbax's leftovers off stderr (everything else passes).

    orbax gathers a restore's reads in an event loop of its own and closes it when the first read
    fails; the reads still in flight then complete into the closed loop, each reported through
    ``sys.unraisablehook`` ("RuntimeError: Event loop is closed" from TensorStore's callbacks,
    "Exception ignored in: <coroutine ... _read_array_index_and_device_put>" with a kB-long
    TensorStore spec) or the ``asyncio`` logger ("[_Gathering]Future exception was never retrieved").
    The restore has raised its one :class:`CheckpointCorruptError` by then.
    """
    logging.getLogger("asyncio").addFilter(_quiet_log)  # added once however often called
    # a read coroutine orbax created but never awaited once its loop closed (seen on Python 3.12)
    warnings.filterwarnings("ignore", message=r"coroutine '_read_array_index_and_device_put' was never awaited",
                            category=RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "jlora_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if not (_READS and _orbax_leftover(unraisable.exc_value, unraisable.exc_traceback)):
            previous(unraisable)

    hook.jlora_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _check_bookkeeping(step_dir: Any, meta: dict[str, Any]) -> None:
    """orbax's own files, before orbax reads the arrays: the JSON ones (one ``array_metadatas`` per
    saving process) parse; the commit markers say what orbax writes; the OCDBT index of ``state/``
    lists (reading its manifest and every b-tree node, each with a CRC-32C); orbax's metadata
    (``_METADATA``, ``_sharding``, each array's ``.zarray``) reads and describes the saved arrays."""
    for rel in (*JSON_FILES, *(f"state/array_metadatas/process_{i}" for i in range(meta["processes"]))):
        _read_json(step_dir, rel)
    for rel in COMMIT_FILES:  # "... successful to /path/to/<step>" (or to <step's tmp folder>/<item>)
        text, folder = _read_text(step_dir, rel), rel.split("/")[0] if "/" in rel else step_dir.name
        if not (text.startswith(COMMIT_TEXT) and re.search(rf"[/\\]{re.escape(folder)}$", text)):
            raise _Fault(rel, "not orbax's commit marker")
    if not (step_dir / "state" / "manifest.ocdbt").exists():
        raise _Fault("state/manifest.ocdbt", "file missing")
    url = str(step_dir / "state")
    spec = {"driver": "ocdbt", "base": (url if "://" in url else "file://" + os.path.abspath(url)) + "/"}
    handler, culprit = ocp.StandardCheckpointHandler(), "state/ (OCDBT b-tree)"
    try:
        ts.KvStore.open(spec, context=ts.Context()).result().list().result()
        culprit = "state/_METADATA or state/_sharding"
        found = _shapes(handler.metadata(step_dir / "state"))
    except Exception as e:  # noqa: BLE001 (TensorStore's ValueError: DATA_LOSS, ...; orbax's KeyError, ...)
        raise _fault_from(e, step_dir, culprit) from None
    finally:
        handler.close()
    if found != {path: {k: r[k] for k in ("shape", "dtype")} for path, r in meta["arrays"].items()}:
        raise _Fault("state/_METADATA", "describes other arrays than the meta record")


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
        """Save ``step`` with the checksum of every array; returns whether a save was started."""
        state = {"trainable": trainable, "opt_state": opt_state}
        meta = json.loads(json.dumps({"step": int(step), "config": self.config.to_dict(),
                                      "base_fingerprint": self.fingerprint, "metrics": metrics or {},
                                      "processes": jax.process_count(), "arrays": tree_checksums(state)}))
        meta["meta_sha256"] = _meta_digest(meta)
        return self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of ``step`` (default: latest); :class:`CheckpointCorruptError` if the file
        is missing, not JSON, or does not match its ``meta_sha256``."""
        step = self._step(step)
        with self._refusing(step):
            meta = _read_json(self.manager.directory / str(step), META_FILE)
            if not {"meta_sha256", "arrays", "processes"} <= set(meta):
                raise _Fault(META_FILE, "no array checksums or meta_sha256 (not written by this jlora version)")
            if meta["meta_sha256"] != _meta_digest(meta):
                raise _Fault(META_FILE, "contents do not match their sha256")
        return meta

    def restore(self, trainable_like: Tree, opt_state_like: Any, *, step: int | None = None,
                shardings: tuple[Any, Any] | None = None) -> tuple[int, Tree, Any]:
        """``(step, trainable, opt_state)`` of ``step`` (default: latest), checked against this run.

        ``*_like`` give the structure (arrays or ``jax.ShapeDtypeStruct``s); ``shardings`` =
        ``(trainable shardings, opt_state shardings)`` places the result, e.g. on another mesh.
        Every restored array is compared bit for bit (:func:`array_checksum`) with the saved one.

        Raises:
          FileNotFoundError: no complete checkpoint.
          CheckpointCorruptError: a file of the step is missing, truncated or altered; a corrupt
            latest step is refused too (the message lists the other steps, for ``step=``).
          ValueError: the checkpoint was made for another base model, another LoraConfig, or holds
            other arrays than ``*_like``.
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
        self._check_target(step, meta["arrays"], target)
        step_dir = self.manager.directory / str(step)
        with self._refusing(step):
            _quiet_orbax_leftovers()
            _READS.append(step_dir)
            _check_bookkeeping(step_dir, meta)
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))["state"]
            except Exception as e:  # noqa: BLE001 (orbax, TensorStore: any of their errors)
                raise _fault_from(e, step_dir, "state/") from None
            _READS.remove(step_dir)
            for path, record in tree_checksums(state).items():
                if record["checksum"] != meta["arrays"][path]["checksum"]:
                    raise _Fault(f"array {path}", f"checksum {record['checksum']} != saved "
                                                  f"{meta['arrays'][path]['checksum']} (data files altered)")
        return step, state["trainable"], state["opt_state"]

    def _check_target(self, step: int, arrays: dict[str, Any], target: Any) -> None:
        given = {path: [r["shape"], r["dtype"]] for path, r in _shapes(target).items()}
        saved = {path: [r["shape"], r["dtype"]] for path, r in arrays.items()}
        if diff := sorted(p for p in set(given) | set(saved) if given.get(p) != saved.get(p))[:3]:
            raise ValueError(f"checkpoint step {step} in {self.manager.directory} holds other arrays than the given "
                             f"structure: {diff} are {[saved.get(p) for p in diff]} there, "
                             f"{[given.get(p) for p in diff]} here ([shape, dtype], None: absent)")

    @contextlib.contextmanager
    def _refusing(self, step: int) -> Iterator[None]:
        """Turn a :class:`_Fault` found in ``step`` into a :class:`CheckpointCorruptError`."""
        try:
            yield
        except _Fault as fault:
            others = [s for s in self.all_steps() if s != step]
            raise CheckpointCorruptError(step, self.manager.directory, *fault.args, others) from None

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.manager.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no complete checkpoint step {step} in {self.manager.directory} "
                                    f"(steps: {self.all_steps()})")
        return step

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

