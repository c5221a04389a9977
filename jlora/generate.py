"""Jit-compiled KV-cache sampling for Hugging Face Flax causal LMs, with or without a LoRA adapter.

    from jlora.generate import generate
    tokens = generate(model, params, prompt_ids, prompt_mask=mask, max_new_tokens=32,
                      lora=lora, config=config)                           # adapter unmerged
    tokens = generate(model, jlora.merge(params, lora, config), prompt_ids, ...)  # merged: same tokens

Works with models that have HF Flax's ``init_cache`` / ``past_key_values`` API and one shared cache
index for the batch: ``FlaxLlamaForCausalLM``, :class:`jlora.hf.llama.FlaxLlamaForCausalLMFixed`,
``FlaxGPT2LMHeadModel``, ``FlaxMistralForCausalLM``, ``FlaxGemmaForCausalLM``. One prefill call over
the (left-padded) prompts fills the cache, then ``lax.while_loop`` decodes one token per step; the
whole sampler is one ``jax.jit`` function, compiled once per (model, LoRA config, shapes, settings).
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import LoraConfig
from jlora.qlayers import quantized_layers
from jlora.intercept import apply as lora_apply
from jlora.bank import AdapterBank, apply as bank_apply, rows as bank_rows, select as select_adapters

Tree = Any
_STATIC = ("max_new_tokens", "greedy", "eos", "pad", "return_logits")
BANKED = "adapter bank"  # the sampler's "config" when rows run through an adapter bank
_JITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {LoraConfig | None: jitted sampler}


def nucleus_filter(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """``logits`` (..., vocab) with every token outside the top-p nucleus set to ``-inf``.

    With ``p = softmax(logits)`` sorted descending, ``p_(1) >= p_(2) >= ...``, the token of rank ``k``
    is kept iff ``sum_{j<k} p_(j) < top_p``: the smallest set of most likely tokens whose mass is
    ``>= top_p``. The top token is always kept (``top_p > 0``); ``top_p >= 1`` keeps every token.
    Ties are ranked by token index.
    """
    order = jnp.argsort(-logits, axis=-1, stable=True)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive prefix sum: exactly 0 at rank 1
    keep_sorted = (mass_before < top_p) | (jnp.asarray(top_p) >= 1.0)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)  # back to vocab order
    return jnp.where(keep, logits, -jnp.inf)


def next_token(logits: jax.Array, *, greedy: bool, temperature: jax.Array | float = 1.0,
               top_p: jax.Array | float = 1.0, key: jax.Array | None = None) -> jax.Array:
    """One token per row of ``logits`` (batch, vocab) -> (batch,) int32.

    Greedy: ``argmax(logits)``. Otherwise a draw from ``softmax(nucleus_filter(logits / T, top_p))``.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, nucleus_filter(logits / temperature, top_p), axis=-1).astype(jnp.int32)


