"""Llama-architecture checkpoints from GGUF files, and a FlaxLlama that honours two config fields.

transformers 4.57's ``FlaxLlamaForCausalLM`` ignores ``rope_theta`` (its sinusoids use 10000) and
``tie_word_embeddings`` (it always has its own ``lm_head``). :class:`FlaxLlamaForCausalLMFixed`
is the same model with both honoured: rotary embeddings recomputed with the config's base, and,
when tied, an ``lm_head`` kernel derived from the input embedding at every call (so the params
tree has no ``lm_head``, as in PyTorch's tied checkpoints, and adapters on the embedding act on
both ends). It also takes ``segment_ids`` for packed rows (several examples in one row): token
``q`` attends to token ``k`` only when ``k <= q`` and both belong to the same example
(``segment_ids[b, q] == segment_ids[b, k]``), so packing changes no example's logits.

GGUF (llama.cpp's format) stores Llama's q/k projections with rows permuted for its rotary
layout; :func:`load_gguf_llama` dequantizes every tensor with the ``gguf`` package, undoes that
permutation (as llama.cpp's converter and transformers' GGUF loader do) and maps the names, with
no torch and no hub. With ``quantized=True`` the blocks' Q4_0/Q4_1/Q8_0 projection kernels stay
quantized instead (:class:`jlora.qformats.GGMLKernel` leaves, :mod:`jlora.hf.gguf_quant`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.attention import dot_product_attention_weights
from transformers import FlaxLlamaForCausalLM, LlamaConfig
from transformers.models.llama import modeling_flax_llama

from jlora.hf.gguf_quant import ggml_kernel, is_float_type, permute_fan_out
from jlora.hf.names import GGUF_NAMES
from jlora.tree import unflatten



def _rotary_with_theta(theta: float):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, modeling_flax_llama.FlaxLlamaRotaryEmbedding) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        key, query, position_ids = args
        head_dim = module.config.hidden_size // module.config.num_attention_heads
        inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
        freqs = jnp.asarray(position_ids, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
        emb = jnp.concatenate((freqs, freqs), axis=-1)[:, :, None, :]
        sin, cos = jnp.sin(emb), jnp.cos(emb)
        rotate = modeling_flax_llama.apply_rotary_pos_emb
        return (jnp.asarray(rotate(key, sin, cos), module.dtype), jnp.asarray(rotate(query, sin, cos), module.dtype))
    return intercept


def _segment_attention(segment_ids: Any):
    """Intercept ``FlaxLlamaAttention.__call__`` with the same computation under a block-diagonal
    causal mask: ``mask[b, q, k] = (k <= q) & (seg[b, q] == seg[b, k]) & attention_mask[b, k]``
    (``segment_ids`` ``(batch, seq)``; the q/k/v/o projections and the rotary embedding are the
    module's own calls, so LoRA interceptors and the rotary fix still see them)."""
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, modeling_flax_llama.FlaxLlamaAttention) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        names = ("hidden_states", "attention_mask", "position_ids", "deterministic", "init_cache", "output_attentions")
        bound = {**dict(zip(names, args)), **kwargs}
        hidden, padding = bound["hidden_states"], bound["attention_mask"]
        if bound.get("init_cache") or module.has_variable("cache", "cached_key"):
            raise ValueError("segment_ids: packed rows are for training and scoring, not for KV-cache decoding")
        query = module._split_heads(module.q_proj(hidden), module.num_heads)
        key = module._split_heads(module.k_proj(hidden), module.num_key_value_heads)
        value = module._split_heads(module.v_proj(hidden), module.num_key_value_heads)
        key, query = module.rotary_emb(key, query, bound["position_ids"])
        length = hidden.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = (causal[None] & same & (padding[:, None, :] > 0))[:, None]  # (batch, 1, q, k)
        key = jnp.repeat(key, module.num_key_value_groups, axis=2)
        value = jnp.repeat(value, module.num_key_value_groups, axis=2)
        bias = jnp.where(mask, 0.0, jnp.finfo(module.dtype).min).astype(module.dtype)
        deterministic = bound.get("deterministic", True)
        rate = module.config.attention_dropout
        weights = dot_product_attention_weights(
            query, key, bias=bias, dropout_rng=None if deterministic or rate == 0 else module.make_rng("dropout"),
            dropout_rate=rate, deterministic=deterministic,
            dtype=jnp.float32 if module.attention_softmax_in_fp32 else module.dtype).astype(module.dtype)
        out = module.o_proj(module._merge_heads(jnp.einsum("...hqk,...khd->...qhd", weights, value)))
        return (out, weights) if bound.get("output_attentions") else (out,)
    return intercept


