"""The adapter plan: one record per targeted kernel, derived once and read by every verb.

``make_plan(params, config, model=..., lora=...)`` turns a :class:`LoraConfig` and a params tree
into an :class:`AdapterPlan`: for each kernel the config selects, a :class:`Target` holding

* where it is (``path``, the module path; ``key_path`` of the kernel leaf; ``torch_name``),
* what it is (``kind``: ``"dense"`` or ``"embed"``; ``layer``: the layer class seen, e.g. ``Dense``,
  ``DenseGeneral``, ``FlaxConv1D``) and its axis roles (:class:`KernelLayout`: stacked ``nn.scan``
  axes, input axes, output axes, storage order),
* the adapter's rank, alpha and scale, fused slices (``enable_lora``), the kernel's dtype,
* the heads that reuse it (``tied_heads``: a tied LM head reads the embedding table transposed),

plus what follows from those: adapter shapes, ``delta`` (the kernel-shaped update) and the
PartitionSpecs of ``lora_a``/``lora_b`` from the kernel's. ``init``, ``apply``, ``merge``/``unmerge``,
``count``, sharding and PEFT io all read the plan instead of re-deriving these facts.

Axis roles are *derived*, from the first source that knows them:

1. ``layouts={path: KernelLayout}`` given explicitly;
2. the model (``model=``): an HF Flax model is run abstractly on dummy inputs, a linen apply
   function on ``inputs``; every Dense/DenseGeneral/Embed (or registered) call is observed
   (``jax.eval_shape``: no FLOPs), which gives the layer class, its contracted axes and the stacked
   axes (the kernel the layer sees vs the one stored);
3. an existing adapter tree (``lora=``): the three shapes fix the stacked/input/output axes;
4. rules that integrations register for params trees they recognise (``jlora.hf`` registers
   GPT-2's Conv1D modules, whose kernels are stored (fan_out, fan_in));
5. a 2-D kernel is (fan_in, fan_out) (``config.fan_in_fan_out=True``: (fan_out, fan_in)), an
   embedding (vocab, dim); anything else is an error asking for the model.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jlora.config import LoraConfig, check_config, in_module, path_ends_with, preview
from jlora.layerkinds import KernelLayout, LayerFact, discover, stored_transposed, tied_heads_of
from jlora.tree import (COLLECTION, KERNEL_KEYS, KeyPath, Tree, adapter_modules, flatten, is_variables_dict,
                        kernel_paths, key_path_str, module_path)

# --- the records ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """Everything jlora knows about one adapted kernel ``W``: ``W + scale * lora_a @ lora_b``."""

    path: str
    key_path: KeyPath
    kind: str                          # "dense" | "embed"
    layer: str                         # layer class seen on the model, or "(from shapes)"
    shape: tuple[int, ...]
    dtype: str
    layout: KernelLayout
    rank: int
    alpha: float
    scale: float
    slices: tuple[bool, ...] | None = None
    tied_heads: tuple[str, ...] = ()

    @property
    def axes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(stack_shape, fan_in_shape, fan_out_shape)``; fan_out per slice for fused targets."""
        stack, fan_in, fan_out = self.layout.split(self.shape, self.path)
        if self.slices is not None:
            stack, fan_out = (*stack, sum(self.slices)), (fan_out[0] // len(self.slices),)
        return stack, fan_in, fan_out

    @property
    def lora_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(lora_a (*stack, *fan_in, r), lora_b (*stack, r, *fan_out))``."""
        stack, fan_in, fan_out = self.axes
        return (*stack, *fan_in, self.rank), (*stack, self.rank, *fan_out)

    @property
    def torch_name(self) -> str:
        """PyTorch's dotted module name (PEFT's key stem)."""
        return self.path.replace("/", ".")

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.lora_shapes)

    def delta(self, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
        """``lora_a @ lora_b`` (unscaled, float32) in the kernel's shape and storage order."""
        self.check(lora_a, lora_b)
        stack, fan_in, fan_out = self.axes
        a = lora_a.astype(jnp.float32).reshape(*stack, math.prod(fan_in), self.rank)
        b = lora_b.astype(jnp.float32).reshape(*stack, self.rank, math.prod(fan_out))
        product = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)   # (*stack, in, out)
        if self.slices is not None:                                        # (*stack', n_on, in, slice)
            zeros = jnp.zeros(product.shape[:-3] + product.shape[-2:], jnp.float32)
            slots = iter(range(sum(self.slices)))
            product = jnp.concatenate([product[..., next(slots), :, :] if on else zeros
                                       for on in self.slices], axis=-1)
        if self.layout.transposed:
            product = jnp.swapaxes(product, -1, -2)
        return product.reshape(self.shape)

    def check(self, lora_a: Any, lora_b: Any) -> None:
        """Raise naming the module unless ``lora_a``/``lora_b`` have this target's shapes and a float dtype."""
        want_a, want_b = self.lora_shapes
        got_a, got_b = tuple(np.shape(lora_a)), tuple(np.shape(lora_b))
        if (got_a, got_b) != (want_a, want_b):
            raise ValueError(f"lora at {self.path!r}: lora_a {got_a} and lora_b {got_b} do not fit the kernel "
                             f"{self.shape} ({self.layer}); expected lora_a {want_a} and lora_b {want_b}. Was the "
                             "adapter made for another model or another LoraConfig?")
        for name, leaf in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"lora at {self.path!r}: {name} has dtype {leaf.dtype}; adapters must be floating "
                                "point (e.g. float32 or bfloat16)")

    def specs(self, kernel_spec: Any, mesh: Any = None) -> tuple[P, P]:
        """PartitionSpecs of ``(lora_a, lora_b)`` from the kernel's: ``lora_a`` takes the input-axis
        entries, ``lora_b`` the output-axis entries, the rank (and fused-slice) axis is replicated;
        an axis that the named mesh axes do not divide is replicated."""
        entries = spec_entries(kernel_spec, len(self.shape))
        n_stack = self.layout.stack_dims
        stack, rest = entries[:n_stack], entries[n_stack:]
        if self.layout.transposed:
            k_in, k_out = rest[1:], rest[:1]
        else:
            k_in, k_out = rest[:self.layout.in_dims], rest[self.layout.in_dims:]
        extra = [None] if self.slices is not None else []
        a = [*stack, *extra, *k_in, None]
        b = [*stack, *extra, None, *k_out]
        a_shape, b_shape = self.lora_shapes
        return (P(*(fits(e, n, mesh) for e, n in zip(a, a_shape))),
                P(*(fits(e, n, mesh) for e, n in zip(b, b_shape))))


