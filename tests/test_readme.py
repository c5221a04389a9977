"""The docs run as written: every ```python block of README.md and docs/*.md is executed, unmodified.

Each block runs in its own subprocess (cwd: a fresh tmp dir, so files it writes land there) with
8 CPU devices (``XLA_FLAGS`` is set before jax is imported: the Pods block builds a 2 x 4 mesh).
A block that, as its page says, works on things the reader already has (``variables``,
``model``, ``loss_fn``, ``batch``) gets them from a small, visible PREAMBLE here, keyed by the
block's page, section heading and first line; an EPILOGUE may then check what the block claims.
The pages' code itself is never edited. A block may use the names of an earlier block of its own
page (``continues``: that block, and the one it continues, run first). A new block that is neither
in BLOCKS nor in SKIPPED (with a reason) fails ``test_every_python_block_is_covered``.

Every relative link of these pages (and of BENCHMARKS.md, the index of where the benchmarks went)
must name an existing file, and its ``#anchor`` a heading of that file (GitHub's anchors).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]   # their python blocks run
LINKED = [*PAGES, ROOT / "BENCHMARKS.md"]                                # their links are checked


def rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Block:
    file: str      # the page, relative to the repository root ("README.md", "docs/qlora.md")
    heading: str   # the nearest "#"-heading above the block, without the "#"s
    first: str     # the block's first line, stripped
    line: int      # 1-based line of the page of the block's first code line
    code: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.file, self.heading, self.first

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _lines_outside_fences(text: str):
    """(number, line, fence) for every line; fence: the info string of the fence the line is in
    ("python", "bash", "" ...), None outside fences and on the fence lines themselves."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = stripped[3:].strip()
            yield number, line, None
        elif fence is not None and stripped == "```":
            fence = None
            yield number, line, None
        else:
            yield number, line, fence


def python_blocks(text: str, file: str) -> list[Block]:
    blocks, heading, code, start = [], "", None, 0
    for number, line, fence in _lines_outside_fences(text):
        if fence is None and code is not None:            # the closing fence of a python block
            blocks.append(Block(file, heading, next(s.strip() for s in code if s.strip()), start,
                                "\n".join(code) + "\n"))
            code = None
        elif fence is None and line.strip() == "```python":
            code, start = [], number + 1
        elif fence is None and re.match(r"#{1,6} ", line):  # "# comments" inside fences are not headings
            heading = line.lstrip("#").strip()
        elif fence == "python":
            code.append(line)
    assert code is None, f"{file}: a ```python block is not closed"
    return blocks


@dataclass(frozen=True)
class Run:
    preamble: str = ""      # what the page says the reader already has
    epilogue: str = ""      # checks of what the block claims, after it ran
    continues: tuple[str, str, str] | None = None   # an earlier block of the same page, run first


# README.md: one example per verb, each block continuing the one before it (the quantize block
# continues the generate one directly: it needs none of the bank block's names).
R_INIT = ("README.md", "`LoraConfig`, `init`, `apply`, `make_plan`",
          "import jax, jax.numpy as jnp, optax, flax.linen as nn, jlora")
R_TRAIN = ("README.md", "`split`, `optimizer`, `make_train_step`",
           "trainable, frozen = jlora.split(params, lora, config)  # the adapters train; the base stays frozen")
R_MERGE = ("README.md", "`merge`, `unmerge`, `count`",
           "merged = jlora.merge(frozen, trainable, config)        # W + (α/r)·A@B: plain params, served without jlora")
R_CKPT = ("README.md", "`AdapterCheckpointer`",
          'with jlora.AdapterCheckpointer("ckpt", config, frozen) as ckpt:   # orbax; the base is only fingerprinted')
R_HF = ("README.md", "Hugging Face: `hf.export_merged`, `hf.save_peft`, `hf.load_peft`",
        "import jax, numpy as np, transformers, jlora")
R_GENERATE = ("README.md", "`generate`", "prompts = np.array([[464, 329, 318], [40, 588, 257]], np.int32)")
R_BANK = ("README.md", "`bank`, `weighted_adapter`",
          "adapters = [(jlora.init(jax.random.key(i), model.params, config), config) for i in range(3)]")
R_QUANTIZE = ("README.md", "`quantize` (QLoRA)",
              "qparams = jlora.quantize(model.params, \"nf4\")          # QLoRA's frozen base: the blocks' kernels in 4 bits")

# docs/: the guides (moved from the README, issue 19)
LIBRARY = ("docs/library.md", "The library", "import jax, optax, jlora")
HF = ("docs/hf.md", "Hugging Face models", "import jax, transformers, jlora")
PODS = ("docs/pods.md", "Pods: meshes, multi-host, checkpoints",
        "import jax, jax.numpy as jnp, optax, flax.linen as nn, jlora")
QLORA = ("docs/qlora.md", "QLoRA: LoRA over a quantized frozen base", "import jax, jax.numpy as jnp, optax, jlora")
BANK = ("docs/banks-and-serving.md", "Many adapters in one batch: `jlora.bank` and `jlora serve`",
        "import jax, numpy as np, jlora")
