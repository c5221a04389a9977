"""Hugging Face interop: wrap transformers Flax models, export merged weights, PEFT adapters.

    model = transformers.FlaxGPT2LMHeadModel(...)
    config = jlora.hf.default_config(model, r=4)          # the paper's W_q, W_v
    f = jlora.apply(model, config)                        # f(params, lora, input_ids, ...)
    jlora.hf.export_merged("out/merged", model, model.params, lora, config)
    jlora.hf.save_peft("out/adapter", model, lora, config)
    lora, config = jlora.hf.load_peft("out/adapter", model)
    jlora.hf.export_gguf("out/merged.gguf", model, params, lora, config, source_gguf=...)  # Llama
"""
from jlora.hf.integration import register as _register

_register()

from jlora.hf.export import export_merged  # noqa: E402
from jlora.hf.gguf_export import export_gguf
from jlora.hf.families import DEFAULT_TARGETS, default_config, model_type
from jlora.hf.peft import load_peft, save_peft
from jlora.hf.shipped import minilm_path, smollm2_gguf_path
from jlora.hf import t5

t5.install()  # FlaxT5 on jax >= 0.10 (its jnp.clip(a_max=) call); no-op on older jax

__all__ = ["DEFAULT_TARGETS", "default_config", "export_gguf", "export_merged", "load_peft", "minilm_path", "model_type",
           "save_peft", "smollm2_gguf_path"]
