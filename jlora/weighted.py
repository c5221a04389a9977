"""``weighted_adapter``: several LoRA adapters combined into one, as PEFT's ``add_weighted_adapter``.

For adapters ``i`` with weights ``w_i``, scales ``s_i`` and, per targeted kernel, factors
``a_i (fan_in, r_i)``, ``b_i (r_i, fan_out)`` (delta ``D_i = s_i a_i @ b_i``), the result is one
adapter tree and a :class:`LoraConfig` whose scale is 1 (``lora_alpha = r``), made as PEFT 0.21
makes it (``peft/tuners/lora/model.py``, ``peft/utils/merge_utils.py``):

* ``cat``: ``a = [w_1 s_1 a_1 | w_2 s_2 a_2 | ...]``, ``b = [b_1; b_2; ...]``: ``a @ b = sum w_i D_i``
  exactly; the rank is ``sum r_i``.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the factors are merged
  separately, ``a = merge_i(sign(c_i) sqrt|c_i| a_i)``, ``b = merge_i(sqrt|c_i| b_i)`` with
  ``c_i = w_i s_i`` (``linear``: the sum, so ``a @ b`` is *not* ``sum w_i D_i``: cross terms; PEFT
  calls it a rough approximation). Needs equal ranks per kernel; the rank stays.
* ``svd`` and the ``*_svd`` types: ``D = merge_i(w_i, D_i)``, then the best rank-``k`` factors of
  ``D`` (``k = svd_rank``, default the largest adapter rank): ``D^T = U S V^T`` as PEFT computes it,
  ``b = (U_k S_k)^T``, ``a = V_k``, optionally clamped to the ``svd_clamp`` quantile of their values.

``merge`` is plain weighted sum (``linear``, ``svd``), TIES (prune to the ``density`` fraction of
largest magnitudes per tensor, elect each entry's sign from the sum of the pruned tensors
(``majority_sign_method="total"``) or their sign count (``"frequency"``), average the weighted
entries that agree with it), DARE (keep each entry with probability ``density``, divide by
``density``: ``dare_linear`` sums, ``dare_ties`` elects signs as TIES), or magnitude pruning then sum.
DARE's masks are drawn from ``rng`` (a ``jax.random`` key) and so never equal PEFT's torch masks;
given the same masks the results agree (see the tests). A ``density`` of 1 prunes nothing, as in
PEFT (``dare_linear`` then equals ``linear``). With one adapter, every type is ``linear`` (PEFT's rule).

Deviations from PEFT 0.21.2, all by design: the result's ``use_rslora`` is False (PEFT copies the
first adapter's, scaling its result by ``sqrt(r)``: huggingface/peft#3449); ``cat`` ranks are the
per-kernel sums, not padded with zero rows to PEFT's one rank; equal ranks for the factor types are
required per kernel, not per adapter. Fused targets (``enable_lora``) and adapter trees holding
other leaves (biases, ``modules_to_save``) are refused.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig, check_config
from jlora.plan import make_plan
from jlora.tree import LORA_KEYS, Tree, adapter_modules, flatten, key_path_str, unflatten

__all__ = ["COMBINATION_TYPES", "weighted_adapter"]

_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat", *_FACTOR_TYPES, *_SVD_TYPES)
_PARTS = {"lora_a": 0, "lora_b": 1, "delta": 2}
_HIGHEST = jax.lax.Precision.HIGHEST


def weighted_adapter(adapters: Sequence[tuple[Tree, LoraConfig]], weights: Sequence[float], params: Tree, *,
                     combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                     majority_sign_method: str = "total", svd_clamp: float | None = None,
                     svd_full_matrices: bool = True, model: Any = None,
                     rng: jax.Array | None = None) -> tuple[dict[str, Any], LoraConfig]:
    """Combine ``adapters`` (``(lora, config)`` pairs over the same ``params``) into one adapter.

    Args:
      adapters: ``[(lora_tree, LoraConfig), ...]``; per-path ranks and alphas (patterns) are read
        from each config's plan. Kernels targeted by only some adapters combine those.
      weights: one real weight per adapter (negative weights subtract).
      params: the base params the adapters belong to.
      combination_type: one of :data:`COMBINATION_TYPES` (see the module docstring for the math).
      svd_rank: rank of the ``*svd`` result (default: the largest rank among the adapters).
      density: fraction kept in (0, 1], required by the ``ties``/``dare``/``magnitude_prune`` types.
      majority_sign_method: ``"total"`` or ``"frequency"``, for the ``ties`` types.
      svd_clamp: quantile in [0, 1]; the ``*svd`` factors are clamped to ``[-q, q]`` with ``q`` that
        quantile of all their entries (depends on the sign of each singular vector, which SVD
        implementations choose differently: the clamped result is not portable to the bit).
      svd_full_matrices: PEFT's flag; the truncated result does not depend on it.
      model: the model ``params`` belong to (needed only where ``make_plan`` needs it).
      rng: a ``jax.random`` key, required by the ``dare`` types.

    Returns:
      ``(lora, config)``: ``lora`` holds ``lora_a (*stack, *fan_in, k)``, ``lora_b (*stack, k, *fan_out)``
      per kernel in the union of the adapters' targets, ``config`` has ``lora_alpha == r`` (scale 1;
      ``rank_pattern``/``alpha_pattern`` for kernels whose rank ``k`` differs), so that
      ``jlora.merge(params, lora, config)`` adds the combined delta.

    Raises:
      ValueError: naming the argument, adapter or module at fault.
    """
    kind = _check_arguments(adapters, weights, combination_type, svd_rank, density, majority_sign_method,
                            svd_clamp, rng)
    if len(adapters) == 1:
        kind = "linear"  # PEFT: one adapter is always combined linearly
    plans, pairs = [], []
    for i, (lora, config) in enumerate(adapters):
        check_config(config, f"jlora.weighted_adapter: adapters[{i}]")
        plan = make_plan(params, config, lora=lora, model=model, caller=f"jlora.weighted_adapter: adapters[{i}]")
        others = [key_path_str(p) for p in flatten(lora, "lora") if p[-1] not in LORA_KEYS]
        if others:
            raise ValueError(f"jlora.weighted_adapter: adapters[{i}] holds leaves other than lora_a/lora_b, e.g. "
                             f"{others[0]!r} (trained biases or modules_to_save), which have no weighted combination; "
                             "pass the adapters alone (jlora.partition(lora)[1])")
        fused = [t.path for t in plan.values() if t.slices is not None]
        if fused:
            raise ValueError(f"jlora.weighted_adapter: adapters[{i}] adapts the fused projection {fused[0]!r} with "
                             "enable_lora slices (one lora pair per slice), which weighted_adapter does not combine; "
                             "target unfused kernels")
        plans.append(plan)
        pairs.append(adapter_modules(lora))
    max_ranks = [max(t.rank for t in plan.values()) for plan in plans]
    new_rank = svd_rank or max(max_ranks)
    out, ranks = {}, {}
    for path in dict.fromkeys(p for plan in plans for p in plan):
        present = [(i, plans[i][path]) for i in range(len(plans)) if path in plans[i]]
        target = present[0][1]
        stack, fan_in, fan_out = target.axes
        n_in, n_out = math.prod(fan_in), math.prod(fan_out)
        items = []
        for i, t in present:
            pair = pairs[i][t.key_path[:-1]]
            items.append((i, float(weights[i]), t.scale,
                          jnp.asarray(pair["lora_a"], jnp.float32).reshape(*stack, n_in, t.rank),
                          jnp.asarray(pair["lora_b"], jnp.float32).reshape(*stack, t.rank, n_out)))
        idx = [i for i, _ in present]
        keep = lambda part, i, shape, path=path: _keep_mask(rng, path, part, i, shape, density)  # noqa: E731
        if kind == "cat":
            a = jnp.concatenate([x * (w * s) for _, w, s, x, _ in items], axis=-1)
            b = jnp.concatenate([y for *_, y in items], axis=-2)
        elif kind in _FACTOR_TYPES:
            found = {f"adapters[{i}]": x.shape[-1] for i, _, _, x, _ in items}
            if len(set(found.values())) > 1:
                raise ValueError(f"jlora.weighted_adapter: combination_type={combination_type!r} merges lora_a and "
                                 f"lora_b separately and needs equal ranks, but {path!r} has ranks {found}; use "
                                 "'cat' or an '*svd' type")
            coef = [w * s for _, w, s, _, _ in items]
            a = _merge(kind, [x for *_, x, _ in items], [math.copysign(math.sqrt(abs(c)), c) for c in coef],
                       density, majority_sign_method, lambda j, shape: keep("lora_a", idx[j], shape))
            b = _merge(kind, [y for *_, y in items], [math.sqrt(abs(c)) for c in coef],
                       density, majority_sign_method, lambda j, shape: keep("lora_b", idx[j], shape))
        else:
            if new_rank > min(n_in, n_out):
                raise ValueError(f"jlora.weighted_adapter: svd_rank {new_rank} exceeds min(fan_in, fan_out) = "
                                 f"{min(n_in, n_out)} of {path!r}")
            deltas = [s * jnp.matmul(x, y, precision=_HIGHEST) for _, _, s, x, y in items]
            delta = _merge(kind.removesuffix("_svd").replace("svd", "linear"), deltas, [w for _, w, *_ in items],
                           density, majority_sign_method, lambda j, shape: keep("delta", idx[j], shape))
            a, b = _svd_factors(delta, new_rank, svd_clamp, svd_full_matrices)
        k = a.shape[-1]
        if k > min(n_in, n_out):
            raise ValueError(f"jlora.weighted_adapter: combination_type='cat' gives {path!r} rank {k}, above "
                             f"min(fan_in, fan_out) = {min(n_in, n_out)}; use 'svd' (with svd_rank=...) instead")
        dtype = jnp.asarray(pairs[present[0][0]][target.key_path[:-1]]["lora_a"]).dtype
        out[(*target.key_path[:-1], "lora_a")] = a.reshape(*stack, *fan_in, k).astype(dtype)
        out[(*target.key_path[:-1], "lora_b")] = b.reshape(*stack, k, *fan_out).astype(dtype)
        ranks[path] = k
    return unflatten(out), _combined_config([c for _, c in adapters], [list(p) for p in plans], ranks)


def _check_arguments(adapters: Sequence, weights: Sequence, combination_type: str, svd_rank: Any, density: Any,
                     majority_sign_method: str, svd_clamp: Any, rng: Any) -> str:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"jlora.weighted_adapter: combination_type={combination_type!r} is unknown; expected one "
                         f"of {COMBINATION_TYPES}")
    if not isinstance(adapters, Sequence) or not adapters or not all(
            isinstance(p, (tuple, list)) and len(p) == 2 for p in adapters):
        raise ValueError("jlora.weighted_adapter: adapters must be a non-empty sequence of (lora, config) pairs")
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(adapters):
        raise ValueError(f"jlora.weighted_adapter: weights must hold one number per adapter ({len(adapters)}), got "
                         f"{weights!r}")
    for i, w in enumerate(weights):
        if hasattr(w, "dtype") and getattr(w, "shape", None) == () and jnp.issubdtype(w.dtype, jnp.number) \
                and not jnp.issubdtype(w.dtype, jnp.bool_):
            w = float(w)  # a numpy / jax scalar
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"jlora.weighted_adapter: weights[{i}] must be a finite real number, got {w!r}")
    svd = combination_type in _SVD_TYPES
    prunes = combination_type not in ("cat", "linear", "svd")
    if svd_rank is not None and (not svd or isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral)
                                 or svd_rank <= 0):
        raise ValueError(f"jlora.weighted_adapter: svd_rank={svd_rank!r}: expected a positive integer, and only with "
                         f"the svd types {_SVD_TYPES}")
    if svd_clamp is not None and (not svd or isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real)
                                  or not 0.0 <= svd_clamp <= 1.0):
        raise ValueError(f"jlora.weighted_adapter: svd_clamp={svd_clamp!r}: expected a quantile in [0, 1], and only "
                         f"with the svd types {_SVD_TYPES}")
    if prunes != (density is not None):
        raise ValueError(f"jlora.weighted_adapter: density={density!r}: " + (
            f"combination_type={combination_type!r} needs the fraction of entries to keep, in (0, 1]" if prunes
            else f"only the ties, dare and magnitude_prune types use it, not {combination_type!r}"))
    if prunes and (isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 < density <= 1.0):
        raise ValueError(f"jlora.weighted_adapter: density={density!r}: expected a fraction in (0, 1]")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"jlora.weighted_adapter: majority_sign_method={majority_sign_method!r}: expected 'total' "
                         "or 'frequency'")
    if combination_type.startswith("dare") and len(adapters) > 1 and rng is None:
        raise ValueError(f"jlora.weighted_adapter: combination_type={combination_type!r} drops random entries; pass "
                         "rng=jax.random.key(...)")
    return combination_type


def _keep_mask(rng: jax.Array, path: str, part: str, index: int, shape: tuple[int, ...], density: float) -> jax.Array:
    """DARE's keep mask for ``part`` of adapter ``index`` at ``path``: Bernoulli(``density``) entries."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(path.encode())),
                                                _PARTS[part]), index)
    return jax.random.bernoulli(key, density, shape)


