"""`LoraConfig`: which kernels get adapters, their rank and scale, and what else trains.

The names and meanings follow PEFT's ``LoraConfig`` so that a PEFT user's settings carry over:

* ``r`` is the rank of every adapter unless ``rank_pattern`` says otherwise for a path;
* the adapter's output is scaled by ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with
  ``use_rslora=True``, Kalajdzievski 2023), ``lora_alpha`` per path from ``alpha_pattern``;
* ``target_modules`` selects kernels by the *module path* that holds them: the "/"-joined keys
  from the root of the params tree to the dict holding ``kernel`` (or ``embedding``), with a
  leading ``params`` collection left out, e.g. ``"encoder/layer/0/attention/self/query"``.
  A sequence of names matches a module whose path *ends with* one of them, whole components
  only (``"query"`` or ``"self/query"`` match the path above, ``"uery"`` does not; PEFT's dotted
  ``"self.query"`` is read as ``"self/query"``); a single
  string is a regular expression that must match the whole path (``re.fullmatch``).
* ``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched against the end of
  the module path, whole components only (PEFT's rule, with "/" for ".").

Everything that depends on the actual params (a target that matches nothing, a rank larger than a
kernel) is checked by :func:`jlora.init`, which sees the tree; the config itself checks only what
it can know alone.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "kaiming")
TargetModules = Union[str, Sequence[str]]


def _as_pairs(name: str, value: Mapping[str, Any] | Iterable[tuple[str, Any]] | None,
              kind: type) -> tuple[tuple[str, Any], ...]:
    """Normalise a mapping to a hashable tuple of (pattern, value) pairs."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else tuple(value)
    pairs = []
    for key, item in items:
        if not isinstance(key, str) or not key:
            raise ValueError(f"LoraConfig.{name}: keys must be non-empty pattern strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(f"LoraConfig.{name}: {key!r} is not a valid regular expression ({err})") from None
        if isinstance(item, bool) or not isinstance(item, numbers.Real) or (kind is int and int(item) != item):
            wanted = "an integer" if kind is int else "a number"
            raise ValueError(f"LoraConfig.{name}[{key!r}]: expected {wanted}, got {item!r}")
        if item <= 0:
            raise ValueError(f"LoraConfig.{name}[{key!r}]: must be > 0, got {item!r}")
        pairs.append((key, kind(item)))
    return tuple(pairs)  # order kept: the first matching key wins, as in PEFT


def _as_masks(value: Mapping[str, Sequence[bool]] | Iterable | None) -> tuple:
    """``enable_lora`` as a hashable tuple of (pattern, mask) pairs, each mask checked."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else tuple(value)
    pairs = []
    for key, mask in items:
        _as_pairs("enable_lora", {key: 1}, int)  # checks the pattern
        mask = tuple(mask) if isinstance(mask, (list, tuple)) else mask
        if not isinstance(mask, tuple) or len(mask) < 2 or not all(isinstance(m, bool) for m in mask) \
                or not any(mask):
            raise ValueError(f"LoraConfig.enable_lora[{key!r}]: expected a tuple of at least two bools with one "
                             f"True (one per fused slice, e.g. (True, False, True) for q, k, v), got {mask!r}")
        pairs.append((key, mask))
    return tuple(pairs)


def _suffix_regex(pattern: str) -> re.Pattern:
    """PEFT's ``(.*\\.)?(pattern)$`` rule with "/" as the separator."""
    return re.compile(rf"(?:.*/)?(?:{pattern})")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings, hashable so they can be a static argument of ``jax.jit``.

    Attributes:
      r: default rank (> 0).
      lora_alpha: scale numerator; ``scale = lora_alpha / r`` (``/ sqrt(r)`` with rslora).
      target_modules: module names (suffix match on "/"-joined paths) or one regex (full match).
      lora_dropout: dropout rate on the adapter's input, in [0, 1).
      use_rslora: rank-stabilised scale ``lora_alpha / sqrt(r)``.
      rank_pattern: ``{regex: rank}`` overriding ``r`` for matching module paths.
      alpha_pattern: ``{regex: alpha}`` overriding ``lora_alpha`` for matching module paths.
      bias: ``"none"`` (biases frozen), ``"all"`` (every bias trains), ``"lora_only"`` (biases of
        the adapted modules train).
      modules_to_save: module names (suffix match, like ``target_modules``) trained in full,
        e.g. a fresh classifier head.
      init_lora_weights: ``True``/``"kaiming"``: ``lora_a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
        (PEFT's kaiming-uniform with a=sqrt(5)); ``"gaussian"``: ``lora_a ~ N(0, 1/r²)``; for
        embeddings ``lora_a ~ N(0, 1)``. ``lora_b`` is zeros in all three, so the adapted model
        equals the base at init. ``False``: ``lora_b`` random too (testing only).
      fan_in_fan_out: ``None`` (default): each kernel's storage order is derived (GPT-2's
        ``FlaxConv1D`` stores (fan_out, fan_in); jlora knows it from the model, or from the params
        tree's shape when no model is given). ``True`` forces (fan_out, fan_in) for every 2-D kernel
        that no model call contradicts (PEFT's flag of the same name); ``False`` is the same as None.
      enable_lora: ``{regex: (bool, ...)}`` for fused projections (loralib's ``MergedLinear``):
        the kernel's output features split into ``len(mask)`` equal slices and only the slices
        marked True get an adapter, e.g. ``{"c_attn": (True, False, True)}`` adapts GPT-2's Wq
        and Wv but not Wk. Such an adapter holds one (lora_a, lora_b) pair per enabled slice:
        ``lora_a (*stack, n_enabled, fan_in, r)``, ``lora_b (*stack, n_enabled, r, fan_out / len(mask))``.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: TargetModules | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] | tuple = ()
    alpha_pattern: Mapping[str, float] | tuple = ()
    bias: str = "none"
    modules_to_save: Sequence[str] | None = ()
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool | None = None
    enable_lora: Mapping[str, Sequence[bool]] | tuple = ()

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r <= 0:
            raise ValueError(f"LoraConfig.r: expected a positive integer rank, got {self.r!r}")
        set_("r", int(self.r))
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, numbers.Real) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha: expected a finite number > 0 (scale = lora_alpha / r; with 0 "
                             f"every adapter gradient is 0), got {self.lora_alpha!r}")
        set_("lora_alpha", float(self.lora_alpha) if not isinstance(self.lora_alpha, numbers.Integral)
             else int(self.lora_alpha))
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, numbers.Real) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout: expected a rate in [0, 1), got {self.lora_dropout!r}")
        set_("lora_dropout", float(self.lora_dropout))
        if self.fan_in_fan_out not in (None, True, False):
            raise ValueError(f"LoraConfig.fan_in_fan_out: expected None (derive from the layer), True or False, "
                             f"got {self.fan_in_fan_out!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias: expected one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES or self.init_lora_weights is None:
            raise ValueError(f"LoraConfig.init_lora_weights: expected one of {INIT_MODES}, "
                             f"got {self.init_lora_weights!r}")
        set_("target_modules", self._names_or_regex("target_modules", self.target_modules))
        set_("modules_to_save", self._names("modules_to_save", self.modules_to_save))
        set_("rank_pattern", _as_pairs("rank_pattern", self.rank_pattern, int))
        set_("alpha_pattern", _as_pairs("alpha_pattern", self.alpha_pattern, float))
        set_("enable_lora", _as_masks(self.enable_lora))

    @staticmethod
    def _names(field: str, value: Sequence[str] | None) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            raise ValueError(f"LoraConfig.{field}: expected a sequence of module names, got the string "
                             f"{value!r} (write ({value!r},))")
        names = tuple(value)
        for name in names:
            if not isinstance(name, str) or not name.strip("/"):
                raise ValueError(f"LoraConfig.{field}: expected non-empty module names, got {name!r}")
        return names

    @classmethod
    def _names_or_regex(cls, field: str, value: TargetModules | None) -> TargetModules:
        if value is None:
            raise ValueError(f"LoraConfig.{field}: required; give module names such as ('query', 'value') "
                             "or one regular expression matched against the whole module path")
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"LoraConfig.{field}: {value!r} is not a valid regular expression "
                                 f"({err})") from None
            return value
        names = cls._names(field, value)
        if not names:
            raise ValueError(f"LoraConfig.{field}: empty; name at least one module")
        return names

    # --- matching -------------------------------------------------------------------------
    def is_target(self, module_path: str) -> bool:
        """Whether the kernel held by the module at ``module_path`` ("/"-joined) gets an adapter."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_path) is not None
        return any(path_ends_with(module_path, name) for name in self.target_modules)

    def is_saved_module(self, module_path: str) -> bool:
        """Whether ``module_path`` lies in (or is) one of ``modules_to_save``."""
        return any(in_module(module_path, name) for name in self.modules_to_save)

    def rank_for(self, module_path: str) -> int:
        """The rank for ``module_path``: the first ``rank_pattern`` key matching, else ``r``."""
        return _lookup(self.rank_pattern, module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        """``lora_alpha`` for ``module_path``, from ``alpha_pattern`` when a key matches."""
        return _lookup(self.alpha_pattern, module_path, self.lora_alpha)

    def slices_for(self, module_path: str) -> tuple[bool, ...] | None:
        """The ``enable_lora`` mask of a fused projection at ``module_path``, else None."""
        return _lookup(self.enable_lora, module_path, None)

    def scale_for(self, module_path: str, rank: int | None = None) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rslora) for ``module_path``."""
        rank = self.rank_for(module_path) if rank is None else rank
        alpha = self.alpha_for(module_path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def check_patterns_used(self, module_paths: Iterable[str]) -> None:
        """Raise if a ``rank_pattern``/``alpha_pattern`` key matches none of ``module_paths``."""
        paths = tuple(module_paths)
        for field in ("rank_pattern", "alpha_pattern", "enable_lora"):
            for key, _ in getattr(self, field):
                if not any(_suffix_regex(key).fullmatch(p) for p in paths):
                    raise ValueError(f"LoraConfig.{field}: pattern {key!r} matches none of the adapted "
                                     f"modules {preview(paths)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (patterns back as dicts, tuples as lists)."""
        out = dataclasses.asdict(self)
        out["rank_pattern"] = dict(self.rank_pattern)
        out["alpha_pattern"] = dict(self.alpha_pattern)
        out["enable_lora"] = {key: list(mask) for key, mask in self.enable_lora}
        for key in ("target_modules", "modules_to_save"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"LoraConfig.from_dict: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**data)


def check_config(config: Any, caller: str) -> None:
    """Raise a TypeError naming ``caller`` unless ``config`` is a :class:`LoraConfig`."""
    if not isinstance(config, LoraConfig):
        hint = ""
        if type(config).__name__ == "LoraConfig":
            hint = (" (this is PEFT's LoraConfig; jlora.hf.load_peft reads a PEFT adapter folder, or build "
                    "jlora.LoraConfig(r=..., lora_alpha=..., target_modules=...))")
        elif isinstance(config, Mapping):
            hint = " (for a dict, use jlora.LoraConfig(**d) or jlora.LoraConfig.from_dict(d))"
        raise TypeError(f"{caller}: config must be a jlora.LoraConfig, got {type(config).__name__}{hint}")


def path_ends_with(module_path: str, name: str) -> bool:
    """``name`` (one or more "/"-separated components; PEFT's "." separators are read as "/") is the
    tail of ``module_path``."""
    name = name.replace(".", "/").strip("/")
    return module_path == name or module_path.endswith("/" + name)


def in_module(module_path: str, name: str) -> bool:
    """``module_path`` is, or lies inside, a module whose path ends with ``name``."""
    parts = module_path.split("/")
    return any(path_ends_with("/".join(parts[:i]), name) for i in range(1, len(parts) + 1))


def _lookup(pairs: tuple[tuple[str, Any], ...], module_path: str, default: Any) -> Any:
    for key, value in pairs:
        if _suffix_regex(key).fullmatch(module_path):
            return value
    return default


def preview(items: Iterable[str], limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"