class FlaxLlamaForCausalLMFixed(FlaxLlamaForCausalLM):
    """``FlaxLlamaForCausalLM`` honouring ``config.rope_theta`` and ``config.tie_word_embeddings``."""

    def init_weights(self, rng: Any, input_shape: tuple, params: Any = None) -> Any:
        """As the parent's, without an ``lm_head`` when tied (the head is the embedding, as in PyTorch)."""
        out = super().init_weights(rng, input_shape, params)
        if self.config.tie_word_embeddings and params is None and "lm_head" in out:
            out = {k: v for k, v in out.items() if k != "lm_head"}
        return out

    def __call__(self, *args: Any, params: dict | None = None, segment_ids: Any = None, **kwargs: Any) -> Any:
        """As the parent's; ``segment_ids`` ``(batch, seq)`` (packed rows: 1, 2, ... per example, 0 on
        padding) keeps examples apart in attention. Pass ``position_ids`` restarting per example too."""
        params = self.params if params is None else params
        if self.config.tie_word_embeddings:
            embedding = params["model"]["embed_tokens"]["embedding"]
            params = {**params, "lm_head": {"kernel": embedding.T}}
        with contextlib.ExitStack() as stack:
            stack.enter_context(nn.intercept_methods(_rotary_with_theta(float(self.config.rope_theta))))
            if segment_ids is not None:
                segment_ids = jnp.asarray(segment_ids)
                ids = args[0] if args else kwargs.get("input_ids")
                if ids is not None and segment_ids.shape != jnp.shape(ids):
                    raise ValueError(f"segment_ids: expected the shape of input_ids {jnp.shape(ids)}, "
                                     f"got {segment_ids.shape}")
                stack.enter_context(nn.intercept_methods(_segment_attention(segment_ids)))
            return super().__call__(*args, params=params, **kwargs)


class _PositionalDecoderLayer(modeling_flax_llama.FlaxLlamaDecoderLayer):
    """The decoder layer with its flags positional, so that ``nn.remat`` can hold them static."""

    def __call__(self, hidden_states, attention_mask=None, position_ids=None, deterministic=True, init_cache=False,
                 output_attentions=False):
        return super().__call__(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                deterministic=deterministic, init_cache=init_cache, output_attentions=output_attentions)


class _RematLayerCollection(modeling_flax_llama.FlaxLlamaLayerCollection):
    """The layer stack with each decoder layer under ``nn.remat``: its activations are recomputed in
    the backward pass instead of kept (params and paths unchanged: ``model/layers/<i>/...``)."""

    def setup(self):
        layer = nn.remat(_PositionalDecoderLayer, static_argnums=(4, 5, 6))  # deterministic, init_cache, output_attentions
        self.blocks = [layer(self.config, dtype=self.dtype, name=str(i)) for i in range(self.config.num_hidden_layers)]

    def __call__(self, hidden_states, attention_mask=None, position_ids=None, deterministic: bool = True,
                 init_cache: bool = False, output_attentions: bool = False, output_hidden_states: bool = False,
                 return_dict: bool = False):
        all_attentions = () if output_attentions else None
        all_hidden_states = () if output_hidden_states else None
        for block in self.blocks:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            outputs = block(hidden_states, attention_mask, position_ids, deterministic, init_cache, output_attentions)
            hidden_states = outputs[0]
            if output_attentions:
                all_attentions += (outputs[1],)
        return hidden_states, all_hidden_states, all_attentions


