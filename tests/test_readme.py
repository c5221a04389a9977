"""The README runs as written: every ```python block of README.md is executed, unmodified.

Each block runs in its own subprocess (cwd: a fresh tmp dir, so files it writes land there) with
8 CPU devices (``XLA_FLAGS`` is set before jax is imported: the Pods block builds a 2 x 4 mesh).
A block that, as the README says, works on things the reader already has (``variables``,
``model``, ``loss_fn``, ``batch``) gets them from a small, visible PREAMBLE here, keyed by the
block's section heading and first line; an EPILOGUE may then check what the block claims. The
README's code itself is never edited. A block may use the names of earlier blocks of its own
section (``continues``). A new block that is neither in BLOCKS nor in SKIPPED (with a reason)
fails ``test_every_python_block_is_covered``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclass(frozen=True)
class Block:
    heading: str   # the nearest "#"-heading above the block, without the "#"s
    first: str     # the block's first line, stripped
    line: int      # 1-based README line of the block's first code line
    code: str

    @property
    def key(self) -> tuple[str, str]:
        return self.heading, self.first


def python_blocks(text: str) -> list[Block]:
    blocks, heading, code, start, other_fence = [], "", None, 0, False
    for number, line in enumerate(text.splitlines(), 1):
        if other_fence:  # inside a non-python fence (bash, text): its "# comments" are not headings
            other_fence = line.strip() != "```"
        elif code is None:
            if re.match(r"#{1,6} ", line):
                heading = line.lstrip("#").strip()
            elif line.strip() == "```python":
                code, start = [], number + 1
            elif line.strip().startswith("```"):
                other_fence = True
        elif line.strip() == "```":
            source = "\n".join(code) + "\n"
            blocks.append(Block(heading, next(s.strip() for s in code if s.strip()), start, source))
            code = None
        else:
            code.append(line)
    assert code is None, "README.md: a ```python block is not closed"
    return blocks


@dataclass(frozen=True)
class Run:
    preamble: str = ""      # what the README says the reader already has
    epilogue: str = ""      # checks of what the block claims, after it ran
    continues: tuple[str, str] | None = None   # an earlier block of the same section, run first


LIBRARY = ("The library", "import jax, optax, jlora")
HF = ("Hugging Face models", "import jax, transformers, jlora")
PODS = ("Pods: meshes, multi-host, checkpoints", "import jax, jax.numpy as jnp, optax, flax.linen as nn, jlora")
QLORA = ("QLoRA: LoRA over a quantized frozen base", "import jax, jax.numpy as jnp, optax, jlora")
BANK = ("Many adapters in one batch: `jlora.bank` and `jlora serve`", "import jax, numpy as np, jlora")

BLOCKS: dict[tuple[str, str], Run] = {
    LIBRARY: Run(
        preamble="""
            # The reader's model: a linen model with "query"/"value" projections, its variables,
            # a loss on logits and a batch.
            import jax, jax.numpy as jnp, optax, flax.linen as nn

            class Model(nn.Module):
                @nn.compact
                def __call__(self, x):
                    h = nn.Dense(16, name="query")(x) * nn.Dense(16, name="value")(x)
                    return nn.Dense(4, name="head")(h)

            model = Model()
            batch = {"x": jax.random.normal(jax.random.key(9), (8, 16)), "y": jnp.arange(8) % 4}
            variables = model.init(jax.random.key(0), batch["x"])
            loss_fn = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        """,
        epilogue="""
            import numpy as np
            assert lora["params"]["query"]["lora_a"].shape == (16, 8), lora["params"]["query"]["lora_a"].shape
            assert lora["params"]["value"]["lora_b"].shape == (8, 16)
            losses = []
            for _ in range(3):
                trainable, opt_state, loss = step(trainable, opt_state, frozen, batch)
                losses.append(float(loss))
            assert losses[-1] < losses[0], losses
            merged = jlora.merge(variables, trainable, config)      # the comment: f(...) == apply(merged)
            np.testing.assert_allclose(f(frozen, trainable, batch["x"]), model.apply(merged, batch["x"]),
                                       rtol=1e-5, atol=1e-5)
        """),
    HF: Run(
        epilogue="""
            import os, numpy as np
            assert os.path.exists("out/merged/config.json") and os.path.exists("out/adapter/adapter_config.json")
            ids = np.arange(8, dtype=np.int32)[None]
            logits = jlora.apply(model, config)(model.params, lora, ids).logits   # the adapter loaded back
            assert logits.shape == (1, 8, model.config.vocab_size), logits.shape
            np.testing.assert_allclose(logits, model(ids).logits, atol=1e-4)       # lora_b == 0: the base
        """),
    QLORA: Run(
        epilogue="""
            import numpy as np
            kernel = frozen["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
            assert jlora.is_quantized(kernel) and kernel.format == "q4_1", kernel   # the file's blocks, kept
            assert jlora.base_bytes(frozen) < 0.35 * jlora.base_bytes(jlora.dequantize(frozen))
            assert np.isfinite(float(loss)) and not jlora.is_quantized(merged["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
            logits = f(frozen, trainable, ids).logits                                   # merge == apply
            np.testing.assert_allclose(model(ids, params=merged).logits, logits, atol=2e-4)
        """),
    BANK: Run(
        epilogue="""
            # each row's tokens = that row generated alone with its merged adapter (the comment's claim)
            from jlora.generate import BANKED, _compiled
            for b, i in enumerate([3, 3, 0, 1]):
                merged = jlora.merge(params, *(mixed if i == 3 else adapters[i]))
                alone = jlora.generate(model, merged, prompts[b:b + 1], max_new_tokens=8)
                np.testing.assert_array_equal(alone[0], tokens[b])
            assert _compiled(model, BANKED)._cache_size() == 1                     # the hot swap: no recompile
            assert len({tuple(np.asarray(t)) for t in tokens[1:]}) == 3            # the adapters differ
            layer = grads["model"]["layers"]["0"]["self_attn"]
            assert float(abs(layer["k_proj"]["lora_a"][1]).sum()) > 0                # slot 1 (row 3) trained
            assert float(abs(layer["k_proj"]["lora_a"][0]).sum()) == 0               # slot 0 has no k_proj
        """),
    PODS: Run(
        epilogue="""
            import numpy as np
            assert len(mesh.devices.flat) == 8 and np.isfinite(float(loss))
            assert trainable["params"]["fc1"]["lora_b"].sharding.spec == P(None, "model")   # derived
        """),
}

# Blocks deliberately not run: key -> reason. Aim: empty.
SKIPPED: dict[tuple[str, str], str] = {}

# Blocks that do not run as written today because of the README text itself (a section this file
# does not own): key -> (text the failure must contain, reason). Strict: once the block runs, the
# test fails until its entry is removed here.
KNOWN_BROKEN: dict[tuple[str, str], tuple[str, str]] = {}

BLOCK_LIST = python_blocks(README.read_text())


def test_every_python_block_is_covered():
    keys = [b.key for b in BLOCK_LIST]
    assert len(set(keys)) == len(keys), f"two README python blocks share a heading and first line: {keys}"
    uncovered = [f"README.md:{b.line} [{b.heading}] {b.first}" for b in BLOCK_LIST
                 if b.key not in BLOCKS and b.key not in SKIPPED]
    assert not uncovered, ("README python blocks neither run nor skipped (add them to BLOCKS in "
                           f"tests/test_readme.py, or to SKIPPED with a reason): {uncovered}")
    stale = [k for k in (*BLOCKS, *SKIPPED, *KNOWN_BROKEN) if k not in keys]
    assert not stale, f"entries in tests/test_readme.py for README blocks that no longer exist: {stale}"
    assert not set(BLOCKS) & set(SKIPPED)


def script(block: Block) -> str:
    """The Python program that runs ``block`` (and the blocks it continues) in one namespace."""
    chain, key = [block], BLOCKS[block.key].continues
    by_key = {b.key: b for b in BLOCK_LIST}
    while key is not None:
        assert key[0] == block.heading, f"{block.key} continues {key}, a block of another section"
        chain.insert(0, by_key[key])
        key = BLOCKS[key].continues
    parts = []
    for b in chain:
        run = BLOCKS[b.key]
        if run.preamble:
            parts.append((f"<preamble of README.md:{b.line}>", textwrap.dedent(run.preamble)))
        parts.append((f"README.md:{b.line}", b.code))
    if BLOCKS[block.key].epilogue:
        parts.append((f"<epilogue of README.md:{block.line}>", textwrap.dedent(BLOCKS[block.key].epilogue)))
    lines = ["import sys", "namespace = {'__name__': '__main__'}"]
    for name, source in parts:
        # line numbers in tracebacks are the README's own: pad the README's code to its line
        offset = int(name.split(":")[1]) - 1 if name.startswith("README.md:") else 0
        lines.append(f"exec(compile({chr(10) * offset + source!r}, {name!r}, 'exec'), namespace)")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("block", [b for b in BLOCK_LIST if b.key not in SKIPPED],
                         ids=lambda b: f"L{b.line}-{re.sub(r'[^A-Za-z0-9]+', '_', b.heading).strip('_')}")
def test_python_block_runs_as_written(block, tmp_path):
    if block.key not in BLOCKS:
        pytest.fail(f"README.md:{block.line} [{block.heading}] is not covered: see test_every_python_block_is_covered")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    (tmp_path / "block.py").write_text(script(block))
    done = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    output = (done.stdout + done.stderr)[-6000:]
    if block.key in KNOWN_BROKEN:
        needle, reason = KNOWN_BROKEN[block.key]
        assert done.returncode != 0, (f"README.md:{block.line} now runs: remove its KNOWN_BROKEN entry "
                                      "in tests/test_readme.py")
        assert needle in output, f"README.md:{block.line} fails otherwise than known ({needle!r}):\n{output}"
        pytest.xfail(f"README.md:{block.line}: {reason}")
    assert done.returncode == 0, f"README.md:{block.line} [{block.heading}] failed:\n{output}"
