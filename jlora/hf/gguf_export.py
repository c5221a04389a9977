"""Write a merged Llama fine-tune as a GGUF file (llama.cpp's format), the inverse of ``read_gguf_llama``.

Format facts this writer follows (those of llama.cpp's ``convert_hf_to_gguf.py``):

* ggml lists a tensor's dims innermost first, so a torch ``(out, in)`` weight is a GGUF ``[in, out]``
  tensor with the same bytes; Flax's ``(in, out)`` kernels are transposed back to ``(out, in)``; the
  embedding ``(vocab, hidden)`` is already in torch's layout.
* ``attn_q``/``attn_k`` rows are permuted per head from HF's rotate-half rotary layout to llama.cpp's
  interleaved one (:func:`_permute`, the inverse of ``jlora.hf.llama._unpermute``).
* Norm weights (1-D) are always F32; 2-D weights are F32 or F16 (``general.file_type`` 0 or 1).
* A tied head has no ``output.weight`` (llama.cpp then reuses ``token_embd.weight``).
* The tokenizer lives in ``tokenizer.*`` metadata: copied verbatim from a source GGUF, or built from a
  transformers byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jlora.config import LoraConfig
from jlora.core import merge
from jlora.hf.export import current_umask
from jlora.hf.names import GGUF_NAMES
from jlora.tree import Tree, flatten

DTYPES = {"f32": (np.float32, 0), "f16": (np.float16, 1)}  # name -> (numpy dtype, general.file_type)
HF_TO_GGUF = {hf: gguf for gguf, hf in GGUF_NAMES.items()}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary row permutation of a q/k projection in torch layout (rows = heads * head_dim).

    Within each head, row ``j * half + i`` (HF's rotate-half pairs ``i`` and ``half + i``) goes to row
    ``2 * i + j`` (llama.cpp's adjacent pairs). Exact inverse of ``jlora.hf.llama._unpermute``.
    """
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@contextlib.contextmanager
def _atomic_file(out_path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``out_path`` that is renamed onto it only if the block finishes.

    The single-file counterpart of ``jlora.hf.export.atomic_dir``: an error or interrupt leaves no
    partial file under ``out_path``. Raises ``FileExistsError`` naming ``out_path`` if it exists and
    ``overwrite`` is False.
    """
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_path {str(out)!r} exists; pass overwrite=True to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"out_path {str(out)!r} is a folder; a GGUF export is a single file")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private (0600); a model file is not
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _check_model(model: Any) -> Any:
    """The model's ``LlamaConfig``; refuses other architectures and Llama options GGUF-llama lacks here."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind != "llama":
        raise ValueError(f"export_gguf: model is {type(model).__name__} (model_type {kind!r}); only Llama-"
                         "architecture models (model_type 'llama', e.g. FlaxLlamaForCausalLMFixed) are supported")
    if getattr(config, "rope_scaling", None):
        raise ValueError(f"export_gguf: model.config.rope_scaling={config.rope_scaling!r} is not supported")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("export_gguf: Llama projections with biases (attention_bias/mlp_bias) are not supported")
    return config


def _gguf_tensors(params: Tree, config: Any, dtype: Any) -> dict[str, np.ndarray]:
    """``{GGUF name: array in torch layout}``: norms F32, 2-D weights ``dtype``, q/k rows permuted."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    out: dict[str, np.ndarray] = {}
    for path, leaf in flatten(params).items():
        weight = np.asarray(leaf, np.float32)
        if path[:2] == ("model", "layers") and ".".join(path[3:-1]) in HF_TO_GGUF:
            name = f"blk.{int(path[2])}.{HF_TO_GGUF['.'.join(path[3:-1])]}.weight"
        else:
            name = {("model", "embed_tokens"): "token_embd.weight", ("model", "norm"): "output_norm.weight",
                    ("lm_head",): "output.weight"}.get(tuple(path[:-1]))
            if name is None:
                raise ValueError(f"export_gguf: params has {'/'.join(path)!r}, which a Llama GGUF cannot hold")
        if path[-1] == "kernel":
            weight = weight.T  # Flax (in, out) -> torch (out, in)
            if name.endswith("attn_q.weight"):
                weight = _permute(weight, heads)
            elif name.endswith("attn_k.weight"):
                weight = _permute(weight, kv_heads)
        if weight.ndim == 2:
            with np.errstate(over="ignore"):  # overflow is reported below, naming the tensor
                weight = weight.astype(dtype)
            if not np.isfinite(weight).all():
                raise ValueError(f"export_gguf: {'/'.join(path)} overflows {np.dtype(dtype).name}; use dtype='f32'")
        out[name] = np.ascontiguousarray(weight)
    return out


def _add_llama_fields(writer: Any, config: Any, file_type: int, name: str, context_length: int) -> None:
    """``general.*`` and every ``llama.*`` field that ``read_gguf_llama`` and llama.cpp read."""
    heads = config.num_attention_heads
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(file_type)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_vocab_size(config.vocab_size)


def _copy_tokenizer_fields(writer: Any, source_gguf: str | os.PathLike, vocab_size: int) -> str | None:
    """Copy every ``tokenizer.*`` field of ``source_gguf`` with its GGUF value types; return its general.name."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"source_gguf {str(source_gguf)!r} has no tokenizer.ggml.tokens field")
    if len(tokens.data) != vocab_size:
        raise ValueError(f"source_gguf {str(source_gguf)!r} has {len(tokens.data)} tokens but the model's "
                         f"vocab_size is {vocab_size}; llama.cpp needs them equal")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"source_gguf: {key} is a nested array, which export_gguf cannot copy")
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[1])
        else:
            writer.add_key_value(key, field.contents(), kind)
    name = reader.fields.get("general.name")
    return name.contents() if name is not None else None