def _top_magnitude(x: jax.Array, density: float, stack_dims: int) -> jax.Array:
    """``x`` with all but its ``int(density * n)`` largest-magnitude entries zeroed, per matrix of a stack."""
    flat = x.reshape(*x.shape[:stack_dims], -1)
    k = int(density * flat.shape[-1])
    order = jnp.argsort(-jnp.abs(flat), axis=-1, stable=True)
    place = jnp.argsort(order, axis=-1)
    return jnp.where(place < k, flat, 0.0).reshape(x.shape)


def _merge(kind: str, tensors: list[jax.Array], weights: list[float], density: float | None, sign_method: str,
           keep: Any) -> jax.Array:
    """PEFT's ``task_arithmetic``/``ties``/``dare_*``/``magnitude_prune`` over same-shaped tensors."""
    stack_dims = tensors[0].ndim - 2
    if density is not None and density < 1.0:
        if kind in ("ties", "magnitude_prune"):
            tensors = [_top_magnitude(t, density, stack_dims) for t in tensors]
        elif kind.startswith("dare"):
            tensors = [jnp.where(keep(j, t.shape), t, 0.0) / density for j, t in enumerate(tensors)]
    x = jnp.stack(tensors)
    weighted = x * jnp.asarray(weights, jnp.float32).reshape(-1, *[1] * (x.ndim - 1))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(0)
    sign = jnp.sign(x)
    votes = x.sum(0) if sign_method == "total" else sign.sum(0)
    agree = sign == jnp.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1).astype(jnp.float32)


