"""Parameter counts: what trains, what is frozen, and what an adapter checkpoint weighs."""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from jlora.config import LoraConfig, check_config
from jlora.optim import TRAINABLE, labels
from jlora.plan import make_plan
from jlora.qformats import is_quantized
from jlora.tree import COLLECTION, Tree, combine, flatten, is_variables_dict


def size_of(tree: Tree) -> tuple[int, int]:
    """``(parameters, bytes)`` of every leaf; a quantized kernel counts its weights and its codes' and scales' bytes."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)  # a quantized kernel: its weights, its bytes
    count = sum(math.prod(x.shape if is_quantized(x) else np.shape(x)) for x in leaves)
    nbytes = sum(x.nbytes if is_quantized(x) else math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in leaves)
    return count, nbytes


@dataclasses.dataclass(frozen=True)
class LoraCount:
    """Counts for a base model with adapters (the ``params`` collection only: no ``batch_stats``).

    Attributes:
      base: parameters of the base model (frozen and trainable base leaves).
      adapter: ``lora_a``/``lora_b`` parameters.
      trainable: parameters that receive gradients (adapters + released biases/modules_to_save).
      checkpoint_bytes: bytes of the trainable tree, i.e. of an adapter checkpoint's tensors.
      base_bytes: bytes of the base params, i.e. of a full checkpoint's tensors.
    """

    base: int
    adapter: int
    trainable: int
    checkpoint_bytes: int
    base_bytes: int

    @property
    def total(self) -> int:
        """All parameters of the adapted model: the base plus the adapters (PEFT's "all params")."""
        return self.base + self.adapter

    @property
    def trainable_fraction(self) -> float:
        """``trainable / total``, as PEFT's ``print_trainable_parameters`` computes it."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {100 * self.trainable_fraction:.4f} || adapter checkpoint: "
                f"{self.checkpoint_bytes / 2**20:.3f} MiB vs full {self.base_bytes / 2**20:.3f} MiB")


def count(params: Tree, lora: Tree, config: LoraConfig) -> LoraCount:
    """Count base, adapter and trainable parameters and checkpoint bytes (``params`` collection only)."""
    check_config(config, "jlora.count")
    if is_variables_dict(params):
        params = {COLLECTION: params[COLLECTION]}
        lora = {COLLECTION: lora[COLLECTION]} if is_variables_dict(lora) else lora
    plan = make_plan(params, config, lora=lora, caller="jlora.count")  # every adapter checked against its kernel
    combined = combine(params, lora)  # the trainable leaves, by label: no copies, no second plan (split's)
    marks = flatten(labels(combined, config))
    trainable = [leaf for path, leaf in flatten(combined).items() if marks[path] == TRAINABLE]
    n_base, base_bytes = size_of(params)
    n_adapter = sum(target.n_params for target in plan.values())
    n_trainable, trainable_bytes = size_of(trainable)
    return LoraCount(base=n_base, adapter=n_adapter, trainable=n_trainable,
                     checkpoint_bytes=trainable_bytes, base_bytes=base_bytes)