class _RematModel(modeling_flax_llama.FlaxLlamaModule):
    def setup(self):  # the parent's, with the remat layer stack (flax refuses a submodule name set twice)
        init = jax.nn.initializers.normal(stddev=self.config.initializer_range)
        self.hidden_size = self.config.hidden_size
        self.embed_tokens = nn.Embed(self.config.vocab_size, self.hidden_size, embedding_init=init, dtype=self.dtype)
        self.layers = _RematLayerCollection(self.config, dtype=self.dtype)
        self.norm = modeling_flax_llama.FlaxLlamaRMSNorm(self.config, dtype=self.dtype)


class _RematCausalLM(modeling_flax_llama.FlaxLlamaForCausalLMModule):
    def setup(self):
        init = jax.nn.initializers.normal(stddev=self.config.initializer_range)
        self.model = _RematModel(self.config, dtype=self.dtype)
        self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype, kernel_init=init)


class FlaxLlamaForCausalLMRemat(FlaxLlamaForCausalLMFixed):
    """:class:`FlaxLlamaForCausalLMFixed` with per-layer rematerialization (gradient checkpointing):
    the same params, outputs and gradients; a decoder layer's activations are recomputed in the
    backward pass, so one layer's are live at a time instead of all of them."""

    module_class = _RematCausalLM


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF file lacks the metadata field {key!r}")
        return default
    return field.parts[field.data[0]][0].item()


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k projection (rows = heads * head_dim)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


def open_gguf(path: Any) -> Any:
    """A ``gguf.GGUFReader`` of ``path``, or ``path`` itself if it is one already (parsing a file's
    metadata takes ~2 s for SmolLM2's 49k-token vocabulary: open it once, pass the reader around)."""
    import gguf
    return path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(str(path))


def read_gguf_llama(path: str | os.PathLike | Any, *, max_position_embeddings: int | None = None,
                    quantized: bool = False) -> tuple[LlamaConfig, dict[str, Any]]:
    """``(LlamaConfig, Flax params)`` from a Llama GGUF file (or an open ``gguf.GGUFReader``), dequantized
    to float32.

    ``quantized=True`` keeps every ``blk.*`` projection kernel stored as Q4_0/Q4_1/Q8_0 as a
    :class:`~jlora.qformats.GGMLKernel` (its file bytes, transposed; compute over it under
    ``jlora.quantized_layers()``, which ``jlora.apply`` installs); float tensors, norms, the
    embedding (also the tied head) and ``output.weight`` stay float32. Another block type in a
    projection (e.g. Q6_K) then raises ValueError.
    """
    import gguf

    reader = open_gguf(path)
    path = reader.data.filename if path is reader else path
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    heads, kv_heads = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    tensors = {t.name: t for t in reader.tensors}
    vocab, hidden = tensors["token_embd.weight"].shape[1], tensors["token_embd.weight"].shape[0]
    context = _field(reader, "llama.context_length")
    config = LlamaConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_hidden_layers=_field(reader, "llama.block_count"), num_attention_heads=heads,
        num_key_value_heads=kv_heads, rms_norm_eps=_field(reader, "llama.attention.layer_norm_rms_epsilon"),
        rope_theta=_field(reader, "llama.rope.freq_base", 10000.0),
        max_position_embeddings=min(context, max_position_embeddings or context),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", 1),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", 2),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", 2))
    flat: dict[tuple[str, ...], Any] = {}  # float32 arrays and GGMLKernels
    for name, tensor in tensors.items():
        parts = name.split(".")
        rotary_heads = {"attn_q": heads, "attn_k": kv_heads}.get(parts[2]) if parts[0] == "blk" else None
        if quantized and parts[0] == "blk" and len(tensor.shape) == 2 and not is_float_type(tensor.tensor_type):
            kernel = ggml_kernel(tensor.data, tensor.tensor_type, tensor.shape, name=name)
            if rotary_heads:  # the rows' permutation = the kernel's columns'
                kernel = permute_fan_out(kernel, _unpermute(np.arange(kernel.shape[-1]), rotary_heads))
            flat[("model", "layers", parts[1], *GGUF_NAMES[parts[2]].split("."), "kernel")] = kernel
            continue
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weight = weight.reshape(tuple(int(d) for d in reversed(tensor.shape)))  # torch layout (out, in)
        if parts[0] == "blk":
            if rotary_heads:
                weight = _unpermute(weight, rotary_heads)
            module = ("model", "layers", parts[1], *GGUF_NAMES[parts[2]].split("."))
        else:
            module = {"token_embd": ("model", "embed_tokens"), "output_norm": ("model", "norm"),
                      "output": ("lm_head",)}[parts[0]]
        if module[-1] == "embed_tokens":
            flat[(*module, "embedding")] = weight
        elif weight.ndim == 2:
            flat[(*module, "kernel")] = np.ascontiguousarray(weight.T)
        else:
            flat[(*module, "weight")] = weight
    return config, unflatten(flat)