def _last_position_head(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """Interceptor: the LM head (an ``nn.Dense`` named ``lm_head``) sees only the last position.

    Installed outside ``jlora.apply``'s interceptor, so a LoRA / tied-head delta on the head sees the
    same sliced input. A model whose head has another name just computes all positions' logits.
    """
    module, x = context.module, args[0] if args else None
    if (context.method_name == "__call__" and isinstance(module, nn.Dense) and module.name == "lm_head"
            and x is not None and x.ndim >= 3 and x.shape[-2] > 1):
        args = (x[..., -1:, :], *args[1:])
    return next_fun(*args, **kwargs)


def _forward(model: Any, config: LoraConfig | None, params: Tree, lora: Tree | None, ids: jax.Array,
             mask: jax.Array, positions: jax.Array, cache: Tree) -> tuple[jax.Array, Tree]:
    """One cached model call on ``ids`` (batch, t) -> (float32 logits of the last position (batch, vocab), cache).

    ``lora``: an adapter tree (with ``config``), or a ``(bank, adapter_ids)`` pair (``config`` is
    ``BANKED``): each row through its own adapter of the :class:`jlora.bank.AdapterBank`.

    ``mask`` (batch, cache_len): 1 on real tokens (prompt and generated), 0 on left padding;
    ``positions`` (batch, t): the position ids of ``ids``.
    """
    kwargs = dict(attention_mask=mask, position_ids=positions, past_key_values=cache, return_dict=True)
    with nn.intercept_methods(_last_position_head):  # flax calls the outermost interceptor first
        if lora is None:
            with quantized_layers():  # a quantized base (jlora.apply installs it itself, innermost)
                out = model(ids, params=params, **kwargs)
        elif config is BANKED:
            bank, adapter_ids = lora
            out = bank_apply(model)(params, bank, adapter_ids, ids, **kwargs)
        else:
            out = lora_apply(model, config)(params, lora, ids, **kwargs)
    return out.logits[:, -1, :].astype(jnp.float32), out.past_key_values


def _empty_cache(model: Any, batch: int, length: int) -> Tree:
    """``model.init_cache(batch, length)`` without running the model: its zeros (cache_index 0), from shapes."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _sample(model_ref: weakref.ref, config: LoraConfig | None, params: Tree, lora: Tree | None,
            prompt_ids: jax.Array, prompt_mask: jax.Array, temperature: jax.Array, top_p: jax.Array,
            rng: jax.Array | None, *, max_new_tokens: int, greedy: bool, eos: tuple[int, ...], pad: int,
            return_logits: bool) -> tuple[jax.Array, jax.Array | None]:
    """The traced sampler: prefill, then ``lax.while_loop`` over the remaining ``max_new_tokens - 1`` steps.

    Returns tokens (batch, max_new_tokens) and, if ``return_logits``, the float32 logits each token
    was chosen from (batch, max_new_tokens, vocab; zeros for steps skipped after every row finished).
    """
    model = model_ref()
    if config is BANKED:  # each row's factors gathered once, not at every decode step
        bank, adapter_ids = lora
        lora = (bank_rows(bank, adapter_ids), None)
    forward = functools.partial(_forward, model, config, params, lora)
    batch, prompt_len = prompt_ids.shape
    mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)  # as HF's prepare_inputs_for_generation
    cache = _empty_cache(model, batch, prompt_len + max_new_tokens)
    logits, cache = forward(prompt_ids, mask, positions, cache)

    def choose(i, logits, done):
        key = None if greedy else jax.random.fold_in(rng, i)
        token = next_token(logits, greedy=greedy, temperature=temperature, top_p=top_p, key=key)
        if eos:
            token = jnp.where(done, pad, token)
            done = done | jnp.isin(token, jnp.asarray(eos, jnp.int32))
        return token, done

    def record(out, all_logits, i, token, logits):
        out = out.at[:, i].set(token)
        if return_logits:
            all_logits = all_logits.at[:, i].set(logits)
        return out, all_logits

    token, done = choose(0, logits, jnp.zeros((batch,), bool))
    out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    all_logits = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), jnp.float32) if return_logits else None
    out, all_logits = record(out, all_logits, 0, token, logits)

    def cond(state):
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done) if eos else i < max_new_tokens

    def body(state):
        i, cache, token, position, done, out, all_logits = state
        logits, cache = forward(token[:, None], mask, position, cache)
        token, done = choose(i, logits, done)
        out, all_logits = record(out, all_logits, i, token, logits)
        return i + 1, cache, token, position + 1, done, out, all_logits

    state = (jnp.int32(1), cache, token, positions[:, -1:] + 1, done, out, all_logits)
    *_, out, all_logits = jax.lax.while_loop(cond, body, state)
    return out, all_logits


def _compiled(model: Any, config: LoraConfig | None) -> Callable:
    """The jitted sampler of ``model`` (and LoRA ``config``), made once; jit caches it per shapes / settings.

    Held weakly per model: dropping the model drops its compiled samplers.
    """
    per_model = _JITTED.setdefault(model, {})
    if config not in per_model:
        per_model[config] = jax.jit(functools.partial(_sample, weakref.ref(model), config), static_argnames=_STATIC)
    return per_model[config]


def _check_prompt(model: Any, prompt_ids: Any, prompt_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_ids, prompt_mask) as int32 numpy arrays (batch, prompt_len), or a ValueError naming the bad one."""
    ids = np.asarray(prompt_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or 0 in ids.shape:
        raise ValueError(f"generate: prompt_ids must be a non-empty 2-D integer array (batch, prompt_len), got "
                         f"shape {ids.shape} dtype {ids.dtype}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"generate: prompt_ids must lie in [0, vocab_size={vocab}), got values in "
                         f"[{ids.min()}, {ids.max()}]")
    mask = np.ones(ids.shape, np.int32) if prompt_mask is None else np.asarray(prompt_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"generate: prompt_mask must have prompt_ids' shape {ids.shape}, got {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("generate: prompt_mask must hold only 0 (padding) and 1 (token)")
    if (np.diff(mask.astype(np.int32), axis=1) < 0).any() or not mask[:, -1].all():
        raise ValueError("generate: prompt_mask must be LEFT-padded (each row 0...0 1...1, ending in a token); "
                         "pad prompts on the left")
    return ids.astype(np.int32), mask.astype(np.int32)


def _check_settings(model: Any, prompt_len: int, max_new_tokens: Any, temperature: float, top_p: float,
                    rng: Any, lora: Any, config: Any) -> None:
    """ValueError naming the parameter for each invalid setting."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(f"generate: prompt_len ({prompt_len}) + max_new_tokens ({max_new_tokens}) = "
                         f"{prompt_len + max_new_tokens} exceeds model.config.max_position_embeddings ({limit})")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p!r}")
    if temperature > 0 and rng is None:
        raise ValueError("generate: rng (a jax.random key) is required when temperature > 0")
    if rng is not None and not (isinstance(rng, jax.Array) and (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
                                                               or (rng.dtype == jnp.uint32 and rng.shape == (2,)))):
        raise ValueError(f"generate: rng must be a jax.random key (jax.random.key(0) or PRNGKey(0)), got {rng!r:.60}")
    if lora is not None and not isinstance(config, LoraConfig):
        raise ValueError("generate: lora was given without config (the LoraConfig the adapter was made with)")


def _banked(bank: Any, adapter_ids: Any, lora: Any, batch: int) -> tuple[AdapterBank, jax.Array]:
    """``(bank, adapter_ids)`` checked: a bank, one id per prompt row, and no ``lora`` beside them."""
    if not isinstance(bank, AdapterBank):
        raise ValueError(f"generate: adapter_ids needs bank=, a jlora.bank.AdapterBank (jlora.bank.stack), got "
                         f"{type(bank).__name__}")
    if lora is not None:
        raise ValueError("generate: give either lora= (one adapter for every row) or bank= with adapter_ids=, not both")
    if adapter_ids is None:
        raise ValueError("generate: bank= needs adapter_ids=, one adapter id per prompt row (-1: the base model)")
    ids = select_adapters(bank, adapter_ids)
    if ids.shape != (batch,):
        raise ValueError(f"generate: adapter_ids must hold one id per prompt row, shape ({batch},), got {ids.shape}")
    return bank, ids


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if isinstance(eos_token_id, (int, np.integer)) else tuple(eos_token_id)
    return tuple(int(i) for i in ids)


def generate(model: Any, params: Tree, prompt_ids: Any, *, max_new_tokens: int, lora: Tree | None = None,
             config: LoraConfig | None = None, prompt_mask: Any = None, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None,
             eos_token_id: int | Sequence[int] | str | None = "config",
             pad_token_id: int | None = None, return_logits: bool = False, bank: AdapterBank | None = None,
             adapter_ids: Any = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Sample ``max_new_tokens`` tokens after each prompt with a KV cache, in one jitted function.

    Args:
      model: an HF Flax causal LM with ``init_cache`` (Llama, jlora's FlaxLlamaForCausalLMFixed, GPT-2,
        Mistral, Gemma).
      params: its params dict (e.g. ``model.params``, or ``jlora.merge(params, lora, config)``).
      prompt_ids: (batch, prompt_len) integer token ids, LEFT-padded.
      max_new_tokens: N >= 1; ``prompt_len + N <= model.config.max_position_embeddings``.
      lora, config: an adapter tree (``jlora.init`` / ``jlora.split``) and its LoraConfig; the model
        runs through ``jlora.apply(model, config)``, adapters unmerged. ``config`` without ``lora``
        is ignored.
      prompt_mask: (batch, prompt_len) 1 on tokens, 0 on the left padding (default all ones); position
        ids are ``max(cumsum(prompt_mask) - 1, 0)``, then +1 per generated token.
      temperature: 0 = greedy (argmax). T > 0 samples from ``softmax(logits / T)`` restricted to the
        top-p nucleus (:func:`nucleus_filter`); then ``rng`` is required (step i uses ``fold_in(rng, i)``).
      top_p: nucleus mass in (0, 1]; 1 keeps every token.
      eos_token_id: an id (or ids); a row that emitted one emits ``pad_token_id`` (default: the first
        eos id) afterwards, and the loop stops once every row has. Default ``"config"``: the model's
        ``config.eos_token_id``, as transformers' ``generate`` does; None: always N steps.
      return_logits: also return the float32 logits each token was chosen from (batch, N, vocab).
      bank, adapter_ids: an :class:`jlora.bank.AdapterBank` and one id per row (``-1``: the base):
        row ``b`` runs through adapter ``adapter_ids[b]``, all rows in one batch, unmerged (instead
        of ``lora``/``config``). Swapping adapters in a bank of the same shapes does not recompile.

    Returns:
      tokens (batch, N) int32 (and the logits if ``return_logits``).

    Memory: the cache holds ``prompt_len + N`` positions; the LM head (an ``nn.Dense`` named
    ``lm_head``, as in these families) is applied to the last position only, also in the prefill.

    Compiled once per model, LoRA config, input shapes, N, greedy-or-not, eos/pad ids and
    ``return_logits``; temperature, top_p, params, lora, prompts and rng are traced.
    """
    if not hasattr(model, "init_cache"):
        raise ValueError(f"generate: model must be an HF Flax causal LM with init_cache, got {type(model).__name__}")
    ids, mask = _check_prompt(model, prompt_ids, prompt_mask)
    temperature, top_p = float(temperature), float(top_p)
    banked = bank is not None or adapter_ids is not None
    if banked:
        lora = _banked(bank, adapter_ids, lora, ids.shape[0])
    _check_settings(model, ids.shape[1], max_new_tokens, temperature, top_p, rng, None if banked else lora, config)
    config = BANKED if banked else config
    eos = _eos_ids(getattr(model.config, "eos_token_id", None) if eos_token_id == "config" else eos_token_id)
    pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)
    greedy = temperature == 0.0
    sampler = _compiled(model, config if lora is not None else None)
    tokens, logits = sampler(params, lora, ids, mask, jnp.float32(temperature if not greedy else 1.0),
                             jnp.float32(top_p), None if greedy else rng, max_new_tokens=int(max_new_tokens),
                             greedy=greedy, eos=eos, pad=pad, return_logits=return_logits)
    return (tokens, logits) if return_logits else tokens
