"""FlaxT5 on jax >= 0.10.

transformers 4.57 (the last release with Flax models) computes T5's relative-position buckets with
``jnp.clip(x, a_max=...)`` (``FlaxT5*`` and ``FlaxLongT5*``). jax 0.10 removed clip's ``a_min`` /
``a_max`` keywords in favour of ``min`` / ``max``, so building any FlaxT5 model there fails with
``TypeError: clip() got an unexpected keyword argument 'a_max'``; no transformers release will fix it.

:func:`install` (run by ``import jlora``) gives those two transformers modules, and nothing else, a
``jnp`` whose ``clip`` also accepts ``a_min`` / ``a_max``; every other name is jax.numpy's own. A
module already imported is patched at once, one imported later as it loads. On a jax whose
``jnp.clip`` still takes ``a_max`` it does nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import sys
from types import ModuleType
from typing import Any

import jax.numpy as jnp

MODULES = ("transformers.models.t5.modeling_flax_t5", "transformers.models.longt5.modeling_flax_longt5")


def clip(arr: Any = None, /, min: Any = None, max: Any = None, *, a: Any = None,  # noqa: A002
         a_min: Any = None, a_max: Any = None) -> Any:
    """``jnp.clip`` that also takes numpy's old keywords ``a`` / ``a_min`` / ``a_max``."""
    if a is not None:
        if arr is not None:
            raise TypeError("clip() got both a positional array and a=")
        arr = a
    if a_min is not None:
        if min is not None:
            raise TypeError("clip() got both min= and a_min=")
        min = a_min  # noqa: A001
    if a_max is not None:
        if max is not None:
            raise TypeError("clip() got both max= and a_max=")
        max = a_max  # noqa: A001
    return jnp.clip(arr, min=min, max=max)


class _Numpy(ModuleType):
    """``jax.numpy`` with :func:`clip` in place of ``jnp.clip``."""

    clip = staticmethod(clip)

    def __init__(self) -> None:
        super().__init__("jax.numpy", "jax.numpy with a clip that accepts a_min / a_max (see jlora.hf.t5)")

    def __getattr__(self, name: str) -> Any:
        return getattr(jnp, name)


NUMPY = _Numpy()


def needed() -> bool:
    """True when this jax's ``jnp.clip`` no longer accepts ``a_max`` (jax >= 0.10)."""
    try:
        return "a_max" not in inspect.signature(jnp.clip).parameters
    except (TypeError, ValueError):  # pragma: no cover - a signature jax does not expose
        return True


def patch(module: ModuleType) -> None:
    """Give one transformers module the ``jnp`` above (if it uses jax.numpy as ``jnp``)."""
    if getattr(module, "jnp", None) is jnp:
        module.jnp = NUMPY


class _PatchOnLoad(importlib.abc.MetaPathFinder):
    """Finds :data:`MODULES` like the default path finder and patches each after it executes."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            patch(module)

        loader.exec_module = exec_module  # this spec's own loader instance, nobody else's
        return spec


def install(*, force: bool = False) -> bool:
    """Make FlaxT5 / FlaxLongT5 work on this jax; returns whether a patch was (or is) in place.

    Idempotent. ``force=True`` installs it even where jax still accepts ``a_max`` (for tests).
    """
    if not (force or needed()):
        return False
    for name in MODULES:
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(finder, _PatchOnLoad) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnLoad())
    return True
