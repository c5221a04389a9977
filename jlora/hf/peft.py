"""PEFT's LoRA adapter format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT stores torch layouts: ``lora_A.weight = lora_a.T`` with shape (r, fan_in) and
``lora_B.weight = lora_b.T`` with shape (fan_out, r), under
``base_model.model.<torch module path>``; embeddings use ``lora_embedding_A`` (r, vocab) and
``lora_embedding_B`` (dim, r); trained biases and ``modules_to_save`` are stored under their own
torch names. A fused projection with ``enable_lora`` slices (GPT-2's q,v-only ``c_attn``) becomes
one PEFT adapter of rank ``n_enabled * r`` whose ``lora_B`` is block-diagonal over the enabled
slices and zero on the others, with ``alpha`` set so that the scale is unchanged: the same function.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jlora.config import LoraConfig
from jlora.core import delta, fused_delta
from jlora.hf.export import atomic_dir, save_torch_safetensors
from jlora.hf.names import to_torch_state, torch_module
from jlora.tree import LORA_KEYS, Tree, flatten, key_path_str, unflatten

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"))
UNSUPPORTED = {"use_dora": False, "use_qalora": False, "layer_replication": None, "trainable_token_indices": None,
               "target_parameters": None, "lora_bias": False}


def _model_params(model: Any) -> Tree:
    params = getattr(model, "_params", None)
    if params is None:
        params = getattr(model, "params_shape_tree", None)
    if params is None:
        raise ValueError("model: an HF Flax model with params (or params_shape_tree) is needed to map names")
    return params


def _module_leaves(model: Any) -> dict[str, dict[str, Any]]:
    """``{flax module path: {leaf name: array or shape struct}}`` of the model's params."""
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in flatten(_model_params(model)).items():
        modules.setdefault(key_path_str(path[:-1]), {})[path[-1]] = leaf
    return modules


def _peft_pair(mpath: str, lora_a: np.ndarray, lora_b: np.ndarray, config: LoraConfig
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """PEFT's (lora_A.weight, lora_B.weight, alpha) for one jlora adapter."""
    mask = config.slices_for(mpath)
    scale = config.scale_for(mpath, lora_a.shape[-1])
    if mask is None:
        return lora_a.T, lora_b.T, config.alpha_for(mpath)
    n_enabled, fan_in, rank = lora_a.shape
    width = lora_b.shape[-1]
    big_a = np.concatenate([lora_a[i].T for i in range(n_enabled)], axis=0)  # (n_enabled * r, fan_in)
    big_b = np.zeros((width * len(mask), n_enabled * rank), lora_b.dtype)
    slot = 0
    for i, enabled in enumerate(mask):
        if enabled:
            big_b[i * width:(i + 1) * width, slot * rank:(slot + 1) * rank] = lora_b[slot].T
            slot += 1
    big_rank = n_enabled * rank
    return big_a, big_b, scale * (math.sqrt(big_rank) if config.use_rslora else big_rank)


def _task_type(model: Any) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)


