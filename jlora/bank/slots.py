"""The adapter bank as a pytree: ``stack`` N adapters into one, ``put`` / ``clear`` / ``take`` a slot.

Shapes and the math: see :mod:`jlora.bank`.
"""
from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import LoraConfig
from jlora.plan import Target, make_plan
from jlora.tree import KeyPath, Tree, adapter_modules, flatten, is_variables_dict, unflatten

BASE = -1  # the adapter id of "no adapter": the base model
BANK_KEYS = ("bank_a", "bank_b", "bank_scale")


@dataclasses.dataclass(frozen=True)
class BankTarget:
    """One adapted kernel of a bank: where it is and its axis roles (static, part of the treedef)."""

    path: str                       # module path, e.g. "model/layers/0/self_attn/q_proj"
    module_key: KeyPath             # key path of the module dict in params
    stack_dims: int                 # leading nn.scan axes of its kernel
    in_dims: int                    # contracted (fan_in) axes
    slices: tuple[bool, ...] | None  # a fused projection's enabled slices (GPT-2 c_attn), else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """N adapters with one padded rank, stacked per kernel (see the module docstring for shapes).

    Attributes:
      factors: ``{module key path: {"lora_a": (*stack, N, *in, R), "lora_b": (*stack, N, R, *out)}}``
        as a tree mirroring params (the trainable part: take gradients w.r.t. it).
      scales: the same tree with ``(N,)`` float32 scales per kernel (0 where a slot has no adapter).
      ranks: the same tree with ``(N,)`` int32 ranks per kernel (0 where a slot has no adapter).
      targets: static ``(BankTarget, ...)``; ``rank``: the padded rank R; ``in_variables``: whether
        params is a linen variables dict; ``per_row``: slot ``b`` is example ``b``'s (:func:`jlora.bank.rows`).
    """

    factors: Tree
    scales: Tree
    ranks: Tree
    targets: tuple[BankTarget, ...] = dataclasses.field(metadata=dict(static=True))
    rank: int = dataclasses.field(metadata=dict(static=True))
    in_variables: bool = dataclasses.field(metadata=dict(static=True))
    per_row: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def size(self) -> int:
        """N, the number of slots."""
        first = self.targets[0]
        return int(_leaf(self.scales, first.module_key).shape[0])

    def occupied(self) -> list[int]:
        """Slots that hold an adapter (some kernel with rank > 0)."""
        used = np.zeros(self.size, bool)
        for t in self.targets:
            used |= np.asarray(_leaf(self.ranks, t.module_key)) > 0
        return [int(i) for i in np.flatnonzero(used)]

    def replace(self, **changes: Any) -> "AdapterBank":
        """A copy with fields replaced, e.g. ``bank.replace(factors=trained)`` in a multi-tenant train step."""
        return dataclasses.replace(self, **changes)

    def nbytes(self) -> int:
        """Bytes of the stacked factors (what the bank adds to the base's memory)."""
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(self.factors))


def _leaf(tree: Tree, module_key: KeyPath) -> Any:
    for key in module_key:
        tree = tree[key]
    return tree


def _plan(params: Tree, lora: Tree | None, config: LoraConfig, model: Any, inputs: tuple | None,
          caller: str) -> dict[KeyPath, Target]:
    """``{module key path: Target}`` of ``lora`` (or of what ``config`` selects), Dense-like kernels only."""
    plan = make_plan(params, config, lora=lora, model=model, inputs=inputs, caller=caller)
    out = {}
    for target in plan.values():
        if target.kind != "dense":
            raise ValueError(f"{caller}: {target.path!r} is an embedding table ({target.layer}); adapter banks cover "
                             "Dense-like layers (Dense, DenseGeneral, Conv1D, fused projections) only. Drop that "
                             "target from the adapter, or merge it into the base")
        out[target.key_path[:-1]] = target
    return out


