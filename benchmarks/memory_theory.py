"""The theoretical memory floor of a GPT-2 train step (no recomputation), to compare XLA's peak with.

A train step must hold, at its peak (the start of the backward pass), the arguments and the
activations the backward pass reads. Counting float32 elements for a GPT-2 block with
``b x s`` tokens, width ``h``, ``a`` heads and no dropout (after Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", section 4.1):

    ln_1 input           s b h       LayerNorm backward (plus mean and 1/std: 2 s b)
    c_attn input         s b h       dW of c_attn (full), dA of its adapter (LoRA)
    q, k, v              3 s b h     backward of q k^T and of p v
    softmax output p     a s^2 b     softmax backward and backward of p v
    c_proj input         s b h       dW of attn c_proj                       (full only)
    ln_2 input           s b h       LayerNorm backward (plus 2 s b)
    c_fc input           s b h       dW of c_fc                              (full only)
    gelu input           4 s b h     gelu backward
    mlp c_proj input     4 s b h     dW of mlp c_proj                        (full only)

i.e. ``16 s b h + a s^2 b + 4 s b`` per layer for a full fine-tune, and ``10 s b h + a s^2 b + 4 s b``
(+ ``2 r s b`` for ``x @ A`` of the q and v adapters) for LoRA on c_attn, whose backward needs no
input of a frozen matmul (``dx = dy @ W^T`` reads only ``W``). After the blocks: ln_f's input and
statistics (``s b h + 2 s b``), the head's input (``s b h``, full only: dW of the tied embedding) and
the logits ``s b V`` (the softmax is formed from them; the logits gradient can take their place).

The issue asks for the limit "params + activations" (LoRA) vs "params + grads + Adam moments +
activations" (full) with the same activations on both sides: that is ``floor(..., lora_aware=False)``.
``lora_aware=True`` gives the lower LoRA floor above, which only a step that recomputes nothing and
stores nothing a frozen layer does not need would reach.
"""
from __future__ import annotations


def gpt2_activation_bytes(spec: dict, vocab: int, *, lora_aware: bool, rank: int = 0, itemsize: int = 4) -> int:
    """Activation bytes a GPT-2 backward pass reads (see the module docstring for the count).

    ``spec`` holds n_layer, n_embd, n_head, batch, seq; ``lora_aware`` drops the inputs of frozen
    matmuls and adds the ``(tokens, r)`` adapter activations of q and v.
    """
    tokens, h, heads = spec["batch"] * spec["seq"], spec["n_embd"], spec["n_head"]
    attention = heads * spec["seq"] ** 2 * spec["batch"]
    per_layer = (10 if lora_aware else 16) * tokens * h + attention + 4 * tokens
    if lora_aware:
        per_layer += 2 * rank * tokens
    tail = tokens * h + 2 * tokens + (0 if lora_aware else tokens * h) + tokens * vocab
    return itemsize * (spec["n_layer"] * per_layer + tail)


def live_bytes(memory: dict[str, int]) -> int:
    """What a compiled step holds at its peak, from XLA's memory analysis (``argument``, ``output``,
    ``alias``, ``temp`` bytes): arguments + outputs - donated aliases + temporaries."""
    return memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]


def state_bytes(params_bytes: int, trainable_bytes: int) -> dict[str, int]:
    """Training state of each step, activations left out. LoRA: the frozen params + the trainable
    tree, its gradient and two Adam moments (``P + 4 T``); full: params, gradients and two Adam
    moments (``4 P``)."""
    return {"lora": params_bytes + 4 * trainable_bytes, "full": 4 * params_bytes}


def floor(spec: dict, vocab: int, params_bytes: int, trainable_bytes: int, batch_bytes: int, *,
          lora_aware: bool = False, rank: int = 8) -> dict[str, int]:
    """Byte floors of the LoRA and the full step: state + activations.

    :func:`state_bytes` + activations; ``batch_bytes`` (the token ids) is added to both.
    """
    activations_full = gpt2_activation_bytes(spec, vocab, lora_aware=False)
    activations_lora = gpt2_activation_bytes(spec, vocab, lora_aware=lora_aware, rank=rank)
    state = state_bytes(params_bytes, trainable_bytes)
    return {"lora": state["lora"] + activations_lora + batch_bytes,
            "full": state["full"] + activations_full + batch_bytes,
            "activations_lora": activations_lora, "activations_full": activations_full}