def _token_types(tokenizer: Any, n: int) -> list[int]:
    """GGUF token types: control for special added tokens, user-defined for other added ones."""
    types = [TOKEN_NORMAL] * n
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < n:
            types[i] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
    for i in tokenizer.all_special_ids:
        if 0 <= i < n:
            types[i] = TOKEN_CONTROL
    return types


def _add_hf_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """``tokenizer.*`` fields from a transformers fast tokenizer for a byte-level BPE (``gpt2`` in GGUF).

    Ids the tokenizer lacks below ``vocab_size`` become ``[PAD{id}]`` tokens of type UNUSED, as
    llama.cpp's converter writes them. ``tokenizer.ggml.pre`` is not written (llama.cpp identifies it
    by hashing its own test tokenization; it falls back to 'default' with a warning).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer: a transformers fast tokenizer is needed, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise ValueError("tokenizer: only byte-level BPE tokenizers (GPT-2 style) can be written to GGUF; "
                         "pass source_gguf to copy another file's tokenizer instead")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for token, i in vocab.items():
        tokens[i] = token
    present = set(vocab.values())
    types = [t if i in present else TOKEN_UNUSED for i, t in enumerate(_token_types(tokenizer, vocab_size))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for field, i in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if i is not None:
            writer.add_uint32(f"tokenizer.ggml.{field}_token_id", int(i))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(out_path: str | os.PathLike, model: Any, params: Tree, lora: Tree | None, config: LoraConfig | None,
                *, source_gguf: str | os.PathLike | None = None, tokenizer: Any = None, dtype: str = "f32",
                name: str | None = None, context_length: int | None = None, overwrite: bool = False) -> Path:
    """Merge ``lora`` into ``params`` and write a llama-architecture GGUF file that llama.cpp runs.

    Args:
      out_path: the ``.gguf`` file to write (atomically: no partial file is left on error).
      model: the Llama model (``model.config.model_type == "llama"``) whose config is written.
      params: its Flax params (``{"model": ..., "lm_head": ...}``; no ``lm_head`` for a tied head).
      lora, config: the adapter and its :class:`LoraConfig`; both None to export the base as is.
      source_gguf: a GGUF file whose ``tokenizer.*`` fields are copied verbatim (e.g. the base model's).
      tokenizer: otherwise, a transformers fast tokenizer for a byte-level BPE vocabulary.
      dtype: ``"f32"`` or ``"f16"`` for the 2-D weights (norms are always F32).
      name: ``general.name`` (default: the source's, else ``model.config.name_or_path``, else 'llama').
      context_length: ``llama.context_length`` (default: ``model.config.max_position_embeddings``; note
        that ``load_gguf_llama`` caps that at 2048: pass the source's own, e.g. 8192 for SmolLM2).
      overwrite: replace an existing ``out_path``.
    """
    import gguf

    llama = _check_model(model)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if (lora is None) != (config is None):
        raise ValueError("lora and config: pass both (to merge an adapter) or neither (to export the base)")
    if source_gguf is None and tokenizer is None:
        raise ValueError("export_gguf needs a tokenizer for the GGUF file: pass source_gguf (a GGUF file whose "
                         "tokenizer.* fields are copied) or tokenizer (a transformers byte-level BPE tokenizer)")
    if source_gguf is not None and tokenizer is not None:
        raise ValueError("pass either source_gguf or tokenizer, not both")
    if set(params) == {"params"}:
        params = params["params"]
    merged = merge(params, lora, config) if lora is not None else params
    np_dtype, file_type = DTYPES[dtype]
    tensors = _gguf_tensors(merged, llama, np_dtype)
    with _atomic_file(out_path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        if source_gguf is not None:
            source_name = _copy_tokenizer_fields(writer, source_gguf, llama.vocab_size)
        else:
            source_name = None
            _add_hf_tokenizer(writer, tokenizer, llama.vocab_size)
        _add_llama_fields(writer, llama, file_type, name or source_name or llama.name_or_path or "llama",
                          context_length or llama.max_position_embeddings)
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(out_path)
