"""Two long-lived worker processes, one per side, alternated by one driver: the protocol.

The jlora side and the PEFT side of a benchmark need different interpreters (jax >= 0.11 needs
Python >= 3.12; the only CPU torch wheel here is for 3.11), so each runs in a worker of its own
(``jlora_worker.py``, ``peft_worker.py``) and a driver (``main_job_step.py``, ``sft_step.py``,
``compare_peft.py``) starts both, tells them what to build, and times them in turns. This module
imports neither jax nor torch: the driver and both workers use it.

Protocol: one JSON object per line. The driver writes ``{"op": NAME, ...}`` to a worker's stdin;
the worker answers one line ``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "traceback": ...}``
on the stdout it was started with (everything its libraries print goes to its stderr, which is the
driver's). Ops every worker has (:func:`serve`): ``time`` (``name``, ``steps``: the seconds of each
of ``steps`` calls of a built run, and the process CPU time at the start and the end), ``machine``
(:func:`machine.machine_info` of the worker's own interpreter), ``rss`` (its peak RSS), ``quit``.
Each side adds ``build`` (a step of a workload in a dtype), ``probe`` (a large matmul in a dtype)
and ``memory`` (what one run holds). Weights and batches travel as files (an HF folder with
PyTorch-named safetensors, ``.npz`` arrays) that the jlora worker writes and the PEFT worker reads.

:func:`alternate` is :func:`timing.alternate` across processes: rounds of turns, one turn = ``steps``
calls of one run in its worker, the order rotated each round, ``pause`` seconds of sleep before each
turn, so that the threads of the side that just ran (OpenMP's and XLA's pools spin-wait a while
after their work) are idle again before the other side starts; that idle CPU is measured per side.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class WorkerError(RuntimeError):
    """A worker answered ``ok: false`` or died."""


# ---------------------------------------------------------------- worker side

def timed_calls(run: Callable[[], Any], steps: int, sync: Callable[[Any], Any]) -> list[float]:
    """Seconds of each of ``steps`` calls of ``run``, ``sync`` waiting for each result."""
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(run())
        out.append(time.perf_counter() - start)
    return out


def peak_rss_mib() -> float | None:
    """VmHWM of this process (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def serve(ops: dict[str, Callable[..., dict]], runs: dict[str, Callable[[], Any]],
          sync: Callable[[Any], Any] = lambda x: x) -> None:
    """The worker's loop: answer each command line on stdin until ``quit`` or end of input.

    ``ops``: the side's own ops (``build``, ``probe``, ``memory``), each called with the command's
    other fields as keywords and returning a dict; they add what they build to ``runs``
    (name -> a zero-argument call), which ``time`` times with ``sync`` waiting for each result."""
    reply_to = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print, Python or C, goes to stderr, never into the protocol
    sys.stdout = sys.stderr

    def time_op(name: str, steps: int) -> dict:
        cpu_start = time.process_time()
        seconds = timed_calls(runs[name], steps, sync)
        return {"seconds": seconds, "cpu_start": cpu_start, "cpu_end": time.process_time()}

    def machine_op() -> dict:
        from machine import machine_info
        return {"info": machine_info()}
    every = {"time": time_op, "machine": machine_op, "rss": lambda: {"peak_rss_mib": peak_rss_mib()},
             "ping": lambda: {"pid": os.getpid(), "python": sys.version.split()[0], "executable": sys.executable}}
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            reply_to.write(json.dumps({"ok": True}) + "\n")
            break
        try:
            answer = {"ok": True, **(every.get(op) or ops[op])(**command)}
        except Exception as error:  # noqa: BLE001 -- sent to the driver, which raises it
            answer = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        reply_to.write(json.dumps(answer, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    """numpy scalars and arrays, paths and sets in answers."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    return str(x)


# ---------------------------------------------------------------- driver side

class Worker:
    """One worker process: ``python script`` with stdin/stdout pipes; :meth:`call` sends one command."""

    def __init__(self, side: str, python: str | os.PathLike, script: str, env: dict[str, str] | None = None):
        self.side, self.python, self.script = side, str(python), script
        if not Path(self.python).exists() and os.sep in self.python:
            raise SystemExit(f"the {side} side's interpreter {self.python} does not exist"
                             + (" (make it with: bash benchmarks/setup-peft.sh)" if side == "peft" else ""))
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), *(p for p in [full_env.get("PYTHONPATH")] if p)])
        self.proc = subprocess.Popen([self.python, "-u", str(HERE / script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=full_env)
        self.pid = self.proc.pid
        self.last_cpu_end: float | None = None
        self.idle_cpu_s = 0.0  # CPU this process took between its turns (spin-waiting threads)
        self.hello = self.call("ping")

    def call(self, op: str, **fields: Any) -> dict:
        if self.proc.poll() is not None:
            raise WorkerError(f"the {self.side} worker ({self.python}) has exited with status {self.proc.returncode}")
        self.proc.stdin.write(json.dumps({"op": op, **fields}, default=_jsonable) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise WorkerError(f"the {self.side} worker ({self.python} {self.script}) died during {op!r} "
                              f"(exit status {self.proc.returncode}; its stderr is above)")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise WorkerError(f"the {self.side} worker failed in {op!r}: {answer['error']}\n{answer['traceback']}")
        return answer

    def time(self, name: str, steps: int) -> list[float]:
        answer = self.call("time", name=name, steps=steps)
        if self.last_cpu_end is not None:
            self.idle_cpu_s += answer["cpu_start"] - self.last_cpu_end
        self.last_cpu_end = answer["cpu_end"]
        return answer["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
                self.proc.wait(timeout=60)
            except (WorkerError, OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def alternate(turns: dict[str, tuple[Worker, str]], rounds: int, steps: int, warmup: int = 2, pause: float = 1.0,
              sample_load: Callable[[], Any] | None = None,
              before_round: Callable[[], Any] | None = None) -> dict[str, Any]:
    """:func:`timing.alternate` over workers: ``turns`` maps a name to ``(worker, run name in it)``.

    First ``warmup`` calls of each (the first one's seconds kept in ``first_s``), then ``rounds`` rounds,
    each a turn of ``steps`` timed calls of every run, the order rotated by one each round, ``pause``
    seconds of sleep before every turn. The seconds are taken inside the worker, around each call.
    Returns the same record as :func:`timing.alternate` (so ``timing.paired`` / ``round_medians`` read
    it) plus ``"idle_cpu_s"``: per worker side, the CPU it took between its turns over the rounds."""
    first = {}
    for name, (worker, run) in turns.items():
        time.sleep(pause)
        first[name] = worker.time(run, max(warmup, 1))[0]
    workers = {id(w): w for w, _ in turns.values()}
    for w in workers.values():
        w.idle_cpu_s, w.last_cpu_end = 0.0, None
    names = list(turns)
    out: dict[str, Any] = {"first_s": first, "rounds": [], "order": [], "load": [], "before": [], "pause_s": pause}
    for i in range(rounds):
        if before_round:
            out["before"].append(before_round())
        if sample_load:
            sample_load()  # this round's interval starts here
        order = names[i % len(names):] + names[:i % len(names)]
        times: dict[str, list[float]] = {}
        for name in order:
            time.sleep(pause)
            worker, run = turns[name]
            times[name] = worker.time(run, steps)
        out["rounds"].append({name: times[name] for name in names})
        out["order"].append(order)
        if sample_load:
            out["load"].append(sample_load())
    out["idle_cpu_s"] = {w.side: w.idle_cpu_s for w in workers.values()}
    return out


def python_of(path: str | None) -> str:
    """An interpreter given on the command line: the current one when None."""
    return sys.executable if not path else path
