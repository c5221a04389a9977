"""jlora: LoRA (Hu et al. 2021) as pure functions over JAX parameter pytrees.

    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=("query", "value"))
    lora = jlora.init(rng, params, config)
    f = jlora.apply(model.apply, config)      # f(params, lora, *args) == model.apply(params', *args)
    merged = jlora.merge(params, lora, config)
"""
from jlora.config import LoraConfig
from jlora.plan import AdapterPlan, KernelLayout, Target, make_plan
from jlora.core import delta, init, merge, unmerge
from jlora.intercept import LoraApply, apply, find_layouts
from jlora.layers import LoraDense
from jlora.losses import lm_head_cross_entropy, next_token_targets
from jlora.optim import labels, optimizer, split
from jlora.summary import LoraCount, count
from jlora.tree import combine, partition
from jlora.train import make_pmap_train_step, make_train_step, plan_shardings
from jlora.checkpoint import AdapterCheckpointer
from jlora.quantize import base_bytes, dequantize, is_quantized, quantize
from jlora.qlayers import quantized_layers
from jlora.weighted import weighted_adapter
from jlora.generate import generate  # the function; its helpers: from jlora.generate import nucleus_filter
from jlora import hf  # noqa: E402  (jlora.hf imports transformers lazily: not at all)
from jlora import rng  # noqa: E402  (jlora.rng.key: cheap dropout keys with jax's threefry bits)
from jlora import bank  # noqa: E402  (jlora.bank.stack / put / take / apply: many adapters in one batch)

__version__ = "0.1.0"
__all__ = [
    "hf", "rng", "bank", "LoraConfig", "AdapterPlan", "KernelLayout", "Target", "make_plan", "LoraApply", "LoraCount", "LoraDense",
    "apply", "combine", "count", "delta", "find_layouts", "init", "labels", "merge", "optimizer",
    "partition", "split", "unmerge", "make_train_step", "make_pmap_train_step", "plan_shardings",
    "AdapterCheckpointer", "lm_head_cross_entropy", "next_token_targets", "generate",
    "quantize", "dequantize", "base_bytes", "is_quantized", "quantized_layers",
    "weighted_adapter",
]
