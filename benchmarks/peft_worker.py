"""The PEFT side of the two-process benchmarks: a worker (workers.py's protocol) in the PEFT interpreter.

Needs only torch, transformers (5.x, what a PEFT user installs today; 4.57 works too), peft,
safetensors and numpy: it never imports jax or jlora. It starts from the files the jlora worker
wrote: ``model/`` (an HF folder, ``from_pretrained``), ``batch.npz``, ``lora_a.npz`` (jlora's initial
``lora_a``, copied into PEFT's ``lora_A``; both ``lora_B`` are 0), and mirrors jlora's LoRA config.

Ops: ``build`` (``workload`` ``main`` / ``sft`` / ``gpt2`` in ``dtype``: float32, or bfloat16 as
two runs -- ``bfloat16-weights``: the base loaded in bf16 with PEFT's adapters as it makes them
(``autocast_adapter_dtype``: float32), and ``bfloat16-autocast``: the float32 model's forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``); each build reports the loss at the initial adapter
(eval mode), the trainable count and the step's FLOPs (torch's FlopCounterMode, plus the attention
matmuls by hand when SDPA's CPU kernel is not counted). ``probe``: a ``torch.mm`` in a dtype.
``memory``: the peak bytes of live tensors in one step of a run (:func:`torch_tensor_peak`) and
this process's peak RSS.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any

import numpy as np
import peft  # noqa: F401  (imported first: the "imports only" RSS includes it)
import torch
import transformers

from workers import peak_rss_mib, serve

# This module imports no jax or jlora. (Where transformers 4.57 and flax share its interpreter, as in the
# tests' single-interpreter mode, transformers itself may import jax; .venv-peft has none.)
SEED, LOGITS_ATOL = 0, 2e-3
RUNS: dict[str, Any] = {}
MEMORY: dict[str, Any] = {}  # run name -> (run, tensors that exist before a step)


def attention_flops(batch: int, seq: int, hidden: int, layers: int) -> float:
    """Attention matmuls of a train step, full ``s x s`` scores: forward ``Q K^T`` and ``P V``
    (2 * 2 b s^2 d per layer), backward twice that."""
    return 3.0 * 4 * batch * seq ** 2 * hidden * layers


def count_flops(run: Any, batch: int, seq: int, hidden: int, layers: int) -> dict:
    """One ``run()`` under FlopCounterMode; the attention matmuls added by hand when no op of an
    attention module (SDPA's CPU kernel has no formula; the math fallback's bmm would be counted) was."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    by_module = counter.get_flop_counts()
    counted = float(counter.get_total_flops())
    ops = sorted({str(o) for m in by_module.values() for o in m})
    seen = any("attention" in str(op) or (("attn" in m or "attention" in m) and "bmm" in str(op))
               for m, module_ops in by_module.items() for op in module_ops)
    attention = 0.0 if seen else attention_flops(batch, seq, hidden, layers)
    return {"torch_flops": counted, "attention_flops_added": attention, "matmul_flops": counted + attention,
            "counted_ops": ops}


def torch_tensor_peak(run: Any, existing: list) -> dict[str, int]:
    """Peak bytes of live tensor storages in one ``run()``: ``existing``'s (params, optimizer state, batch) plus
    the peak of those the step creates (grads, activations, temporaries; not allocator or BLAS buffers)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    base = sum({ptr(t): t.untyped_storage().nbytes() for t in existing}.values())

    class Live(TorchDispatchMode):
        live = peak = 0
        refs: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                st = t.untyped_storage() if isinstance(t, torch.Tensor) else None
                if st is None or st.data_ptr() in inputs or st.data_ptr() in self.refs or not st.nbytes():
                    continue  # in place, a view, or seen
                key, size = st.data_ptr(), st.nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                self.refs[key] = weakref.ref(st, lambda _, k=key, n=size: self.free(k, n))
            return out

        def free(self, key, size):
            self.live, _ = self.live - size, self.refs.pop(key, None)
    with Live() as live:
        run()
    return {"existing": base, "step_peak": live.peak, "total": base + live.peak}


def load(cls: Any, folder: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` in ``dtype`` (transformers 5 names it ``dtype``, 4.57 ``torch_dtype``)."""
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return cls.from_pretrained(folder, **{key: dtype}, **kwargs)