def stack(adapters: Sequence[tuple[Tree, LoraConfig]], params: Tree, *, size: int | None = None,
          rank: int | None = None, cover: LoraConfig | None = None, model: Any = None, inputs: tuple | None = None,
          dtype: Any = None) -> AdapterBank:
    """Stack adapters ``[(lora, config), ...]`` (slot ``i`` = ``adapters[i]``) into an :class:`AdapterBank`.

    Args:
      adapters: adapter trees over ``params`` with their LoraConfigs (ranks, alphas, targets may differ).
      params: the base params they were made for (the plan checks each adapter against it).
      size: N, the number of slots (default ``len(adapters)``); extra slots are empty (rank 0, scale 0)
        and can be filled later with :func:`put` without recompiling.
      rank: the padded rank R (default the largest rank given); leave room for adapters put later.
      cover: a LoraConfig whose selected kernels (and rank) the bank covers besides the adapters'
        (room for adapters :func:`put` later, e.g. a server's bank may start empty: ``adapters=[]``).
      model, inputs: the model (and a linen model's example inputs), when axis roles cannot be read off
        the adapters' shapes (as for ``jlora.merge``; rarely needed: the adapters fix them).
      dtype: dtype of the stacked factors (default: the first adapter's).

    Every kernel any adapter targets gets a bank entry; slots whose adapter does not target it hold zeros.
    """
    if not adapters and (size is None or cover is None):
        raise ValueError("jlora.bank.stack: adapters is empty; give at least one (lora, config) pair, or size= and "
                         "cover= (a LoraConfig saying which kernels, at which rank, the bank holds)")
    plans = [_plan(params, lora, config, model, inputs, f"jlora.bank.stack: adapters[{i}]")
             for i, (lora, config) in enumerate(_pairs(adapters, "jlora.bank.stack"))]
    size = len(adapters) if size is None else size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < max(len(adapters), 1):
        raise ValueError(f"jlora.bank.stack: size must be an int >= max(1, the {len(adapters)} adapters given), "
                         f"got {size!r}")
    if cover is not None:
        plans.append(_plan(params, None, cover, model, inputs, "jlora.bank.stack: cover"))
    top = max(t.rank for plan in plans for t in plan.values())
    rank = top if rank is None else int(rank)
    if rank < top:
        raise ValueError(f"jlora.bank.stack: rank={rank} is below the largest adapter rank {top}")
    dtype = jnp.dtype(dtype or (jax.tree_util.tree_leaves(adapters[0][0])[0].dtype if adapters else jnp.float32))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"jlora.bank.stack: dtype must be a floating dtype (float32, bfloat16, ...), got {dtype}")
    targets: dict[KeyPath, Target] = {}
    for plan in plans:
        for key, t in plan.items():
            seen = targets.setdefault(key, t)
            if (seen.slices, seen.layout) != (t.slices, t.layout):
                raise ValueError(f"jlora.bank.stack: adapters disagree on {t.path!r}: fused slices {seen.slices} vs "
                                 f"{t.slices}, layout {seen.layout} vs {t.layout}; one bank needs one layout per kernel")
    records = tuple(BankTarget(t.path, key, t.layout.stack_dims, len(t.axes[1]), t.slices)
                    for key, t in sorted(targets.items(), key=lambda kv: kv[1].path))
    factors, scales, ranks = {}, {}, {}
    for rec in records:
        lead, fan_in, fan_out = targets[rec.module_key].axes  # lead: nn.scan axes, then a fused slice axis
        a_shape, b_shape = (*lead, *fan_in, rank), (*lead, rank, *fan_out)
        s = rec.stack_dims
        factors[(*rec.module_key, "lora_a")] = np.zeros((*a_shape[:s], size, *a_shape[s:]), dtype)
        factors[(*rec.module_key, "lora_b")] = np.zeros((*b_shape[:s], size, *b_shape[s:]), dtype)
        scales[rec.module_key] = np.zeros(size, np.float32)
        ranks[rec.module_key] = np.zeros(size, np.int32)
    bank = AdapterBank(unflatten(factors), unflatten(scales), unflatten(ranks), records, rank, is_variables_dict(params))
    return _fill(bank, {i: (pair, plan) for i, (pair, plan) in enumerate(zip(adapters, plans[:len(adapters)]))})


