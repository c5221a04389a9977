"""``jlora serve``: one base LLM, many LoRA adapters, concurrent requests batched into one generate call.

    jlora serve --model smollm2 --adapter headlines=runs/h --adapter section=runs/c/adapter --port 8000

HTTP API (JSON in, JSON out; the standard library's ``ThreadingHTTPServer``, one thread per client):

* ``POST /generate`` ``{"prompt": str, "adapter": name | null, "max_new_tokens": int}`` ->
  ``{"completion": str, "tokens": [int], "adapter": name | null}``. ``adapter`` null (or absent):
  the base model. The prompt is tokenized as the fine-tuning data was (``jlora.app.sft_data``).
* ``GET /adapters`` -> the loaded adapters (name, slot, rank, kernels) and the free slots.
* ``POST /adapters`` ``{"name": str, "path": PEFT folder or jlora run folder}`` -> 201: loaded into
  a free slot of the bank, at run time, without a restart or a recompilation.
* ``DELETE /adapters/NAME`` -> its slot emptied. ``GET /health``, ``GET /stats`` (requests, batches,
  compilations of the sampler).

Batching: a worker thread takes the first waiting request, gathers more for up to
``batch_wait_ms`` (or until ``max_batch``), and runs them as one :func:`jlora.generate` call over the
:class:`jlora.bank.AdapterBank`, each row with its own adapter. Shapes are fixed per prompt-length
bucket (rows padded to a power of two from 4 to ``max_batch``, prompts left-padded to a power of two
from 16 to ``max_prompt_tokens``, ``max_new_tokens`` the server's), so the sampler compiles once per
bucket, and adding, replacing or deleting adapters never recompiles.

Bad requests get a 4xx with ``{"error": message}`` and the server keeps serving: malformed JSON,
wrong fields (400), unknown adapter or path (404), a prompt longer than ``max_prompt_tokens`` (413),
an adapter name taken or no free slot (409), a method an endpoint does not take (405, with the allowed
ones in ``Allow``; PUT, PATCH, HEAD, ... included). A client that hangs up is dropped quietly.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

MAX_BODY = 1 << 20


class RequestError(ValueError):
    """A client error: its HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class ServeOptions:
    model: str = "smollm2"
    adapters: tuple[tuple[str, str], ...] = ()  # (name, folder)
    slots: int = 16
    rank: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_prompt_tokens: int = 256
    max_new_tokens: int = 64
    batch_wait_ms: float = 20.0
    dtype: str = "auto"  # the base's computation and storage dtype (jlora.precision.resolve_dtype)


