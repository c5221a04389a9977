"""Flax <-> PyTorch parameter names and layouts for transformers models.

transformers' own PyTorch->Flax rule (``modeling_flax_pytorch_utils``) renames ``weight`` to
``kernel`` (transposing 2-D linear weights, GPT-2's Conv1D included), to ``embedding`` for
embeddings and to ``scale`` for LayerNorm; this module is its inverse, so that a Flax params tree
can be written as a PyTorch ``state_dict`` without torch (``from_flax=True`` is broken in 4.57.6).
"""
from __future__ import annotations

import numpy as np

from jlora.tree import KeyPath, Tree, flatten

RENAMED = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def torch_key(path: KeyPath) -> str:
    """``("transformer", "h", "0", "attn", "c_attn", "kernel")`` -> ``"transformer.h.0.attn.c_attn.weight"``."""
    return ".".join((*map(str, path[:-1]), RENAMED.get(path[-1], path[-1])))


def torch_module(module_path: str) -> str:
    """A "/"-joined Flax module path as PyTorch's dotted module name."""
    return module_path.replace("/", ".")


def to_torch_state(params: Tree) -> dict[str, np.ndarray]:
    """A Flax params tree as PyTorch-named, PyTorch-laid-out numpy arrays."""
    state: dict[str, np.ndarray] = {}
    for path, leaf in flatten(params).items():
        array = np.asarray(leaf)
        if path[-1] == "kernel":
            if array.ndim != 2:
                raise ValueError(f"params: kernel {'/'.join(path)!r} has shape {array.shape}; only 2-D linear "
                                 "kernels have a PyTorch layout here")
            array = array.T
        key = torch_key(path)
        if key in state:
            raise ValueError(f"params: two leaves map to the PyTorch name {key!r}")
        state[key] = np.ascontiguousarray(array)
    return state


# GGUF (llama.cpp) block tensor names -> the HF Llama module path within a layer
GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