def peft_model(base: Any, lora_config: dict, lora_a_file: str) -> Any:
    """``get_peft_model`` with jlora's config mirrored and jlora's initial ``lora_a`` copied in."""
    from peft import LoraConfig, get_peft_model
    c = lora_config
    if c.get("rank_pattern") or c.get("alpha_pattern") or c.get("enable_lora"):
        raise ValueError("per-module ranks / alphas / enable_lora are not mirrored on the PEFT side")
    model = get_peft_model(base, LoraConfig(
        r=c["r"], lora_alpha=c["lora_alpha"], target_modules=list(c["target_modules"]),
        lora_dropout=c["lora_dropout"], bias=c["bias"], use_rslora=c["use_rslora"],
        fan_in_fan_out=bool(c["fan_in_fan_out"]), modules_to_save=list(c["modules_to_save"] or []) or None))
    named = dict(model.named_parameters())
    with torch.no_grad(), np.load(lora_a_file) as lora_a:  # jlora's (in, r) -> PEFT's lora_A (r, in)
        for module in lora_a.files:
            named[f"base_model.model.{module}.lora_A.default.weight"].copy_(torch.from_numpy(lora_a[module].T.copy()))
    if len(lora_a.files) != sum(1 for n in named if ".lora_A." in n):
        raise ValueError(f"jlora's adapters ({len(lora_a.files)}) do not cover PEFT's")
    return model


def variants(dtype: str) -> list[tuple[str, torch.dtype, bool]]:
    """(run suffix, weights dtype, autocast) per PEFT run of ``dtype``."""
    if dtype == "float32":
        return [("float32", torch.float32, False)]
    if dtype == "bfloat16":
        return [("bfloat16-weights", torch.bfloat16, False), ("bfloat16-autocast", torch.float32, True)]
    raise ValueError(f"dtype: expected float32 or bfloat16, got {dtype!r}")


def autocast(on: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def make_step(model: Any, loss_of: Any, lr: float, weight_decay: float, cast: bool) -> tuple[Any, Any]:
    """``(run, opt)``: one AdamW step of ``loss_of(model)``, the forward under autocast when ``cast``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)

    def run():
        with autocast(cast):
            loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run, opt


def finish(name: str, run: Any, model: Any, opt: Any, inputs: list, loss0: float, flops_shape: tuple,
           extra: dict | None = None) -> dict:
    """Register ``run`` as ``name``: its FLOPs counted in one step; the info the driver gets."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"trainable": trainable, "loss0": loss0, **count_flops(run, *flops_shape),
            "weights_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "frozen_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
            "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
            "attn_implementation": getattr(model.config, "_attn_implementation", None), **(extra or {})}
    RUNS[name] = run
    MEMORY[name] = (run, lambda: [*model.parameters(), *model.buffers(), *inputs, *(
        v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))])
    return info


def build_main(dtype: str, files: dict, lora_config: dict, lr: float, threads: int) -> dict:
    """``BertForSequenceClassification`` (train mode: dropout on) under ``get_peft_model``, torch AdamW
    (weight decay 0.01) on the trainable params, cross-entropy on the logits."""
    torch.set_num_threads(threads)
    data = dict(np.load(files["batch"]))
    ids, mask, labels = (torch.from_numpy(data[k].astype(np.int64)) for k in ("input_ids", "attention_mask", "labels"))
    out: dict = {"runs": {}}
    for suffix, weights, cast in variants(dtype):
        torch.manual_seed(SEED)
        model = peft_model(load(transformers.BertForSequenceClassification, files["model"], weights),
                           lora_config, files["lora_a"])
        loss_of = lambda m: torch.nn.functional.cross_entropy(  # noqa: E731
            m(input_ids=ids, attention_mask=mask).logits.float(), labels)
        with torch.no_grad(), autocast(cast):
            loss0 = float(loss_of(model.eval()))
        run, opt = make_step(model.train(), loss_of, lr, 0.01, cast)
        c = model.config
        name = f"peft_lora:{suffix}"
        out["runs"][name] = finish(name, run, model, opt, [ids, mask, labels], loss0,
                                     (*ids.shape, c.hidden_size, c.num_hidden_layers))
    return out