PRECISION = ("docs/precision.md", "What bfloat16 means here", "import jax, jax.numpy as jnp, flax.linen as nn, jlora")

BLOCKS: dict[tuple[str, str, str], Run] = {
    PRECISION: Run(
        epilogue="""
            from jlora.precision import has_fast_bf16
            assert dtype == ("bfloat16" if has_fast_bf16() else "float32"), dtype
            leaves = jax.tree_util.tree_leaves
            assert all(x.dtype == jnp.dtype(dtype) for x in leaves(frozen)), [x.dtype for x in leaves(frozen)]
            assert all(x.dtype == jnp.float32 for x in leaves(lora) + leaves(grads))
            assert f(frozen, lora, x).dtype == jnp.dtype(dtype) and jnp.isfinite(loss_fn(lora))
            assert any(float(jnp.abs(g).max()) > 0 for g in leaves(grads))
        """),
    R_INIT: Run(
        epilogue="""
            import numpy as np
            assert lora["params"]["query"]["lora_a"].shape == (16, 4), lora["params"]["query"]["lora_a"].shape
            assert lora["params"]["query"]["lora_b"].shape == (4, 32) and "head" not in lora["params"]
            np.testing.assert_allclose(y, model.apply(params, x), rtol=1e-6, atol=1e-6)   # lora_b == 0: the base
        """),
    R_TRAIN: Run(
        continues=R_INIT,
        epilogue="""
            start, _ = jlora.split(params, jlora.init(jax.random.key(1), params, config), config)
            assert float(loss) < 0.5 * float(loss_fn(start, frozen, batch)), float(loss)      # it trained
            assert set(trainable["params"]) == {"query", "value"}                           # adapters only
        """),
    R_MERGE: Run(
        continues=R_TRAIN,
        epilogue="""
            import numpy as np
            np.testing.assert_allclose(model.apply(merged, x), f(frozen, trainable, x), rtol=1e-5, atol=1e-5)
            assert not np.allclose(merged["params"]["query"]["kernel"], params["params"]["query"]["kernel"])
            np.testing.assert_allclose(base["params"]["query"]["kernel"], params["params"]["query"]["kernel"],
                                       atol=1e-6)
        """),
    R_CKPT: Run(
        continues=R_MERGE,
        epilogue="""
            import os, numpy as np
            assert step == 20 and os.listdir("ckpt") == ["20"], os.listdir("ckpt")
            np.testing.assert_allclose(model.apply(jlora.merge(frozen, trainable, config), x), model.apply(merged, x),
                                       rtol=1e-6, atol=1e-6)          # the trained adapters, restored
        """),
    R_HF: Run(
        epilogue="""
            import os
            assert os.path.exists("out/merged/config.json") and os.path.exists("out/adapter/adapter_config.json")
            # back in PEFT's form (per-slice q, v adapters as one rank-2r c_attn adapter): the same weights
            first = jlora.hf.default_config(model, r=4)
            merged = jlora.merge(model.params, jlora.init(jax.random.key(0), model.params, first), first)
            jax.tree.map(np.testing.assert_array_equal, merged, jlora.merge(model.params, lora, config))
        """),
    R_GENERATE: Run(
        continues=R_HF,
        epilogue="""
            assert tokens.shape == (2, 8), tokens.shape
            alone = jlora.generate(model, jlora.merge(model.params, lora, config), prompts, max_new_tokens=8)
            np.testing.assert_array_equal(tokens, alone)                        # unmerged == merged
        """),
    R_BANK: Run(
        continues=R_GENERATE,
        epilogue="""
            from jlora.generate import BANKED, _compiled
            merged2 = jlora.merge(model.params, *adapters[2])
            np.testing.assert_array_equal(tokens[0], jlora.generate(model, merged2, prompts[:1], max_new_tokens=8)[0])
            np.testing.assert_array_equal(tokens[1], jlora.generate(model, model.params, prompts[1:], max_new_tokens=8)[0])
            jlora.generate(model, model.params, prompts, max_new_tokens=8, bank=bank, adapter_ids=np.array([3, 0]))
            assert _compiled(model, BANKED)._cache_size() == 1                  # put: nothing recompiled
        """),
    R_QUANTIZE: Run(
        continues=R_GENERATE,
        epilogue="""
            kernel = qparams["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
            assert jlora.is_quantized(kernel) and not jlora.is_quantized(qparams["transformer"]["wte"]["embedding"])
            assert jlora.base_bytes(qparams) < 0.7 * jlora.base_bytes(model.params)
            assert logits.shape == (2, 3, 1000) and bool(np.isfinite(logits).all())
        """),
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
SKIPPED: dict[tuple[str, str, str], str] = {}

# Blocks that do not run as written today because of the page's text itself (a section this file
# does not own): key -> (text the failure must contain, reason). Strict: once the block runs, the
# test fails until its entry is removed here.
KNOWN_BROKEN: dict[tuple[str, str, str], tuple[str, str]] = {}

BLOCK_LIST = [block for page in PAGES for block in python_blocks(page.read_text(), rel(page))]


def test_every_python_block_is_covered():
    assert len(PAGES) > 1, "docs/*.md: no pages found"
    keys = [b.key for b in BLOCK_LIST]
    assert len(set(keys)) == len(keys), f"two python blocks of a page share a heading and first line: {keys}"
    uncovered = [f"{b.where} [{b.heading}] {b.first}" for b in BLOCK_LIST
                 if b.key not in BLOCKS and b.key not in SKIPPED]
    assert not uncovered, ("python blocks neither run nor skipped (add them to BLOCKS in "
                           f"tests/test_readme.py, or to SKIPPED with a reason): {uncovered}")
    stale = [k for k in (*BLOCKS, *SKIPPED, *KNOWN_BROKEN) if k not in keys]
    assert not stale, f"entries in tests/test_readme.py for python blocks that no longer exist: {stale}"
    assert not set(BLOCKS) & set(SKIPPED)


def script(block: Block) -> str:
    """The Python program that runs ``block`` (and the blocks it continues) in one namespace."""
    chain, key = [block], BLOCKS[block.key].continues
    by_key = {b.key: b for b in BLOCK_LIST}
    while key is not None:
        assert key[0] == block.file and key in by_key and by_key[key].line < chain[0].line, (
            f"{block.key} continues {key}: not an earlier block of the same page")
        chain.insert(0, by_key[key])
        key = BLOCKS[key].continues
    parts = []   # (name in tracebacks, source, line offset)
    for b in chain:
        run = BLOCKS[b.key]
        if run.preamble:
            parts.append((f"<preamble of {b.where}>", textwrap.dedent(run.preamble), 0))
        parts.append((b.where, b.code, b.line - 1))   # line numbers in tracebacks are the page's own
    if BLOCKS[block.key].epilogue:
        parts.append((f"<epilogue of {block.where}>", textwrap.dedent(BLOCKS[block.key].epilogue), 0))
    lines = ["import sys", "namespace = {'__name__': '__main__'}"]
    for name, source, offset in parts:
        lines.append(f"exec(compile({chr(10) * offset + source!r}, {name!r}, 'exec'), namespace)")
    return "\n".join(lines) + "\n"


def _block_id(b: Block) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{b.file.removesuffix('.md')}_L{b.line}_{b.heading}").strip("_")


@pytest.mark.parametrize("block", [b for b in BLOCK_LIST if b.key not in SKIPPED], ids=_block_id)
def test_python_block_runs_as_written(block, tmp_path):
    if block.key not in BLOCKS:
        pytest.fail(f"{block.where} [{block.heading}] is not covered: see test_every_python_block_is_covered")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    (tmp_path / "block.py").write_text(script(block))
    done = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    output = (done.stdout + done.stderr)[-6000:]
    if block.key in KNOWN_BROKEN:
        needle, reason = KNOWN_BROKEN[block.key]
        assert done.returncode != 0, f"{block.where} now runs: remove its KNOWN_BROKEN entry in tests/test_readme.py"
        assert needle in output, f"{block.where} fails otherwise than known ({needle!r}):\n{output}"
        pytest.xfail(f"{block.where}: {reason}")
    assert done.returncode == 0, f"{block.where} [{block.heading}] failed:\n{output}"


# --- links -----------------------------------------------------------------------------------------

# Pages a link may name before they exist: path -> who writes them. A listed page that exists is
# checked like any other.
PENDING: dict[str, str] = {}

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())   # a link's text only
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings (a repeated heading's second anchor gets "-1", and so on)."""
    found, counts = set(), {}
    for _, line, fence in _lines_outside_fences(text):
        if fence is None and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            n = counts[base] = counts.get(base, -1) + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every markdown link and image outside code fences and inline code."""
    found = []
    for number, line, fence in _lines_outside_fences(text):
        if fence is None:
            prose = re.sub(r"(`+).*?\1", "", line)
            found += [(number, m.group(1)) for m in LINK.finditer(prose)]
    return found


def test_link_checker_reads_links_and_anchors():
    text = "# A `jlora.bank` page: QLoRA (issue 13, 2026-12-01)\n## Twice\n## Twice\n```bash\n# not a heading\n```\n"
    assert anchors(text) == {"a-jlorabank-page-qlora-issue-13-2026-12-01", "twice", "twice-1"}
    assert links("see [a](x.md#b), ![img](p.png) and `[c](not.md)`\n```\n[d](no.md)\n```\n") == [
        (1, "x.md#b"), (1, "p.png")]


@pytest.mark.parametrize("page", LINKED, ids=rel)
def test_relative_links_resolve(page):
    bad = []
    for line, target in links(page.read_text()):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("//"):
            continue   # http(s):, mailto: ...: not checked here
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        where = f"{rel(page)}:{line}: ({target})"
        if not dest.is_relative_to(ROOT):
            bad.append(f"{where} points outside the repository")
        elif not dest.exists():
            if rel(dest) not in PENDING:
                bad.append(f"{where} no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest.read_text()):
            bad.append(f"{where} no heading with that anchor in {rel(dest)}")
    assert not bad, "broken relative links:\n" + "\n".join(bad)
