"""Adapter banks: N LoRA adapters stacked in one tree, a different one applied to each example.

The LoRA paper's own limitation (§4.2) is that inputs to different tasks cannot share one forward
pass. A bank lifts it: ``stack`` pads N adapter trees to one rank ``R`` (zero columns of ``lora_a``
and zero rows of ``lora_b`` add nothing) and stacks them along an adapter axis; ``apply(fn)`` runs
``fn`` once on a batch where example ``b`` uses adapter ``adapter_ids[b]``:

    y[b] = x[b] @ W + scale[ids[b]] * (x[b] @ A[ids[b]]) @ B[ids[b]]      (ids[b] = -1: the base, y = x @ W)

computed as a gather of the selected factors ``A[ids] (batch, fan_in, R)``, ``B[ids] (batch, R,
fan_out)`` and two batched matmuls: ``O(batch * tokens * R * (fan_in + fan_out))`` FLOPs and
``O(batch * R * (fan_in + fan_out))`` bytes read per layer, whatever N is (no one-hot over the bank).

Layout of a bank leaf (per adapted kernel): ``bank_a (*stack, N, *fan_in, R)``, ``bank_b (*stack, N,
R, *fan_out)``, ``bank_scale (*stack, N)``: the adapter axis comes after an ``nn.scan`` stack's
layer axis (so ``nn.scan`` slices layers, each layer seeing ``(N, ...)``) and before a fused
projection's slice axis. The bank is a pytree of arrays only (:class:`AdapterBank`): replacing a
slot (:func:`put`) keeps every shape, so a jitted forward or sampler taking the bank as an argument
does not recompile. Each slot keeps its own rank and scale (``alpha / r``, rslora, per-path
patterns), so :func:`take` gives back the adapter and a config that merge to the same weights.

Training several adapters on one mixed batch is ``jax.grad`` w.r.t. ``bank.factors``: slot ``k``
gets gradient only from the examples whose id is ``k`` (its rows of the gather).
"""
from jlora.bank.slots import BASE, AdapterBank, BankTarget, clear, put, select, stack, take, _leaf  # noqa: F401
from jlora.bank.forward import BankApply, apply, bank_delta, overlay, rows

__all__ = ["BASE", "AdapterBank", "BankApply", "BankTarget", "apply", "bank_delta", "clear", "overlay", "put", "rows",
           "select", "stack", "take"]
