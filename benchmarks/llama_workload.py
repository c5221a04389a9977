"""Llama-style causal-LM workload for ``compare_peft.py``: a Flax linen Llama, its jlora-LoRA and
full train steps, the same model in PyTorch transformers (+ PEFT), and analytic FLOPs for MFU.

The model is written here (transformers 5 has no Flax models). Shapes, with B batch, T = S
sequence, d model width, H query heads, K key/value heads, h = d / H head width, F MLP width, V vocab::

    x = embed_tokens[ids]                                     (B, T, d)
    per layer (nn.scan over a leading layer axis of every param; optional nn.remat per layer):
      a = RMSNorm(x);  q = a Wq (B,T,H,h);  k = a Wk, v = a Wv (B,T,K,h)   (GQA: K divides H)
      q, k = q cos + rotate_half(q) sin, likewise k                       (HF's RoPE, theta)
      x = x + Wo softmax(q k^T / sqrt(h) + causal mask) v                 (jax.nn.dot_product_attention)
      x = x + W_down (silu(W_gate RMSNorm(x)) * W_up RMSNorm(x))          (SwiGLU, width F)
    logits = lm_head(RMSNorm(x)) in float32                    (B, T, V), untied from the embedding
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back (as HF)

Params and matmuls use ``dtype`` (bfloat16 on GPU); logits, softmax and loss are float32. Module and
param names follow HF's LlamaForCausalLM, so :func:`to_torch_state_dict` is a renaming + transpose.
"""
from __future__ import annotations

import gc
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from timing import median_seconds, time_inference, time_train_step

LLAMA_WORKLOADS = {  # llama-1b: TinyLlama-1.1B's shape
    "llama-1b": dict(d=2048, layers=22, heads=32, kv_heads=4, mlp=5632, vocab=32000, rope_theta=10000.0,
                     eps=1e-5, batch=4, seq=2048, remat=True),
    "llama-tiny": dict(d=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=512, rope_theta=10000.0,
                       eps=1e-5, batch=2, seq=32, remat=False)}
LLAMA_INFERENCE_SHAPES = {"llama-1b": ((1, 128), (4, 2048)), "llama-tiny": ((1, 32), (2, 64))}
RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # dense, FLOP/s
MODEL_KEYS = ("d", "layers", "heads", "kv_heads", "mlp", "vocab", "rope_theta", "eps", "remat")


def rope_tables(seq: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """HF's default RoPE: ``cos, sin`` of ``t * theta^(-2i/h)``, halves repeated: float32 ``(seq, h)``."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * normed.astype(x.dtype)


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=dtype,
                    kernel_init=nn.initializers.normal(0.02), name=name)


class DecoderLayer(nn.Module):
    """One Llama block, ``(x (B, T, d), cos, sin) -> (x, None)`` so that ``nn.scan`` can stack it."""
    heads: int
    kv_heads: int
    mlp: int
    eps: float
    dtype: Any
    attention: str | None = None  # jax.nn.dot_product_attention's implementation: None (JAX's: xla), cudnn

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, None]:
        (b, t, d), hd, dt = x.shape, x.shape[-1] // self.heads, self.dtype
        a = RMSNorm(self.eps, dt, name="input_layernorm")(x)
        q = _dense(self.heads * hd, "q_proj", dt)(a).reshape(b, t, self.heads, hd)
        k = _dense(self.kv_heads * hd, "k_proj", dt)(a).reshape(b, t, self.kv_heads, hd)
        v = _dense(self.kv_heads * hd, "v_proj", dt)(a).reshape(b, t, self.kv_heads, hd)
        c, s = cos[None, :, None, :].astype(dt), sin[None, :, None, :].astype(dt)
        q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attention)
        x = x + _dense(d, "o_proj", dt)(o.reshape(b, t, self.heads * hd))
        m = RMSNorm(self.eps, dt, name="post_attention_layernorm")(x)
        up = nn.silu(_dense(self.mlp, "gate_proj", dt)(m)) * _dense(self.mlp, "up_proj", dt)(m)
        return x + _dense(d, "down_proj", dt)(up), None


class LlamaLM(nn.Module):
    """``ids (B, T) int32 -> logits (B, T, vocab) float32``; the layers' params are stacked (scan)."""
    d: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    rope_theta: float = 10000.0
    eps: float = 1e-5
    remat: bool = False
    dtype: Any = jnp.float32
    attention: str | None = None
    unroll: bool = False  # unrolled scan: no while loop, so that XLA's cost analysis sees every layer

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, self.d, dtype=self.dtype, param_dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02), name="embed_tokens")(ids)
        cos, sin = rope_tables(ids.shape[1], self.d // self.heads, self.rope_theta)
        layer = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=self.layers,
                        unroll=self.layers if self.unroll else 1)
        x, _ = stack(self.heads, self.kv_heads, self.mlp, self.eps, self.dtype, self.attention, name="layers")(
            x, cos, sin)
        x = RMSNorm(self.eps, self.dtype, name="norm")(x)
        return _dense(self.vocab, "lm_head", self.dtype)(x).astype(jnp.float32)