def adapter_folder(path: str | Path) -> Path:
    """A PEFT folder (``adapter_config.json``) or a ``jlora finetune`` run folder holding one in ``adapter/``."""
    path = Path(path)
    for folder in (path, path / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise FileNotFoundError(f"{path}: no adapter_config.json there nor in {path / 'adapter'}; expected a PEFT "
                            "adapter folder or a jlora finetune run folder")


@dataclasses.dataclass
class _Job:
    ids: list[int]
    adapter: str | None  # resolved to its slot when its batch runs: a deleted or replaced adapter is seen
    max_new_tokens: int
    future: Future


class AdapterServer:
    """The bank of adapters over one loaded model, and the worker that batches generate calls."""

    def __init__(self, lm: Any, options: ServeOptions):
        import jlora
        from jlora import bank as jb
        self.lm, self.options, self.jb = lm, options, jb
        from jlora.hf import load_peft
        limit = getattr(lm.model.config, "max_position_embeddings", None)
        if limit is not None and options.max_prompt_tokens + options.max_new_tokens > limit:
            raise RequestError(400, f"--max-prompt-tokens ({options.max_prompt_tokens}) + --max-new-tokens "
                                    f"({options.max_new_tokens}) exceeds the model's {limit} positions")
        cover = jlora.LoraConfig(r=options.rank, lora_alpha=options.rank, target_modules=options.targets)
        names = [name for name, _ in options.adapters]
        if len(set(names)) != len(names):
            raise RequestError(400, f"adapter names must differ, got {names}")
        loaded = [load_peft(adapter_folder(path), lm.model) for _, path in options.adapters]
        rank = max([options.rank] + [t.rank for lora, config in loaded
                                     for t in jlora.make_plan(lm.params, config, lora=lora).values()])
        # the bank covers the start adapters' kernels and --targets, at the largest of their ranks and --rank
        self.bank = jb.stack(loaded, lm.params, size=options.slots, rank=rank, cover=cover, model=lm.model)
        self.names: dict[str, int] = {name: slot for slot, name in enumerate(names)}
        self.lock = threading.Lock()           # guards bank, names and stats
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "rows": 0}
        self.eos = self._eos_ids()
        self.worker = threading.Thread(target=self._run, name="jlora-serve-batcher", daemon=True)
        self.worker.start()

    # --- adapters ---------------------------------------------------------------------------
    def add(self, name: str, path: str | Path) -> int:
        """Load the PEFT adapter at ``path`` into a free slot as ``name``; returns the slot."""
        from jlora.hf import load_peft
        if not isinstance(name, str) or not name or "/" in name:
            raise RequestError(400, f"adapter name must be a non-empty string without '/', got {name!r}")
        try:
            folder = adapter_folder(path)
        except FileNotFoundError as err:
            raise RequestError(404, str(err)) from None
        with self.lock:
            if name in self.names:
                raise RequestError(409, f"an adapter named {name!r} is loaded already (slot {self.names[name]}); "
                                        f"DELETE /adapters/{name} first")
            free = sorted(set(range(self.bank.size)) - set(self.names.values()))
            if not free:
                raise RequestError(409, f"all {self.bank.size} slots are taken ({sorted(self.names)}); delete one "
                                        "or start the server with more --slots")
            try:
                lora, config = load_peft(folder, self.lm.model)
                self.bank = self.jb.put(self.bank, free[0], lora, config, self.lm.params, model=self.lm.model)
            except (ValueError, TypeError, KeyError, OSError) as err:
                raise RequestError(400, f"adapter {name!r} at {folder}: {err}") from None
            self.names[name] = free[0]
            return free[0]

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.names:
                raise RequestError(404, f"unknown adapter {name!r}; loaded: {sorted(self.names)}")
            self.bank = self.jb.clear(self.bank, self.names.pop(name))

    def describe(self) -> dict[str, Any]:
        with self.lock:
            bank, names = self.bank, dict(self.names)
        rows = []
        for name, slot in sorted(names.items(), key=lambda kv: kv[1]):
            ranks = {rec.path: int(np.asarray(self.jb._leaf(bank.ranks, rec.module_key))[slot]) for rec in bank.targets}
            used = {p: r for p, r in ranks.items() if r}
            rows.append({"name": name, "slot": slot, "rank": max(used.values(), default=0), "kernels": len(used)})
        return {"adapters": rows, "free_slots": bank.size - len(names), "bank_rank": bank.rank,
                "dtype": getattr(self.lm, "dtype", "float32"),
                "kernels": [rec.path for rec in bank.targets]}

    # --- generation -------------------------------------------------------------------------
    def submit(self, prompt: Any, adapter: Any, max_new_tokens: Any) -> Future:
        """Check a request and queue it; the future gives ``(tokens, completion)``."""
        from jlora.app.sft_data import _prompt_ids
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, f"'prompt' must be a non-empty string, got {prompt!r:.80}")
        if max_new_tokens is None:
            max_new_tokens = self.options.max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                not 1 <= max_new_tokens <= self.options.max_new_tokens:
            raise RequestError(400, f"'max_new_tokens' must be an int in [1, {self.options.max_new_tokens}], got "
                                    f"{max_new_tokens!r}")
        if adapter is not None and not isinstance(adapter, str):
            raise RequestError(400, f"'adapter' must be an adapter's name (a string) or null, got {adapter!r:.80}")
        with self.lock:
            if adapter is not None and adapter not in self.names:
                raise RequestError(404, f"unknown adapter {adapter!r}; loaded: {sorted(self.names)} (null: the base)")
        ids = _prompt_ids(self.lm.tokenizer, prompt)
        if len(ids) > self.options.max_prompt_tokens:
            raise RequestError(413, f"the prompt is {len(ids)} tokens; this server takes at most "
                                    f"{self.options.max_prompt_tokens} (--max-prompt-tokens)")
        job = _Job(ids, adapter, max_new_tokens, Future())
        with self.lock:
            self.stats["requests"] += 1
        self.jobs.put(job)
        return job.future

    def _eos_ids(self) -> tuple[int, ...]:
        eos = getattr(self.lm.model.config, "eos_token_id", None)
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        tok_eos = getattr(self.lm.tokenizer, "eos_token_id", None)
        return tuple(sorted(set(eos) | ({tok_eos} if tok_eos is not None else set())))

    def _take_batch(self) -> list[_Job] | None:
        first = self.jobs.get()
        if first is None:
            return None
        batch, deadline = [first], time.monotonic() + self.options.batch_wait_ms / 1000
        while len(batch) < self.options.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            with self.lock:  # the bank and each job's slot, as one consistent snapshot
                bank, slots = self.bank, [self.names.get(job.adapter, -2) if job.adapter else -1 for job in batch]
            for job, slot in zip(batch, slots):
                if slot == -2:
                    job.future.set_exception(RequestError(404, f"adapter {job.adapter!r} was deleted while the "
                                                               "request waited"))
            batch, slots = [j for j, s in zip(batch, slots) if s != -2], [s for s in slots if s != -2]
            if not batch:
                continue
            try:
                results = self.generate_batch(batch, bank, slots)
            except Exception as err:  # noqa: BLE001  (reported to each waiting client; the server keeps serving)
                for job in batch:
                    job.future.set_exception(err)
                continue
            for job, result in zip(batch, results):
                job.future.set_result(result)

    def generate_batch(self, batch: list[_Job], bank: Any, slots: list[int]) -> list[tuple[list[int], str]]:
        """One generate call for ``batch``: rows and prompt length padded to powers of two (a few shapes)."""
        from jlora.generate import generate
        pad = self.lm.tokenizer.pad_token_id or 0
        rows = _bucket(len(batch), self.options.max_batch, smallest=4)
        length = _bucket(max(len(job.ids) for job in batch), self.options.max_prompt_tokens, smallest=16)
        ids = np.full((rows, length), pad, np.int32)
        mask = np.zeros((rows, length), np.int32)
        ids[:, -1], mask[:, -1] = pad, 1          # idle rows: one token, the base model
        adapter_ids = np.full(rows, -1, np.int32)
        for row, (job, slot) in enumerate(zip(batch, slots)):
            ids[row, length - len(job.ids):] = job.ids
            mask[row, length - len(job.ids):] = 1
            adapter_ids[row] = slot
        tokens = np.asarray(generate(self.lm.model, self.lm.params, ids, prompt_mask=mask,
                                     max_new_tokens=self.options.max_new_tokens, bank=bank, adapter_ids=adapter_ids,
                                     eos_token_id=self.eos or None, pad_token_id=pad))
        with self.lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
        out = []
        for row, job in enumerate(batch):
            new = [int(t) for t in tokens[row, :job.max_new_tokens]]
            if any(t in self.eos for t in new):
                new = new[:min(new.index(t) for t in self.eos if t in new)]
            out.append((new, self.lm.tokenizer.decode(new, skip_special_tokens=True)))
        return out

    def compilations(self) -> int:
        from jlora.generate import BANKED, _compiled
        return int(_compiled(self.lm.model, BANKED)._cache_size())

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=60)


def _bucket(n: int, limit: int, smallest: int) -> int:
    """The smallest power of two >= ``n`` (at least ``smallest``), capped at ``limit``."""
    size = smallest
    while size < n:
        size *= 2
    return max(n, min(size, limit))