def build_sft(dtype: str, files: dict, lora_config: dict, lr: float, threads: int) -> dict:
    """``AutoModelForCausalLM`` (SDPA, train mode) under ``get_peft_model``, torch AdamW (weight decay 0.01,
    no schedule), transformers' own loss on jlora's packed rows: the 4-D bool mask, position_ids and labels
    the jlora worker wrote. Checked first (float32): row 0's packed logits equal its examples' alone."""
    torch.set_num_threads(threads)
    data = dict(np.load(files["batch"]))
    inputs = {k: torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    out: dict = {"runs": {}}
    for suffix, weights, cast in variants(dtype):
        torch.manual_seed(SEED)
        base = load(transformers.AutoModelForCausalLM, files["model"], weights, attn_implementation="sdpa")
        model = peft_model(base, lora_config, files["lora_a"])
        with torch.no_grad(), autocast(cast):
            first = model.eval()(**inputs)
            seg, logits_diff = data["segment_ids"][0], None
            for s in np.unique(seg[seg > 0]) if suffix == "float32" else ():
                where = torch.from_numpy(np.flatnonzero(seg == s))
                alone = model(input_ids=inputs["input_ids"][:1, where]).logits[0]
                logits_diff = max(logits_diff or 0.0, float((alone - first.logits[0, where]).abs().max()))
        if logits_diff is not None and not logits_diff <= LOGITS_ATOL:
            raise ValueError(f"the 4-D packing mask does not isolate examples in torch: max |logits diff| "
                             f"{logits_diff}")
        run, opt = make_step(model.train(), lambda m: m(**inputs).loss, lr, 0.01, cast)
        c = base.config
        name = f"peft_lora:{suffix}"
        out["runs"][name] = finish(name, run, model, opt, list(inputs.values()), float(first.loss),
                                     (*inputs["input_ids"].shape, c.hidden_size, c.num_hidden_layers),
                                     {"packed_logits_max_abs_diff": logits_diff})
    return out


def build_gpt2(dtype: str, files: dict, lora_config: dict, lr: float, threads: int,
               variants_: tuple[str, ...] = ("peft_lora", "torch_full")) -> dict:
    """``GPT2LMHeadModel`` (dropout off), PEFT LoRA on c_attn and a plain PyTorch full fine-tune, torch AdamW
    (lr 1e-4, torch's default weight decay), transformers' own next-token loss (``labels=ids``); in bfloat16
    PEFT LoRA only."""
    torch.set_num_threads(threads)
    ids = torch.from_numpy(np.load(files["batch"])["input_ids"])
    out: dict = {"runs": {}}
    for variant in variants_:
        if variant == "torch_full" and dtype != "float32":
            continue
        for suffix, weights, cast in variants(dtype):
            torch.manual_seed(SEED)
            model = load(transformers.GPT2LMHeadModel, files["model"], weights)
            if variant == "peft_lora":
                model = peft_model(model, lora_config, files["lora_a"])
            loss_of = lambda m: m(ids, labels=ids).loss  # noqa: E731
            with torch.no_grad(), autocast(cast):
                loss0 = float(loss_of(model.eval()))
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

            def run(model=model, opt=opt, cast=cast):
                with autocast(cast):
                    loss = loss_of(model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            c = model.config
            name = f"{variant}:{suffix}"
            out["runs"][name] = finish(name, run, model, opt, [ids], loss0, (*ids.shape, c.n_embd, c.n_layer))
    return out


def build(workload: str, dtype: str, files: dict, lora_config: dict, lr: float, threads: int = 2, **kw: Any) -> dict:
    transformers.logging.set_verbosity_error()
    fn = {"main": build_main, "sft": build_sft, "gpt2": build_gpt2}[workload]
    extra = {"variants_": tuple(kw["variants"])} if "variants" in kw else {}
    return fn(dtype, files, lora_config, lr, threads, **extra)


def probe(n: int, dtype: str, threads: int = 2) -> dict:
    """A ``torch.mm`` of ``(n, n) @ (n, n)`` in ``dtype`` as run ``torch_matmul:<dtype>``."""
    from machine import torch_matmul_probe
    name = f"torch_matmul:{dtype}"
    RUNS[name] = torch_matmul_probe(n, dtype, threads)
    return {"run": name, "flops": 2.0 * n ** 3}


def memory(name: str) -> dict:
    run, existing = MEMORY[name]
    return {"tensors": torch_tensor_peak(run, existing()), "peak_rss_mib": peak_rss_mib()}


if __name__ == "__main__":
    serve({"build": build, "probe": probe, "memory": memory}, RUNS)
