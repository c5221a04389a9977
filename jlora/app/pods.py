"""Meshes for ``jlora finetune --mesh``: named axes, base PartitionSpecs, global batches, processes.

``--mesh data=2,fsdp=4`` (or ``tensor=``; a bare ``N`` means ``data=N``) builds a mesh of that shape
over the devices of every process (``jax.distributed``). The base params get PartitionSpecs by rule,
from each kernel's axis roles as the adapter plan reads them off the model (``jlora.find_layouts``):

* ``tensor``: Megatron-style. Projections into a wider space (W_q, W_k, W_v, the MLP's up/gate:
  *column* layers) are split along their output axis, the projections back (W_o, the MLP's down:
  *row* layers) along their input axis;
* ``fsdp``: every other axis of a 2-D+ leaf: its largest axis that the ``fsdp`` size divides
  (ZeRO-3: each device holds a slice, XLA gathers it for the matmul);
* ``data``: nothing of the params; batches are split over ``data`` and ``fsdp`` together.

The adapters, the optimizer state and the frozen tree then follow from :func:`jlora.plan_shardings`.
An axis that a size does not divide stays replicated. Every process computes the same global batch
indices and places only its own rows on its devices (``jax.make_array_from_callback``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jlora.tree import Tree, flatten, unflatten

AXES = ("data", "fsdp", "tensor")
COLUMN = re.compile(r"(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|c_attn|c_fc|wi|wi_0|wi_1)$|"
                    r"(^|/)intermediate/dense$")
ROW = re.compile(r"(^|/)(o_proj|down_proj|c_proj|wo)$|(^|/)output/dense$")  # BERT: attention/output, output


def parse_mesh(text: str | int) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``; ``"8"`` -> ``{"data": 8}``."""
    text = str(text).strip()
    if text.isdigit():
        text = f"data={text}"
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = part.partition("=")
        if not eq or name not in AXES or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS one of {AXES} and "
                             f"SIZE a positive integer (e.g. data=2,fsdp=4), got {part!r}")
        if name in axes:
            raise ValueError(f"--mesh {text!r}: axis {name!r} given twice")
        axes[name] = int(size)
    if not axes:
        raise ValueError(f"--mesh {text!r}: no axes")
    return axes


@dataclasses.dataclass
class Pods:
    """A mesh with named axes and the rules above."""

    mesh: Mesh
    axes: dict[str, int]

    @classmethod
    def build(cls, text: str | int) -> "Pods":
        axes = parse_mesh(text)
        size, devices = math.prod(axes.values()), jax.devices()
        if size > len(devices) or (jax.process_count() > 1 and size != len(devices)):
            raise ValueError(f"--mesh {text}: {size} devices asked, {len(devices)} available over "
                             f"{jax.process_count()} process(es)" + (" (a multi-process mesh spans every device)"
                                                                     if jax.process_count() > 1 else ""))
        mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), devices=devices[:size],
                             axis_types=(AxisType.Auto,) * len(axes))
        return cls(mesh, axes)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return tuple(a for a in ("data", "fsdp") if a in self.axes)

    @property
    def rows_divisor(self) -> int:
        """Batch rows must be a multiple of this (the devices the batch is split over)."""
        return math.prod(self.axes[a] for a in self.batch_axes)

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.batch_axes or None))

    def check_rows(self, batch: int, micro_batches: int = 1) -> None:
        """Refuse a ``--batch`` whose (micro-)batches do not split over the batch axes' devices."""
        if batch % (self.rows_divisor * micro_batches):
            each = f"each of the --accumulate {micro_batches} micro-batches" if micro_batches > 1 else "it"
            raise ValueError(f"--batch {batch}: {each} must split over the {self.rows_divisor} devices of the mesh's "
                             f"batch axes {self.batch_axes}")

    def shardings(self, model: Any, params: Tree, trainable: Tree, frozen: Tree, tx: Any, config: Any,
                  batch_spec: Any) -> Any:
        """The train step's :class:`jlora.train.Shardings`: base specs by the rules above (axis roles read
        off ``model``), the adapters, optimizer state and frozen tree by :func:`jlora.plan_shardings`;
        without a LoRA ``config`` (head / full fine-tuning) the trained leaves keep their base specs.
        ``batch_spec``: a PartitionSpec for every batch leaf, or a tree of them."""
        from jlora.intercept import find_layouts
        from jlora.sharding import named, opt_state_specs
        from jlora.train import Shardings, plan_shardings

        specs = self.base_specs(params, find_layouts(model, params))
        if config is not None:
            return plan_shardings(self.mesh, params, specs, trainable, frozen, tx, config, batch_spec=batch_spec,
                                  model=model)
        flat = flatten(specs, "specs")
        pick = lambda tree: unflatten({k: flat[k] for k in flatten(tree, "tree")})  # noqa: E731
        return Shardings(trainable=named(self.mesh, pick(trainable)),
                         opt_state=named(self.mesh, opt_state_specs(tx, trainable, pick(trainable))),
                         frozen=named(self.mesh, pick(frozen)) if frozen else {},
                         batch=named(self.mesh, batch_spec), replicated=NamedSharding(self.mesh, P()))

    def base_specs(self, params: Tree, layouts: dict[str, Any]) -> Tree:
        """A PartitionSpec per leaf of ``params`` (``layouts``: ``{module path: KernelLayout}``)."""
        tensor, fsdp = self.axes.get("tensor", 1), self.axes.get("fsdp", 1)
        specs = {}
        for path, leaf in flatten(params, "params").items():
            shape, spec = tuple(leaf.shape), [None] * len(leaf.shape)
            module = "/".join(str(k) for k in path[:-1])
            layout = layouts.get(module)
            if tensor > 1 and layout is not None and path[-1] == "kernel":
                axis = _tensor_axis(module, layout, len(shape))
                if axis is not None and shape[axis] % tensor == 0:
                    spec[axis] = "tensor"
            if fsdp > 1 and len(shape) >= 2:
                free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
                if free:
                    spec[max(free, key=lambda i: shape[i])] = "fsdp"
            specs[path] = P(*spec)
        return unflatten(specs)

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The global batch on the mesh; each process reads only the rows of its own devices."""
        sharding = self.batch_sharding
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
                for k, v in batch.items()}


def _tensor_axis(module: str, layout: Any, ndim: int) -> int | None:
    """The axis of a kernel that ``tensor`` splits: the (first) output axis of a column layer, the
    (first) input axis of a row layer; None for other layers."""
    stack = layout.stack_dims
    if COLUMN.search(module):
        return stack if layout.transposed else stack + layout.in_dims
    if ROW.search(module):
        return stack + 1 if layout.transposed else stack
    return None


def gather(tree: Tree) -> Tree:
    """Host numpy copies of a (possibly multi-process) sharded tree, identical on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