def _pairs(adapters: Any, caller: str) -> list[tuple[Tree, LoraConfig]]:
    pairs = list(adapters)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], LoraConfig)):
            raise TypeError(f"{caller}: adapters[{i}] must be a (lora, LoraConfig) pair, got {type(pair).__name__}")
    return pairs


def _fill(bank: AdapterBank, slots: dict[int, tuple[tuple[Tree, LoraConfig], dict[KeyPath, Target]]],
          caller: str = "jlora.bank.stack") -> AdapterBank:
    """``bank`` with each ``slot`` holding its adapter (padded to R), scale and rank; other kernels zeroed."""
    factors, scales, ranks = flatten(bank.factors), flatten(bank.scales), flatten(bank.ranks)
    scales, ranks = {k: np.array(v) for k, v in scales.items()}, {k: np.array(v) for k, v in ranks.items()}
    known = {rec.module_key for rec in bank.targets}
    for slot, ((lora, _), plan) in slots.items():
        extra = sorted(t.path for key, t in plan.items() if key not in known)
        if extra:
            raise ValueError(f"{caller}: the adapter for slot {slot} adapts {extra}, which the bank has no entry for "
                             f"(it covers {[r.path for r in bank.targets]}); stack a bank that includes them")
        pairs = adapter_modules(lora)
        for rec in bank.targets:
            a_key, b_key = (*rec.module_key, "lora_a"), (*rec.module_key, "lora_b")
            a_bank, b_bank = factors[a_key], factors[b_key]
            s = rec.stack_dims
            where = (slice(None),) * s + (slot,)
            a_slot, b_slot = (x.shape[:s] + x.shape[s + 1:] for x in (a_bank, b_bank))
            target = plan.get(rec.module_key)
            if target is None:
                a, b, scale, rank = jnp.zeros(a_slot), jnp.zeros(b_slot), 0.0, 0
            else:
                if target.rank > bank.rank:
                    raise ValueError(f"{caller}: the adapter for slot {slot} has rank {target.rank} at {target.path!r}, "
                                     f"above the bank's rank {bank.rank}; stack the bank with rank={target.rank} or more")
                pair = pairs[rec.module_key]
                a, b = jnp.asarray(pair["lora_a"]), jnp.asarray(pair["lora_b"])
                lead = a.ndim - rec.in_dims - 1
                a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, bank.rank - target.rank)])
                b = jnp.pad(b, [(0, 0)] * lead + [(0, bank.rank - target.rank)] + [(0, 0)] * (b.ndim - lead - 1))
                scale, rank = target.scale, target.rank
            if a.shape != a_slot or b.shape != b_slot:
                raise ValueError(f"{caller}: slot {slot}'s adapter at {rec.path!r} has shapes {a.shape}, {b.shape} after "
                                 f"padding to rank {bank.rank}; the bank holds {a_slot}, {b_slot}")
            factors[a_key] = _set(a_bank, where, a)
            factors[b_key] = _set(b_bank, where, b)
            scales[rec.module_key][slot], ranks[rec.module_key][slot] = scale, rank
    return dataclasses.replace(bank, factors=unflatten({k: jnp.asarray(v) for k, v in factors.items()}),
                               scales=unflatten({k: jnp.asarray(v) for k, v in scales.items()}),
                               ranks=unflatten({k: jnp.asarray(v) for k, v in ranks.items()}))


def _set(array: Any, where: tuple, value: jax.Array) -> Any:
    """``array`` with ``array[where] = value``: in place for the numpy buffers :func:`stack` fills (one copy
    for all its slots), functionally for a bank's jax arrays (:func:`put`, :func:`clear`)."""
    if isinstance(array, np.ndarray):
        array[where] = np.asarray(value, array.dtype)
        return array
    return array.at[where].set(value.astype(array.dtype))


def _check_slot(bank: AdapterBank, slot: Any, caller: str) -> int:
    try:
        index = operator.index(slot) if not isinstance(slot, bool) else None
    except TypeError:
        index = None
    if index is None or not 0 <= index < bank.size:
        raise ValueError(f"{caller}: slot must be an int in [0, {bank.size}), got {slot!r}")
    return int(index)