def _svd_factors(delta: jax.Array, rank: int, clamp: float | None, full: bool) -> tuple[jax.Array, jax.Array]:
    """Rank-``rank`` ``(a, b)`` with ``a @ b ~ delta (*stack, in, out)``, from the SVD of ``delta^T`` (PEFT's)."""
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(delta, -1, -2), full_matrices=full)
    big_b = u[..., :rank] * s[..., None, :rank]  # PEFT's lora_B (out, k)
    big_a = vh[..., :rank, :]                    # PEFT's lora_A (k, in)
    if clamp is not None:
        stack = delta.shape[:-2]
        values = jnp.concatenate([big_b.reshape(*stack, -1), big_a.reshape(*stack, -1)], axis=-1)
        hi = jnp.quantile(values, clamp, axis=-1)[..., None, None]
        big_b, big_a = jnp.clip(big_b, -hi, hi), jnp.clip(big_a, -hi, hi)
    return jnp.swapaxes(big_a, -1, -2), jnp.swapaxes(big_b, -1, -2)


def _combined_config(configs: list[LoraConfig], targets: list[list[str]], ranks: dict[str, int]) -> LoraConfig:
    """The first config with the union of targets, ``lora_alpha == r`` per kernel, no rslora, adapters only."""
    names = [c.target_modules for c in configs]
    if all(isinstance(n, tuple) for n in names):
        target_modules: Any = tuple(dict.fromkeys(m for n in names for m in n))
    elif all(isinstance(n, str) for n in names):
        target_modules = "|".join(f"({n})" for n in dict.fromkeys(names))
    else:  # names and regexes mixed: select exactly the adapted paths
        target_modules = "|".join(re.escape(p) for p in dict.fromkeys(p for t in targets for p in t))
    r = max(Counter(ranks.values()).most_common(), key=lambda kv: (kv[1], kv[0]))[0]
    others = {re.escape(p): k for p, k in ranks.items() if k != r}
    return dataclasses.replace(configs[0], r=r, lora_alpha=r, target_modules=target_modules, use_rslora=False,
                               rank_pattern=others, alpha_pattern={p: float(k) for p, k in others.items()},
                               bias="none", modules_to_save=(), enable_lora=())
