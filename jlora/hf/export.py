"""Write a merged fine-tune as a Hugging Face folder that PyTorch and Flax transformers both load.

Everything is written to a temporary folder beside ``out_dir`` and renamed into place at the end,
so an error or an interrupt leaves nothing half-written under ``out_dir``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jlora.config import LoraConfig
from jlora.core import merge
from jlora.hf.families import torch_class_name
from jlora.hf.names import to_torch_state
from jlora.tree import Tree

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "tokenizer.model", "added_tokens.json")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out_dir`` only if the block finishes.

    Raises ``FileExistsError`` naming ``out_dir`` if it exists and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700); a model folder is not
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    """The process umask (read by setting it and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_torch_safetensors(state: dict[str, np.ndarray], path: Path) -> None:
    """``safetensors.numpy.save_file`` with the metadata PyTorch loaders expect."""
    from safetensors.numpy import save_file
    # safetensors writes an array's buffer as it lies in memory: transposed views must be copied
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata={"format": "pt"})


def copy_tokenizer(source: Any, out: Path) -> list[str]:
    """Save ``source`` (a tokenizer, or a folder holding tokenizer files) into ``out``."""
    if source is None:
        return []
    if hasattr(source, "save_pretrained"):
        return [Path(p).name for p in source.save_pretrained(str(out))]
    folder = Path(source)
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
            copied.append(name)
    return copied


def export_merged(out_dir: str | os.PathLike, model: Any, params: Tree, lora: Tree, config: LoraConfig, *,
                  tokenizer: Any = None, dtype: Any = np.float32, overwrite: bool = False) -> Path:
    """Merge ``lora`` into ``params`` and write an HF folder for ``model``'s architecture.

    Writes ``config.json`` (``architectures`` naming the PyTorch class), ``model.safetensors`` with
    PyTorch names and layouts (loads in ``AutoModel*.from_pretrained`` of transformers 4.57 and 5,
    and in the Flax class with ``from_pt=True``), and tokenizer files from ``tokenizer`` (a
    tokenizer or a folder), or from ``model.config.name_or_path`` when that folder has them.

    Args:
      dtype: numpy dtype of the written tensors (float32 by default).
    """
    merged = merge(params, lora, config)
    state = {k: v.astype(dtype) for k, v in to_torch_state(merged).items()}
    hf_config = model.config.__class__.from_dict(model.config.to_dict())
    hf_config.architectures = [torch_class_name(model)]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_torch_safetensors(state, tmp / "model.safetensors")
        hf_config.to_json_file(str(tmp / "config.json"))
        source = tokenizer
        if source is None and os.path.isdir(str(getattr(model.config, "name_or_path", "") or "")):
            source = model.config.name_or_path
        copy_tokenizer(source, tmp)
    return Path(out_dir)
