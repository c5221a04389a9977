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
from jlora.plan import Target, make_plan
from jlora.hf.export import atomic_dir, save_torch_safetensors
from jlora.hf.names import to_torch_state, torch_module
from jlora.tree import LORA_KEYS, Tree, adapter_modules, flatten, key_path_str, unflatten

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"))
OUTPUT_HEAD_SUFFIXES = ("LMHeadModel", "ForCausalLM", "ForConditionalGeneration")
# PEFT initialisations that change the base weights (the adapter is meaningless without that changed base)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
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


def _peft_pair(target: Target, lora_a: np.ndarray, lora_b: np.ndarray, use_rslora: bool
               ) -> tuple[np.ndarray, np.ndarray, float]:
    """PEFT's (lora_A.weight, lora_B.weight, alpha) for one planned adapter."""
    if target.slices is None:
        return lora_a.T, lora_b.T, target.alpha
    n_enabled, fan_in, rank = lora_a.shape
    width = lora_b.shape[-1]
    big_a = np.concatenate([lora_a[i].T for i in range(n_enabled)], axis=0)  # (n_enabled * r, fan_in)
    big_b = np.zeros((width * len(target.slices), n_enabled * rank), lora_b.dtype)
    slot = 0
    for i, enabled in enumerate(target.slices):
        if enabled:
            big_b[i * width:(i + 1) * width, slot * rank:(slot + 1) * rank] = lora_b[slot].T
            slot += 1
    big_rank = n_enabled * rank
    return big_a, big_b, target.scale * (math.sqrt(big_rank) if use_rslora else big_rank)


def _task_type(model: Any) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)


def tied_head_name(model: Any, head_path: str) -> str:
    """PyTorch's module name of a tied head that the Flax model calls at ``head_path``."""
    if head_path:
        return head_path.replace("/", ".")
    if any(type(model).__name__.endswith(s) for s in OUTPUT_HEAD_SUFFIXES):
        return "lm_head"
    raise ValueError(f"{type(model).__name__}: an adapter on a tied embedding is exported to PEFT as a second adapter "
                     "on the tied head, whose PyTorch name jlora knows only for LM-head models")