def put(bank: AdapterBank, slot: int, lora: Tree, config: LoraConfig, params: Tree, *,
        model: Any = None, inputs: tuple | None = None) -> AdapterBank:
    """``bank`` with ``slot`` replaced by ``(lora, config)`` (checked against ``params``).

    Every shape stays, so functions jitted over the bank do not recompile (hot swap). The adapter may
    have a lower rank than the bank's (zero padded) and target a subset of its kernels; a higher rank
    or a kernel the bank lacks is an error naming it.
    """
    slot = _check_slot(bank, slot, "jlora.bank.put")
    plan = _plan(params, lora, config, model, inputs, f"jlora.bank.put: slot {slot}")
    return _fill(bank, {slot: ((lora, config), plan)}, "jlora.bank.put")


def clear(bank: AdapterBank, slot: int) -> AdapterBank:
    """``bank`` with ``slot`` emptied (zeros, scale 0): its examples get the base model."""
    slot = _check_slot(bank, slot, "jlora.bank.clear")
    return _fill(bank, {slot: (({}, None), {})}, "jlora.bank.clear")


def take(bank: AdapterBank, slot: int) -> tuple[dict[str, Any], LoraConfig]:
    """Slot ``slot`` as an ordinary ``(lora, config)``: its own ranks (padding dropped) and scales.

    ``jlora.merge(params, *take(bank, i))`` is the model that example with id ``i`` runs through.
    """
    slot = _check_slot(bank, slot, "jlora.bank.take")
    flat, ranks, alphas = {}, {}, {}
    for rec in bank.targets:
        rank = int(np.asarray(_leaf(bank.ranks, rec.module_key))[slot])
        if rank == 0:
            continue
        pair = _leaf(bank.factors, rec.module_key)
        a, b = (jnp.take(pair[k], slot, axis=rec.stack_dims) for k in ("lora_a", "lora_b"))
        lead = a.ndim - rec.in_dims - 1
        flat[(*rec.module_key, "lora_a")] = a[..., :rank]
        flat[(*rec.module_key, "lora_b")] = jax.lax.slice_in_dim(b, 0, rank, axis=lead)
        ranks[rec.path] = rank
        alphas[rec.path] = float(np.asarray(_leaf(bank.scales, rec.module_key))[slot]) * rank
    if not flat:
        raise ValueError(f"jlora.bank.take: slot {slot} is empty (occupied: {bank.occupied()})")
    first = next(iter(ranks))
    fused = {rec.path: rec.slices for rec in bank.targets if rec.slices is not None and rec.path in ranks}
    config = LoraConfig(r=ranks[first], lora_alpha=alphas[first], target_modules=tuple(ranks),
                        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != ranks[first]},
                        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alphas[first]},
                        enable_lora={re.escape(p): m for p, m in fused.items()})
    return unflatten(flat), config


def select(bank: AdapterBank, adapter_ids: Any) -> jax.Array:
    """``adapter_ids`` as an int32 (batch,) array, checked when concrete: each in ``[-1, N)`` (-1: the base).

    Traced ids (inside ``jax.jit``) cannot be checked: there an id outside ``[-1, N)`` gives its row NaN
    outputs (never another adapter's, nor the base's silently).
    """
    if isinstance(adapter_ids, jax.core.Tracer):
        if adapter_ids.ndim != 1 or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
            raise ValueError(f"adapter_ids: expected a 1-D integer array (one id per example), got shape "
                             f"{adapter_ids.shape} dtype {adapter_ids.dtype}")
        return adapter_ids.astype(jnp.int32)
    try:
        ids = np.asarray(adapter_ids)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adapter_ids: expected a 1-D integer array (one id per example), got {adapter_ids!r:.80} "
                         f"({err})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"adapter_ids: expected a 1-D integer array (one id per example), got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)  # before any cast to int32 can wrap
    if low < BASE or high >= bank.size:
        raise ValueError(f"adapter_ids: ids must lie in [-1, {bank.size}) (-1 = the base model, else a slot of the "
                         f"{bank.size}-slot bank), got values in [{low}, {high}]")
    return jnp.asarray(ids, jnp.int32)