def make_model(spec: dict, dtype: Any = jnp.float32, attention: str | None = None, unroll: bool = False) -> LlamaLM:
    return LlamaLM(**{k: spec[k] for k in MODEL_KEYS}, dtype=jnp.dtype(dtype), attention=attention, unroll=unroll)


def to_torch_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Flax params -> HF LlamaForCausalLM state dict (float32 numpy): unstack layers, transpose kernels."""
    sub = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn."),
           **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "mlp.")}
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params["params"]):
        (*names, kind), x = [p.key for p in path], np.asarray(leaf, np.float32)
        x = np.swapaxes(x, -1, -2) if kind == "kernel" else x
        if names[0] == "layers":
            out.update({f"model.layers.{i}.{sub.get(names[1], '')}{names[1]}.weight": x[i] for i in range(len(x))})
        else:
            out[f"{'' if names[0] == 'lm_head' else 'model.'}{names[0]}.weight"] = x
    return out


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (float32), HF's ``labels=ids`` loss."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def param_counts(spec: dict) -> dict[str, int]:
    """``matmul``: weights that multiply activations (all projections + lm_head, not the embedding
    lookup or norms); ``total``; ``lora``: adapter params of r=RANK on q_proj, v_proj."""
    d, hd, L = spec["d"], spec["d"] // spec["heads"], spec["layers"]
    q, kv = spec["heads"] * hd, spec["kv_heads"] * hd
    matmul = L * (2 * d * q + 2 * d * kv + 3 * d * spec["mlp"]) + d * spec["vocab"]
    return {"matmul": matmul, "total": matmul + spec["vocab"] * d + (2 * L + 1) * d,
            "lora": L * RANK * ((d + q) + (d + kv))}


def model_flops_per_step(spec: dict, variant: str) -> float:
    """Analytic training FLOPs of one step (model FLOPs: remat recomputation is not counted).

    With N = ``param_counts()["matmul"]``, tokens = B*T, attention term (PaLM, Chowdhery et al. 2022,
    appendix B: the full T x T score and value matmuls, the causal half not subtracted)
    A = 12 * L * H*h * T * tokens (forward 4, backward 8):
      full:  6 N tokens + A                       (forward 2N, backward dX 2N + dW 2N)
      LoRA:  4 N tokens + 6 N_lora tokens + A     (forward 2N, backward dX 2N, no dW of frozen kernels)
    """
    counts, tokens = param_counts(spec), spec["batch"] * spec["seq"]
    attn = 12 * spec["layers"] * spec["d"] * spec["seq"] * tokens
    if variant.endswith("full"):
        return 6 * counts["matmul"] * tokens + attn
    return 4 * counts["matmul"] * tokens + 6 * counts["lora"] * tokens + attn


def peak_flops(device_kind: str, dtype: Any) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (None: unknown device, or not bf16)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return None
    return next((peak for name, peak in PEAK_BF16 if name in device_kind), None)


def mfu(flops: float | None, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops / seconds / peak`` (None without a peak or FLOP count)."""
    return None if not flops or not peak or seconds <= 0 else flops / seconds / peak