def save_peft(out_dir: str | os.PathLike, model: Any, lora: Tree, config: LoraConfig, *,
              overwrite: bool = False) -> Path:
    """Write ``lora`` (adapters, plus trained biases / modules_to_save if present) in PEFT's format.

    ``peft.PeftModel.from_pretrained(torch_model, out_dir)`` loads it onto the PyTorch model of
    the same architecture. Adapters whose shapes do not fit ``model`` raise naming the module.
    An adapter on an embedding that the model's LM head reads (tied) is also written as an adapter
    on the head (``lora_A = lora_b``, ``lora_B = lora_a``: PEFT's own ``ensure_weight_tying``
    layout), so that PEFT's model computes what ``jlora.apply`` and ``jlora.merge`` do.
    """
    plan = make_plan(_model_params(model), config, lora=lora, model=model, caller="jlora.hf.save_peft")
    pairs = adapter_modules(lora)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas = {}, {}
    for target in plan.values():
        pair = pairs[target.key_path[:-1]]
        a, b = (np.asarray(jax.device_get(pair[k]), np.float32) for k in LORA_KEYS)
        big_a, big_b, alpha = _peft_pair(target, a, b, config.use_rslora)
        name = PREFIX + target.torch_name
        if target.kind == "embed":
            tensors[name + ".lora_embedding_A"], tensors[name + ".lora_embedding_B"] = big_a, big_b
            for head in target.tied_heads:
                head_name = tied_head_name(model, head)
                tensors[PREFIX + head_name + ".lora_A.weight"] = np.ascontiguousarray(b)
                tensors[PREFIX + head_name + ".lora_B.weight"] = np.ascontiguousarray(a)
                ranks[head_name], alphas[head_name] = target.rank, alpha
        else:
            tensors[name + ".lora_A.weight"], tensors[name + ".lora_B.weight"] = big_a, big_b
        ranks[target.torch_name], alphas[target.torch_name] = big_a.shape[0], alpha
    flat = flatten(lora, "lora")
    others = {p: v for p, v in flat.items() if p[-1] not in LORA_KEYS}
    adapted = set(ranks)
    for key, value in to_torch_state(unflatten(others)).items() if others else ():
        owner, leaf = key.rsplit(".", 1)  # PEFT wraps an adapted layer: its own bias is base_layer.bias
        tensors[PREFIX + (f"{owner}.base_layer.{leaf}" if owner in adapted else key)] = value.astype(np.float32)
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    transposed = any(t.layout.transposed for t in plan.values())
    peft_config = {
        "peft_type": "LORA", "task_type": _task_type(model),
        "base_model_name_or_path": getattr(model.config, "name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": transposed, "bias": config.bias, "use_rslora": config.use_rslora,
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
    init_mode = str(peft_config.get("init_lora_weights", True)).lower()
    if any(init_mode.startswith(kind) for kind in BASE_CHANGING_INITS):
        raise ValueError(f"{in_dir / CONFIG_FILE}: init_lora_weights={peft_config['init_lora_weights']!r} made this "
                         "adapter together with a changed base model (its principal components moved into the "
                         "adapter); applied onto the original base it gives wrong outputs, and jlora does not "
                         "support such adapters yet. Convert it to a plain LoRA adapter in PEFT first "
                         "(PeftModel.save_pretrained(..., path_initial_model_for_weight_conversion=...))")
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
    lora_B, a shape that does not fit the layer, an adapter made by an initialisation that changes
    the base weights (PiSSA, OLoRA, CorDA, LoftQ), an adapter on a tied head that is not the
    transposed twin of its embedding's.
    """
    in_dir = Path(in_dir)
    where = in_dir / WEIGHTS_FILE
    peft_config, tensors = _read(in_dir)
    params = _model_params(model)
    modules = _module_leaves(model)
    by_torch = {torch_module(m): m for m in modules}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    heads: dict[str, dict[str, np.ndarray]] = {}
    flat: dict[tuple[str, ...], Any] = {}
    suffixes = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b",
                ".lora_embedding_A": "lora_a", ".lora_embedding_B": "lora_b"}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{where}: key {key!r} does not start with {PREFIX!r}")
        name = key[len(PREFIX):].replace(".base_layer.", ".")
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        owner = name[:-len(suffix)] if suffix else name.rsplit(".", 1)[0]
        if owner not in by_torch:
            if suffix and suffix.startswith(".lora_") and owner == "lm_head":
                heads.setdefault(owner, {})[suffixes[suffix]] = value  # maybe a tied head: checked below
                continue
            raise ValueError(f"{where}: key {key!r} names module {owner!r}, which this "
                             f"{type(model).__name__} does not have; the adapter was made for another model")
        if suffix:
            pairs.setdefault(by_torch[owner], {})[suffixes[suffix]] = value.T
            continue
        leaves, leaf = modules[by_torch[owner]], name.rsplit(".", 1)[1]
        flax_leaf = leaf if leaf in leaves else next((k for k in ("kernel", "embedding", "scale") if k in leaves
                                                      and leaf == "weight"), None)
        if flax_leaf is None:
            raise ValueError(f"{where}: key {key!r} has no counterpart in the model's params")
        flat[(*by_torch[owner].split("/"), flax_leaf)] = value.T if flax_leaf == "kernel" else value
    if not pairs:
        raise ValueError(f"{where}: no lora_A/lora_B tensors")
    ranks, alphas = {}, {}
    r, alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    for mpath, pair in sorted(pairs.items()):
        missing = [k for k in LORA_KEYS if k not in pair]
        if missing:
            raise ValueError(f"{where}: module {torch_module(mpath)!r} lacks "
                             f"{'lora_A' if 'lora_a' in missing else 'lora_B'}")
        leaves = modules[mpath]
        if "kernel" not in leaves and "embedding" not in leaves:
            raise ValueError(f"{where}: module {torch_module(mpath)!r} has no kernel to adapt")
        flat[(*mpath.split("/"), "lora_a")], flat[(*mpath.split("/"), "lora_b")] = pair["lora_a"], pair["lora_b"]
        ranks[mpath] = pair["lora_a"].shape[-1]
        alphas[mpath] = float(_peft_lookup(peft_config.get("alpha_pattern") or {}, torch_module(mpath), alpha))
    init_mode = peft_config.get("init_lora_weights", True)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=tuple(pairs), lora_dropout=float(peft_config.get("lora_dropout", 0.0)),
        use_rslora=bool(peft_config.get("use_rslora", False)),
        rank_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != alpha},
        bias=peft_config.get("bias", "none"), modules_to_save=tuple(peft_config.get("modules_to_save") or ()),
        init_lora_weights=init_mode if init_mode in (True, False, "gaussian") else True)
    lora = unflatten(flat)
    try:
        plan = make_plan(params, config, lora=lora, model=model, caller="jlora.hf.load_peft")
    except ValueError as err:
        mpath = next((m for m in pairs if repr(m) in str(err)), None)
        if mpath is None:
            raise
        pair = pairs[mpath]
        raise ValueError(f"{where}: wrong shapes for {torch_module(mpath)!r}: lora_A {pair['lora_a'].T.shape}, "
                         f"lora_B {pair['lora_b'].T.shape} ({err})") from None
    _check_tied_heads(where, model, plan, pairs, heads, bool(peft_config.get("ensure_weight_tying", False)))
    return lora, config


def _check_tied_heads(where: Path, model: Any, plan: Any, pairs: dict, heads: dict, tying: bool) -> None:
    """A head adapter the Flax model has no params for must be the tied twin of an embedding adapter,
    and an adapter on a tied embedding must come with that twin (PEFT without ``ensure_weight_tying``
    adapts only the lookup, which a tied weight in jlora cannot express)."""
    for target in plan.values():
        if target.kind == "embed" and target.tied_heads:
            names = {tied_head_name(model, h) for h in target.tied_heads}
            if not names & set(heads) and not tying:
                raise ValueError(
                    f"{where}: the adapter on {target.torch_name!r} adapts an embedding that this "
                    f"{type(model).__name__}'s head reads too (tie_word_embeddings), but the folder has no adapter on "
                    f"the head {sorted(names)}: PEFT applied it to the token lookup only. jlora adapts a tied weight "
                    "as one weight (lookup and head, as merge does), so these logits would differ from PEFT's. "
                    "Train it in PEFT with ensure_weight_tying=True (which adapts both), or load it onto an "
                    "untied copy of the model (tie_word_embeddings=False, the head's weight copied from the table)")
    for head_name, head in heads.items():
        twin = next(((t, pairs[t.path]) for t in plan.values() if t.kind == "embed"
                     and any(tied_head_name(model, h) == head_name for h in t.tied_heads)), None)
        if twin is None:
            raise ValueError(f"{where}: an adapter on {head_name!r}, which this {type(model).__name__} does not have as "
                             "a module of its own (its head is tied to the input embedding); jlora adapts a tied "
                             "weight as one weight: put the adapter on the embedding")
        _, pair = twin
        if set(head) != set(LORA_KEYS) or not (np.allclose(head["lora_a"], pair["lora_b"]) and
                                                np.allclose(head["lora_b"], pair["lora_a"])):
            raise ValueError(f"{where}: the adapter on the tied head {head_name!r} differs from its embedding's "
                             "(lora_A must be lora_embedding_B.T and lora_B lora_embedding_A.T); a tied weight is "
                             "one weight in jlora and cannot carry two different adapters")