def save_peft(out_dir: str | os.PathLike, model: Any, lora: Tree, config: LoraConfig, *,
              overwrite: bool = False) -> Path:
    """Write ``lora`` (adapters, plus trained biases / modules_to_save if present) in PEFT's format.

    ``peft.PeftModel.from_pretrained(torch_model, out_dir)`` loads it onto the PyTorch model of
    the same architecture. Adapters whose shapes do not fit ``model`` raise naming the module.
    """
    modules = _module_leaves(model)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas = {}, {}
    flat = flatten(lora, "lora")
    for path in sorted({p[:-1] for p in flat if p[-1] in LORA_KEYS}):
        mpath = key_path_str(path)
        a, b = (np.asarray(jax.device_get(flat.get((*path, k))), np.float32) if (*path, k) in flat else None
                for k in LORA_KEYS)
        leaves = modules.get(mpath)
        if leaves is None or a is None or b is None or not ({"kernel", "embedding"} & set(leaves)):
            raise ValueError(f"lora: {mpath!r} is not a complete adapter for a layer of this "
                             f"{type(model).__name__}; was it made for another model?")
        kernel = leaves.get("kernel", leaves.get("embedding"))
        mask = config.slices_for(mpath)
        transposed = config.fan_in_fan_out and "kernel" in leaves
        check = (lambda: fused_delta(a, b, kernel.shape, mask, transposed=transposed, where=mpath)) if mask \
            else (lambda: delta(a, b, kernel.shape, transposed=transposed, where=mpath))
        jax.eval_shape(check)  # the adapter must fit this model's kernel
        big_a, big_b, alpha = _peft_pair(mpath, a, b, config)
        name = PREFIX + torch_module(mpath)
        if "embedding" in leaves:
            tensors[name + ".lora_embedding_A"], tensors[name + ".lora_embedding_B"] = big_a, big_b
        else:
            tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"] = big_a, big_b
        ranks[torch_module(mpath)], alphas[torch_module(mpath)] = big_a.shape[0], alpha
    if not ranks:
        raise ValueError("lora: no adapters (lora_a/lora_b pairs) to save")
    others = {p: v for p, v in flat.items() if p[-1] not in LORA_KEYS}
    adapted = {torch_module(m) for m in ranks}
    for key, value in to_torch_state(unflatten(others)).items() if others else ():
        owner, leaf = key.rsplit(".", 1)  # PEFT wraps an adapted layer: its own bias is base_layer.bias
        tensors[PREFIX + (f"{owner}.base_layer.{leaf}" if owner in adapted else key)] = value.astype(np.float32)
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    peft_config = {
        "peft_type": "LORA", "task_type": _task_type(model),
        "base_model_name_or_path": getattr(model.config, "name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": config.fan_in_fan_out, "bias": config.bias, "use_rslora": config.use_rslora,
        "modules_to_save": list(config.modules_to_save) or None,
        "init_lora_weights": config.init_lora_weights if config.init_lora_weights != "kaiming" else True,
        "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != alpha},
        "inference_mode": True, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_torch_safetensors(tensors, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return Path(out_dir)


def _peft_lookup(pattern: dict[str, Any], name: str, default: Any) -> Any:
    for key, value in pattern.items():  # PEFT's rule: the key matches the end of the dotted name
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read(in_dir: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (in_dir / name).is_file():
            raise FileNotFoundError(f"in_dir {str(in_dir)!r}: no {name}; a PEFT LoRA adapter folder holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    peft_config = json.loads((in_dir / CONFIG_FILE).read_text())
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{in_dir / CONFIG_FILE}: peft_type is {peft_config.get('peft_type')!r}, expected 'LORA'")
    for key, neutral in UNSUPPORTED.items():
        if peft_config.get(key, neutral) not in (neutral, {}, []):
            raise ValueError(f"{in_dir / CONFIG_FILE}: {key}={peft_config[key]!r} is not supported by jlora")
    return peft_config, load_file(str(in_dir / WEIGHTS_FILE))


def load_peft(in_dir: str | os.PathLike, model: Any) -> tuple[dict[str, Any], LoraConfig]:
    """Read a PEFT LoRA adapter folder into jlora's tree and config, for the HF Flax ``model``.

    Returns ``(lora, config)``: ``lora`` holds ``lora_a (fan_in, r)``/``lora_b (r, fan_out)`` per
    adapted module plus any trained biases / ``modules_to_save`` in Flax layout; ``config`` targets
    exactly the adapted modules, with per-module ranks and alphas, so that
    ``jlora.apply(model, config)(model.params, lora, ...)`` equals the PEFT model.

    Raises naming the key at fault: a tensor for a module the model lacks, a lora_A without its
    lora_B, a shape that does not fit the layer.
    """
    in_dir = Path(in_dir)
    peft_config, tensors = _read(in_dir)
    modules = _module_leaves(model)
    by_torch = {torch_module(m): m for m in modules}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    flat: dict[tuple[str, ...], Any] = {}
    suffixes = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b",
                ".lora_embedding_A": "lora_a", ".lora_embedding_B": "lora_b"}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{in_dir / WEIGHTS_FILE}: key {key!r} does not start with {PREFIX!r}")
        name = key[len(PREFIX):].replace(".base_layer.", ".")
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        owner = name[:-len(suffix)] if suffix else name.rsplit(".", 1)[0]
        if owner not in by_torch:
            raise ValueError(f"{in_dir / WEIGHTS_FILE}: key {key!r} names module {owner!r}, which this "
                             f"{type(model).__name__} does not have; the adapter was made for another model")
        if suffix:
            pairs.setdefault(by_torch[owner], {})[suffixes[suffix]] = value.T
            continue
        leaves, leaf = modules[by_torch[owner]], name.rsplit(".", 1)[1]
        flax_leaf = leaf if leaf in leaves else next((k for k in ("kernel", "embedding", "scale") if k in leaves
                                                      and leaf == "weight"), None)
        if flax_leaf is None:
            raise ValueError(f"{in_dir / WEIGHTS_FILE}: key {key!r} has no counterpart in the model's params")
        flat[(*by_torch[owner].split("/"), flax_leaf)] = value.T if flax_leaf == "kernel" else value
    ranks, alphas = {}, {}
    r, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    fan_in_fan_out = bool(peft_config.get("fan_in_fan_out", False))
    for mpath, pair in sorted(pairs.items()):
        missing = [k for k in LORA_KEYS if k not in pair]
        if missing:
            raise ValueError(f"{in_dir / WEIGHTS_FILE}: module {torch_module(mpath)!r} lacks "
                             f"{'lora_A' if 'lora_a' in missing else 'lora_B'}")
        leaves = modules[mpath]
        kernel = leaves.get("kernel", leaves.get("embedding"))
        if kernel is None:
            raise ValueError(f"{in_dir / WEIGHTS_FILE}: module {torch_module(mpath)!r} has no kernel to adapt")
        try:
            jax.eval_shape(lambda: delta(pair["lora_a"], pair["lora_b"], kernel.shape,
                                         transposed=fan_in_fan_out and "kernel" in leaves, where=mpath))
        except ValueError as err:
            raise ValueError(f"{in_dir / WEIGHTS_FILE}: wrong shapes for {torch_module(mpath)!r}: "
                             f"lora_A {pair['lora_a'].T.shape}, lora_B {pair['lora_b'].T.shape} ({err})") from None
        flat[(*mpath.split("/"), "lora_a")], flat[(*mpath.split("/"), "lora_b")] = pair["lora_a"], pair["lora_b"]
        ranks[mpath] = pair["lora_a"].shape[-1]
        alphas[mpath] = float(_peft_lookup(peft_config.get("alpha_pattern") or {}, torch_module(mpath), alpha))
    if not pairs:
        raise ValueError(f"{in_dir / WEIGHTS_FILE}: no lora_A/lora_B tensors")
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=tuple(pairs), lora_dropout=float(peft_config.get("lora_dropout", 0.0)),
        use_rslora=bool(peft_config.get("use_rslora", False)), fan_in_fan_out=fan_in_fan_out,
        rank_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != alpha},
        bias=peft_config.get("bias", "none"), modules_to_save=tuple(peft_config.get("modules_to_save") or ()),
        init_lora_weights=peft_config.get("init_lora_weights", True) if peft_config.get(
            "init_lora_weights", True) in (True, False, "gaussian") else True)
    return unflatten(flat), config