def _xla_flops(stage: Any) -> float | None:
    cost = stage.cost_analysis()  # of a Lowered or Compiled: a dict, or a list of one dict in older jax
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def resolve_attention(attention: str | None, spec: dict, dtype: Any) -> str | None:
    """``"auto"``: cuDNN flash attention on a GPU in bf16/fp16 if it compiles and runs there (JAX's own
    default, ``None``, is XLA's attention, which forms the T x T scores), else ``None``."""
    if attention != "auto":
        return attention
    if jax.devices()[0].platform != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return None
    b, t, h = spec["batch"], spec["seq"], spec["d"] // spec["heads"]
    q, kv = jnp.zeros((b, t, spec["heads"], h), dtype), jnp.zeros((b, t, spec["kv_heads"], h), dtype)
    loss = lambda *a: jax.nn.dot_product_attention(*a, is_causal=True, implementation="cudnn").sum()  # noqa: E731
    try:
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv))
        return "cudnn"
    except Exception as err:  # noqa: BLE001 (any failure: fall back to XLA's attention)
        print(f"cuDNN attention unavailable here ({type(err).__name__}: {str(err)[:200]}); using XLA's")
        return None


def lora_setup(model: LlamaLM, params: dict, ids: Any) -> tuple[jlora.LoraConfig, dict]:
    """r=RANK, alpha=ALPHA adapters on q_proj, v_proj, float32 (as PEFT's autocast_adapter_dtype)."""
    config = jlora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    layouts = jlora.find_layouts(model.apply, params, ids)  # stacked (layers, d, r) adapters
    return config, jlora.init(jax.random.key(1), params, config, layouts=layouts, dtype=jnp.float32)


QUANTIZED = r"(q|k|v|o|gate|up|down)_proj$"  # QLoRA: every projection of the (scanned) layers


def quantized_base(model: LlamaLM, frozen: dict, ids: Any, fmt: str) -> dict:
    """``frozen`` with every projection kernel quantized (``fmt``: nf4 / int8), dequantized in the
    kernels' own dtype; the stacked ``(layers, fan_in, fan_out)`` layout read off the model."""
    layouts = jlora.find_layouts(model.apply, frozen, ids)
    return jlora.quantize(frozen, fmt, include=[QUANTIZED], layouts=layouts)


def train_steps(model: LlamaLM, params: dict, ids: Any, quantize: str | None = None) -> dict[str, tuple]:
    """``{variant: (step, state, tx, frozen)}`` with ``step(state, opt_state, ids, frozen)``; the frozen
    base is a step argument (closed over, XLA would bake it in as constants). With ``quantize``, also
    ``jlora_qlora``: the LoRA step over the base quantized by :func:`quantized_base`."""
    config, lora = lora_setup(model, params, ids)
    trainable, frozen = jlora.split(params, lora, config)
    f = jlora.apply(model.apply, config)
    tx_lora, tx_full = jlora.optimizer(optax.adamw(1e-4), config), optax.adamw(1e-4)

    def lora_step(t, o, ids, fz):
        loss, g = jax.value_and_grad(lambda t: lm_loss(f(fz, t, ids), ids))(t)
        u, o = tx_lora.update(g, o, t)
        return optax.apply_updates(t, u), o, loss

    def full_step(p, o, ids, _):
        loss, g = jax.value_and_grad(lambda p: lm_loss(model.apply(p, ids), ids))(p)
        u, o = tx_full.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
    steps = {"jlora_lora": (lora_step, trainable, tx_lora, frozen), "jlora_full": (full_step, params, tx_full, {})}
    if quantize:
        steps["jlora_qlora"] = (lora_step, trainable, tx_lora, quantized_base(model, frozen, ids, quantize))
    return steps


def lower_abstract(spec: dict, dtype: Any, variant: str, attention: str | None = None,
                   unroll: bool = False, quantize: str | None = None) -> Any:
    """The lowered train step of ``variant`` from shapes alone (no params are allocated);
    ``.compile().memory_analysis()`` gives XLA's memory plan without running it."""
    model = make_model(spec, dtype, attention, unroll)
    ids = jax.ShapeDtypeStruct((spec["batch"], spec["seq"]), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    if variant == "jlora_qlora":  # quantizing reads values: zeros of the shapes (what is measured is the plan)
        params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), params)
    step, state, tx, rest = train_steps(model, params, ids, quantize or "nf4" if variant == "jlora_qlora" else None)[
        variant]
    return jax.jit(step, donate_argnums=(0, 1)).lower(state, jax.eval_shape(tx.init, state), ids, rest)


