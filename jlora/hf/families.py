"""What jlora knows about each Hugging Face model family.

The LoRA paper adapts only the attention query and value projections (W_q, W_v); these defaults
follow it. GPT-2 fuses q, k, v into one ``c_attn`` Conv1D whose kernel is stored (fan_out, fan_in):
its default adapts the q and v slices only (loralib's ``MergedLinear(enable_lora=[True, False,
True])``); its storage order is derived by the adapter plan (no ``fan_in_fan_out`` needed).
"""
from __future__ import annotations

from typing import Any

from jlora.config import LoraConfig

DEFAULT_TARGETS: dict[str, dict[str, Any]] = {
    "gpt2": {"target_modules": ("c_attn",), "enable_lora": {"c_attn": (True, False, True)}},
    "bert": {"target_modules": ("query", "value")},
    "roberta": {"target_modules": ("query", "value")},
    "llama": {"target_modules": ("q_proj", "v_proj")},
    "mistral": {"target_modules": ("q_proj", "v_proj")},
    "gemma": {"target_modules": ("q_proj", "v_proj")},
    "t5": {"target_modules": ("q", "v")},
}
# Heads that a classification fine-tune trains in full (PEFT's modules_to_save for SEQ_CLS).
CLASSIFIER_HEADS = {"bert": ("classifier",), "roberta": ("classifier",)}
CONV1D_FAMILIES = ("gpt2",)


def model_type(model: Any) -> str:
    """``model.config.model_type`` of an HF model (or its config)."""
    config = getattr(model, "config", model)
    kind = getattr(config, "model_type", None)
    if not kind:
        raise TypeError(f"expected a Hugging Face model or config, got {type(model).__name__}")
    return kind


def default_config(model: Any, **overrides: Any) -> LoraConfig:
    """The paper's setting (W_q, W_v) for ``model``'s family; ``overrides`` go to :class:`LoraConfig`.

    A sequence-classification model also gets its classifier head in ``modules_to_save``.
    """
    kind = model_type(model)
    if kind not in DEFAULT_TARGETS:
        raise ValueError(f"no default target_modules for model_type {kind!r}; known: {sorted(DEFAULT_TARGETS)}. "
                         "Pass target_modules=... yourself.")
    settings: dict[str, Any] = dict(DEFAULT_TARGETS[kind])
    if "ForSequenceClassification" in type(model).__name__ and kind in CLASSIFIER_HEADS:
        settings["modules_to_save"] = CLASSIFIER_HEADS[kind]
    if "target_modules" in overrides and "enable_lora" not in overrides:
        settings.pop("enable_lora", None)
    settings.update(overrides)
    return LoraConfig(**settings)


def torch_class_name(model: Any) -> str:
    """The PyTorch transformers class matching a Flax model class (``FlaxBertModel`` -> ``BertModel``)."""
    own = next((c for c in type(model).__mro__ if c.__module__.startswith("transformers.")), type(model))
    name = own.__name__
    if not name.startswith("Flax"):
        raise TypeError(f"expected a transformers Flax model (FlaxPreTrainedModel), got {name}")
    return name[len("Flax"):]