def load_gguf_llama(path: str | os.PathLike | Any, *, max_position_embeddings: int | None = 2048,
                    dtype: Any = jnp.float32, remat: bool = False, quantized: bool = False
                    ) -> tuple[FlaxLlamaForCausalLMFixed, dict[str, Any]]:
    """A ready :class:`FlaxLlamaForCausalLMFixed` and its params from a GGUF file.

    ``max_position_embeddings`` caps the context (FlaxLlama builds a max_pos² causal mask);
    ``dtype`` is the computation dtype (params stay float32); ``remat`` recomputes each layer's
    activations in the backward pass (:class:`FlaxLlamaForCausalLMRemat`); ``quantized`` keeps the
    projection kernels quantized (:func:`read_gguf_llama`).
    """
    config, params = read_gguf_llama(path, max_position_embeddings=max_position_embeddings, quantized=quantized)
    model = (FlaxLlamaForCausalLMRemat if remat else FlaxLlamaForCausalLMFixed)(config, dtype=dtype, _do_init=False)
    return model, params


def _strings(reader: Any, key: str) -> list[str]:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"GGUF file lacks the tokenizer field {key!r}")
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def read_gguf_tokenizer(path: str | os.PathLike | Any) -> Any:
    """The byte-level BPE tokenizer stored in a GGUF file (or an open ``gguf.GGUFReader``;
    ``tokenizer.ggml.model == "gpt2"``), as a
    ``transformers.PreTrainedTokenizerFast`` (no torch; ``save_pretrained`` writes tokenizer.json).

    Control tokens (type 3, e.g. ``<|im_start|>``) become special tokens; digits are split one by
    one before byte-level BPE, as SmolLM2's own tokenizer does (GGUF pre-tokenizer ``smollm``); the
    file's ``tokenizer.chat_template``, when it has one, becomes the tokenizer's chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = open_gguf(path)
    path = reader.data.filename if path is reader else path
    kind = bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode()
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _strings(reader, "tokenizer.ggml.merges")]
    types = reader.fields["tokenizer.ggml.token_type"]
    special = [tokens[i] for i, t in enumerate(int(types.parts[j][0]) for j in types.data) if t == 3]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    fast.add_special_tokens({"additional_special_tokens": special})
    ids = {name: _field(reader, f"tokenizer.ggml.{name}_token_id", -1) for name in ("bos", "eos", "padding")}
    fast.bos_token, fast.eos_token = tokens[ids["bos"]], tokens[ids["eos"]]
    if ids["padding"] >= 0:
        fast.pad_token = tokens[ids["padding"]]
    template = reader.fields.get("tokenizer.chat_template")
    if template is not None:  # the model's own chat format (SmolLM2-Instruct: <|im_start|>role ... <|im_end|>)
        fast.chat_template = bytes(template.parts[-1]).decode("utf-8")
    return fast