def xla_step_flops(spec: dict, dtype: Any, variant: str, attention: str | None = None,
                   quantize: str | None = None) -> float | None:
    """XLA's cost-analysis FLOPs of a step. It visits a while loop's body once, so a scanned stack counts
    as one layer: this lowers unrolled 1- and 2-layer steps and takes f(1) + (L-1)(f(2) - f(1)). The HLO
    before optimisation is analysed (no compile; within 1% of the compiled step's count on CPU)."""
    counts = []
    for n in (1, 2):
        lowered = lower_abstract(dict(spec, layers=n), dtype, variant, attention, unroll=True, quantize=quantize)
        try:
            counts.append(_xla_flops(lowered))
        except Exception:  # noqa: BLE001 (a backend without pre-compile cost analysis)
            counts.append(_xla_flops(lowered.compile()))
    f1, f2 = counts
    return None if f1 is None or f2 is None else f1 + (spec["layers"] - 1) * (f2 - f1)


def measure_jax_llama(spec: dict, steps: int, dtype: Any = jnp.float32,
                      variants: tuple[str, ...] = ("jlora_lora", "jlora_full"), shapes: tuple = (),
                      attention: str | None = "auto", quantize: str | None = None) -> dict[str, Any]:
    """Compile and time the jlora-LoRA and full train steps (adamw, state and optimizer state donated);
    XLA memory and cost analysis (:func:`xla_step_flops`); inference latency at ``shapes``."""
    attention = resolve_attention(attention, spec, dtype)
    model = make_model(spec, dtype, attention)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, spec["vocab"], (spec["batch"], spec["seq"])), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids)
    built = train_steps(model, params, ids, quantize)
    out: dict[str, Any] = {"attention": attention or "default (xla)"}
    for name in (*variants, *(("jlora_qlora",) if quantize else ())):
        step, state, tx, rest = built[name]
        out[name] = {**time_train_step(step, state, tx.init(state), ids, rest, steps),
                     "xla_flops": xla_step_flops(spec, dtype, name, attention, quantize),
                     "device_peak_bytes": _device_peak_bytes()}  # cumulative over the process (GPU only)
    trainable, params = built["jlora_lora"][1], built["jlora_full"][1]
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    out["bytes"] = {"params": nbytes(params), "trainable": nbytes(trainable)}
    if not shapes:
        return out
    config, lora = lora_setup(model, params, ids)
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)  # non-zero lora_b: a real unmerged path
    base_fwd, lora_fwd = jax.jit(model.apply), jax.jit(jlora.apply(model.apply, config))
    out["inference"] = time_inference(base_fwd, lora_fwd, params, lora, config, shapes, steps)
    return out


def torch_llama_config(spec: dict) -> Any:
    """transformers' LlamaConfig of the same shape (SDPA attention, no dropout, untied head)."""
    import transformers as tf
    return tf.LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["d"], intermediate_size=spec["mlp"],
                          num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                          num_key_value_heads=spec["kv_heads"], max_position_embeddings=max(2048, spec["seq"]),
                          rms_norm_eps=spec["eps"], rope_theta=spec["rope_theta"], tie_word_embeddings=False,
                          attention_dropout=0.0, hidden_act="silu", attn_implementation="sdpa")


def measure_torch_llama(spec: dict, steps: int, device: str = "cpu", dtype: str = "float32",
                        variants: tuple[str, ...] = ("peft_lora", "torch_full"),
                        threads: int | None = None) -> dict[str, Any]:
    """PEFT LoRA (r=RANK, alpha=ALPHA on q_proj, v_proj) and full fine-tuning of the same Llama in
    PyTorch (AdamW, ``loss = model(ids, labels=ids).loss``); with ``spec["remat"]``, HF gradient
    checkpointing (non-reentrant), the counterpart of the per-layer remat on the JAX side."""
    import torch
    import transformers as tf
    from peft import LoraConfig as PeftConfig, get_peft_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    ids = torch.tensor(np.random.default_rng(0).integers(0, spec["vocab"], (spec["batch"], spec["seq"])),
                       device=device)
    out: dict[str, Any] = {}
    for name in variants:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.device(device):
            model = tf.LlamaForCausalLM(torch_llama_config(spec))
        model = model.to(device=device, dtype=getattr(torch, dtype)).train()
        if spec.get("remat"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if name == "peft_lora":
            model = get_peft_model(model, PeftConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        first, median = median_seconds(run, steps, sync=sync)
        out[name] = {"first_step_s": first, "step_s": median, "loss": float(run().detach()),
                     "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                     "attn_implementation": model.config._attn_implementation,
                     "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None}
        model = opt = run = None  # free this variant's model and optimizer state before the next one
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out