def spec_entries(spec: Any, ndim: int) -> list[Any]:
    spec = getattr(spec, "spec", spec)
    if spec is None:
        return [None] * ndim
    entries = list(spec)
    if len(entries) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the {ndim} axes of its array")
    return entries + [None] * (ndim - len(entries))


def fits(entry: Any, length: int, mesh: Any) -> Any:
    if entry is None or mesh is None:
        return entry
    names = entry if isinstance(entry, tuple) else (entry,)
    return entry if length % math.prod(mesh.shape[n] for n in names) == 0 else None


@dataclasses.dataclass(frozen=True)
class AdapterPlan(Mapping):
    """``{module path: Target}`` for one params tree and config (read-only mapping)."""

    config: LoraConfig
    targets: Mapping[str, Target]
    in_variables: bool

    def __getitem__(self, path: str) -> Target:
        return self.targets[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def by_module_key(self, module_key: KeyPath) -> Target | None:
        """The target whose kernel sits in the module dict at ``module_key`` (a key path)."""
        return self.targets.get(module_path((*module_key, "kernel"), self.in_variables))

    def __str__(self) -> str:
        rows = [("module", "layer", "kernel", "in/out", "r", "scale", "lora_a", "lora_b")]
        for t in self.targets.values():
            stack, fan_in, fan_out = t.layout.split(t.shape, t.path)
            heads = ", ".join(repr(h) if h else "the head called at the model's root" for h in t.tied_heads)
            roles = f"{'scan' + str(stack) + ' ' if stack else ''}{fan_in}->{fan_out}" + \
                    (" (stored out,in)" if t.layout.transposed else "") + \
                    (f" fused slices {t.slices}" if t.slices else "") + (f" tied to {heads}" if t.tied_heads else "")
            rows.append((t.path, t.layer, str(t.shape), roles, str(t.rank), f"{t.scale:g}", *map(str, t.lora_shapes)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        total = sum(t.n_params for t in self.targets.values())
        return "\n".join(lines + [f"{len(self.targets)} adapted kernels, {total:,} adapter parameters"])


# --- building the plan ---------------------------------------------------------------------
def make_plan(params: Tree, config: LoraConfig, *, model: Any = None, inputs: tuple | None = None,
              lora: Tree | None = None, layouts: Mapping[str, KernelLayout] | None = None,
              caller: str = "jlora.init") -> AdapterPlan:
    """The :class:`AdapterPlan` of ``config`` over ``params`` (see the module docstring).

    With ``lora``, the plan covers exactly the adapters in it (each checked against its kernel and
    the config); without, every kernel the config selects (each target checked to match something).
    """
    check_config(config, caller)
    in_vars = is_variables_dict(params)
    kernels = kernel_paths(params)
    by_module = {module_path(p, in_vars): p for p in kernels}
    facts, heads = discover(model, params, inputs) if model is not None else ({}, {})
    if lora is not None:
        chosen = _adapted_modules(params, lora, by_module, in_vars, caller)
        _check_adapters_match_config(config, by_module, chosen, caller)
    else:
        chosen = {m: p for m, p in by_module.items() if config.is_target(m)}
        _check_targets(config, params, by_module, chosen, in_vars)
    config.check_patterns_used(chosen)
    pairs = adapter_modules(lora) if lora is not None else {}
    embeddings = {m: tuple(kernels[p].shape) for m, p in by_module.items() if p[-1] == "embedding"}
    targets = {}
    for mpath, key_path in chosen.items():
        kernel = kernels[key_path]
        pair = pairs.get(key_path[:-1])
        layout, layer = _layout(mpath, key_path, kernel, params, config, layouts, facts, pair)
        rank = config.rank_for(mpath)
        if pair is not None and np.shape(pair["lora_a"])[-1] != rank:
            raise ValueError(f"lora at {mpath!r} has rank {np.shape(pair['lora_a'])[-1]} but the config gives rank "
                             f"{rank}: was the adapter made with another LoraConfig?")
        target = Target(path=mpath, key_path=key_path, kind="embed" if key_path[-1] == "embedding" else "dense",
                        layer=layer, shape=tuple(kernel.shape), dtype=str(kernel.dtype), layout=layout, rank=rank,
                        alpha=config.alpha_for(mpath), scale=config.scale_for(mpath, rank),
                        slices=config.slices_for(mpath),
                        tied_heads=tied_heads_of(heads, mpath, embeddings)
                        if key_path[-1] == "embedding" else ())
        _check_rank(target, config)
        if pair is not None:
            target.check(pair["lora_a"], pair["lora_b"])
        targets[mpath] = target
    return AdapterPlan(config=config, targets=targets, in_variables=in_vars)


def _layout(mpath: str, key_path: KeyPath, kernel: Any, params: Tree, config: LoraConfig,
            layouts: Mapping[str, KernelLayout] | None, facts: Mapping[str, LayerFact],
            pair: Mapping[str, Any] | None) -> tuple[KernelLayout, str]:
    if layouts is not None and mpath in layouts:
        return layouts[mpath], "(layouts=)"
    if mpath in facts:
        fact = facts[mpath]
        if config.fan_in_fan_out is True and key_path[-1] == "kernel" and not fact.layout.transposed:
            warnings.warn(f"LoraConfig.fan_in_fan_out=True, but {mpath!r} is a {fact.layer} storing (fan_in, "
                          "fan_out): following the layer (as PEFT does)", stacklevel=4)
        return fact.layout, fact.layer
    if key_path[-1] == "embedding":
        if kernel.ndim != 2:
            raise ValueError(f"embedding at {mpath!r} has shape {tuple(kernel.shape)}; only (vocab, dim) tables "
                             "are adapted")
        return KernelLayout(), "(embedding)"
    transposed = config.fan_in_fan_out is True or stored_transposed(params, mpath)
    if pair is not None:
        fits = _layouts_from_adapter(kernel.shape, np.shape(pair["lora_a"]), np.shape(pair["lora_b"]),
                                     config.slices_for(mpath))
        if len(fits) == 1:
            return fits[0], "(from adapter shapes)"
        if fits:  # a square kernel: both storage orders fit the adapter; the rules decide
            return dataclasses.replace(fits[0], transposed=transposed), "(square kernel)"
    if kernel.ndim == 2:
        return KernelLayout(transposed=transposed), "(2-D kernel)"
    raise ValueError(
        f"kernel at {mpath!r} has shape {tuple(kernel.shape)}: with more than two axes it may be a DenseGeneral "
        "kernel or a stack of scanned layers, and the shape alone cannot tell. Pass the model so jlora can read "
        "it off: jlora.init(rng, params, config, model=module.apply, inputs=(example_x,)) or "
        "jlora.apply(module.apply, config).init(rng, params, example_x) (or "
        f"layouts={{{mpath!r}: jlora.KernelLayout(stack_dims=..., in_dims=...)}})")


def _layouts_from_adapter(kernel_shape: tuple, a_shape: tuple, b_shape: tuple,
                         slices: tuple[bool, ...] | None = None) -> list[KernelLayout]:
    """The layouts that make ``lora_a (*stack, *in, r)`` and ``lora_b (*stack, r, *out)`` fit the kernel
    (fused: ``lora_a (*stack, n_on, in, r)``, ``lora_b (*stack, n_on, r, out / len(slices))``)."""
    if slices is not None:
        n_stack, n_in = len(kernel_shape) - 2, 1
        extra = (sum(slices),)
    else:
        n_stack = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
        n_in, extra = len(a_shape) - 1 - n_stack, ()
    fits: list[KernelLayout] = []
    if n_stack < 0 or n_in < 1:
        return fits
    for layout in (KernelLayout(n_stack, n_in), KernelLayout(n_stack, 1, True)):
        try:
            stack, fan_in, fan_out = layout.split(tuple(kernel_shape), "")
        except ValueError:
            continue
        if slices is not None:
            if fan_out[0] % len(slices):
                continue
            fan_out = (fan_out[0] // len(slices),)
        if (*stack, *extra, *fan_in) == tuple(a_shape[:-1]) and \
                tuple(b_shape) == (*stack, *extra, a_shape[-1], *fan_out):
            fits.append(layout)
    return fits


def _check_rank(target: Target, config: LoraConfig) -> None:
    _, fan_in, fan_out = target.axes
    limit = min(math.prod(fan_in), math.prod(fan_out))
    if target.rank > limit:
        source = "rank_pattern" if target.rank != config.r else "r"
        raise ValueError(f"LoraConfig.{source}: rank {target.rank} exceeds min(fan_in, fan_out) = {limit} of "
                         f"{target.path!r} (kernel {target.shape}, fan_in {fan_in}, fan_out {fan_out}"
                         f"{' per fused slice' if target.slices else ''})")


def _adapted_modules(params: Tree, lora: Tree, by_module: Mapping[str, KeyPath], in_vars: bool,
                     caller: str) -> dict[str, KeyPath]:
    pairs = adapter_modules(lora)
    if not pairs:
        raise ValueError(f"{caller}: lora holds no adapters (no lora_a/lora_b pairs); make them with "
                         "jlora.init(rng, params, config)")
    if in_vars and not isinstance(lora.get(COLLECTION), Mapping):
        raise ValueError(f"{caller}: params is a linen variables dict ({{'params': ...}}) but lora is not: its top "
                         f"keys are {sorted(lora)[:5]}. Wrap it as {{'params': lora}}, or make it with "
                         "jlora.init(rng, variables, config)")
    chosen = {}
    for module_key in pairs:
        kernel_key = next(((*module_key, k) for k in KERNEL_KEYS
                           if module_path((*module_key, k), in_vars) in by_module
                           and by_module[module_path((*module_key, k), in_vars)] == (*module_key, k)), None)
        if kernel_key is None:
            hint = ""
            if not in_vars and module_key[0] == COLLECTION:
                hint = (" lora has a top-level 'params' collection but params does not: pass the variables dict "
                        "({'params': params}) or lora['params'].")
            raise ValueError(f"lora: no kernel or embedding at {key_path_str(module_key)!r} in params; the adapter "
                             f"tree does not belong to these params (kernels at: {preview(sorted(by_module))}).{hint}")
        chosen[module_path(kernel_key, in_vars)] = kernel_key
    return chosen


def _check_adapters_match_config(config: LoraConfig, by_module: Mapping[str, KeyPath], chosen: Mapping[str, KeyPath],
                                 caller: str) -> None:
    """Every adapter is a target of ``config`` and every target has an adapter (else: which, by name)."""
    extra = sorted(m for m in chosen if not config.is_target(m))
    if extra:
        raise ValueError(f"{caller}: lora holds adapters at {extra}, which config.target_modules "
                         f"({config.target_modules!r}) does not select: was lora made with another LoraConfig?")
    missing = sorted(m for m in by_module if config.is_target(m) and m not in chosen)
    if missing:
        raise ValueError(f"{caller}: config.target_modules selects {preview(missing)} but lora holds no adapter there: "
                         "make the adapters with jlora.init(rng, params, config) for this config")


def _check_targets(config: LoraConfig, params: Tree, by_module: Mapping[str, KeyPath],
                   chosen: Mapping[str, KeyPath], in_vars: bool) -> None:
    seen = sorted({m.rsplit("/", 1)[-1] for m in by_module})
    if isinstance(config.target_modules, str):
        if not chosen:
            raise ValueError(f"LoraConfig.target_modules: regex {config.target_modules!r} fully matches no module "
                             f"path holding a kernel; paths seen: {preview(sorted(by_module))}")
    else:
        for name in config.target_modules:
            if not any(path_ends_with(m, name) for m in by_module):
                example = next(iter(sorted(by_module)), "")
                raise ValueError(f"LoraConfig.target_modules: {name!r} matches no module holding a kernel; "
                                 f"module names seen: {preview(seen)} (a name matches the end of a '/'-joined "
                                 f"module path such as {example!r})")
    all_modules = {module_path(p, in_vars) for p in flatten(params) if not in_vars or p[0] == COLLECTION}
    for name in config.modules_to_save:
        if not any(in_module(m, name) for m in all_modules):
            names = sorted({n for m in all_modules for n in m.split("/")})
            raise ValueError(f"LoraConfig.modules_to_save: {name!r} matches no module; module names seen: "
                             f"{preview(names)}")
