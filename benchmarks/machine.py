"""What a benchmark result was measured on, and how busy the machine was while it ran.

Every timing in ``benchmarks/`` depends on the CPU (its model and the vector units it exposes: AVX2,
AVX-512, AMX), on how many cores and threads each framework gets, on the library versions, and on
what else runs on the box at the same time. :func:`machine_info` records the first three;
:class:`CpuLoad` measures the last, per timed interval, from ``/proc/stat``: the cores' busy time
minus this process's own CPU time is what *other* processes took (plus the hypervisor's steal time).
:func:`matmul_probes` gives one large float32 matmul in XLA and in torch, the practical FLOP/s limit
that the train steps are compared against in the same run.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable

#: cpuinfo flags that decide float32 / bf16 matmul speed
MATMUL_FLAGS = ("fma", "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
                "amx_int8", "amx_fp16")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS",
              "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "transformers", "torch", "peft", "jlora")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def cpu_info() -> dict[str, Any]:
    """Model name, family / model / stepping, matmul-relevant flags, logical CPUs (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model_name": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()}
    first: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            processors += 1
        first.setdefault(key, value.strip())
    flags = set(first.get("flags", "").split())
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"model_name": first.get("model name"), "vendor": first.get("vendor_id"),
            "family": first.get("cpu family"), "model": first.get("model"), "stepping": first.get("stepping"),
            "mhz": first.get("cpu MHz"), "cache": first.get("cache size"),
            "flags": {f: f in flags for f in MATMUL_FLAGS}, "hypervisor": "hypervisor" in flags,
            "logical_cpus": processors, "cores_per_socket": first.get("cpu cores"), "affinity_cpus": affinity}


def versions() -> dict[str, str | None]:
    import importlib.metadata as md
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def thread_settings() -> dict[str, Any]:
    """torch's intra-/inter-op threads and float32 matmul precision (if torch is imported), JAX's
    devices and matmul precision, and the thread-related environment. XLA:CPU sizes its intra-op
    pool by the CPUs this process may run on (``affinity_cpus`` of :func:`cpu_info`)."""
    import sys
    out: dict[str, Any] = {"env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ}}
    if "torch" in sys.modules:
        import torch
        out["torch"] = {"num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads(),
                        "float32_matmul_precision": torch.get_float32_matmul_precision(),
                        "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available(),
                        "parallel_backend": next((line.split(":", 1)[1].strip() for line in
                                                  torch.__config__.parallel_info().splitlines()
                                                  if line.startswith("ATen parallel backend")), None)}
    if "jax" in sys.modules:
        import jax
        out["jax"] = {"devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
                      "default_matmul_precision": jax.config.jax_default_matmul_precision}
    return out


def jlora_source() -> dict[str, Any] | None:
    """The git commit of the working tree the benchmark ran from, and whether jlora/ or benchmarks/
    had uncommitted changes."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jlora", "benchmarks"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "uncommitted": [line[3:] for line in dirty if line.strip()]}


def machine_info() -> dict[str, Any]:
    return {"cpu": cpu_info(), "threads": thread_settings(), "versions": versions(), "source": jlora_source(),
            "platform": platform.platform()}


def machine_line(info: dict[str, Any]) -> str:
    """One printable line: CPU model name and number, flags, cores, threads, versions."""
    cpu, th, v = info["cpu"], info["threads"], info["versions"]
    flags = " ".join(f for f, on in cpu.get("flags", {}).items() if on) or "n/a"
    torch_th = th.get("torch", {})
    return (f"machine: {cpu.get('model_name')} (family {cpu.get('family')} model {cpu.get('model')} stepping "
            f"{cpu.get('stepping')}, {cpu.get('mhz')} MHz), {cpu.get('logical_cpus')} logical CPUs "
            f"({cpu.get('affinity_cpus')} usable), flags: {flags}"
            f"{'; no AMX' if not any(on for f, on in cpu.get('flags', {}).items() if f.startswith('amx')) else ''}; "
            f"torch threads {torch_th.get('num_threads')} (interop {torch_th.get('num_interop_threads')}, "
            f"{torch_th.get('parallel_backend')}, fp32 matmul {torch_th.get('float32_matmul_precision')}), "
            f"XLA:CPU intra-op pool = {cpu.get('affinity_cpus')} CPUs; env {th['env'] or '{}'}; "
            + ", ".join(f"{k} {val}" for k, val in v.items())
            + (f" (git {info['source']['commit'][:10]}{', uncommitted changes' if info['source']['uncommitted'] else ''})"
               if info.get("source") else ""))


class CpuLoad:
    """``sample()`` returns the CPU time other processes (and the hypervisor's steal) took since the
    previous call, in cores: 1.0 on a 2-core box means one core's worth of competition. "Other" is
    all but this process and the processes ``pids`` (a driver's workers, :mod:`workers`)."""

    def __init__(self, pids: tuple[int, ...] | list[int] = ()) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.pids = tuple(pids)
        self._last = self._read()

    def _pid_cpu(self, pid: int) -> float:
        try:  # utime and stime: fields 14 and 15, counted after the ")" that closes the command name
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self.hz
        except (OSError, ValueError, IndexError):
            return 0.0

    def _read(self) -> tuple[float, float, float, float] | None:
        import time
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        t = os.times()
        return (time.perf_counter(), (user + nice + system + irq + softirq) / self.hz, steal / self.hz,
                t.user + t.system + sum(self._pid_cpu(pid) for pid in self.pids))

    def sample(self) -> dict[str, float] | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None:
            return None
        wall = max(now[0] - last[0], 1e-9)
        busy, steal, own = now[1] - last[1], now[2] - last[2], now[3] - last[3]
        return {"wall_s": wall, "own_cores": own / wall, "other_cores": max(busy - own, 0.0) / wall,
                "steal_cores": steal / wall}


def wait_quiet(below: float, max_wait_s: float, window_s: float = 1.0, pids: tuple[int, ...] = ()) -> dict[str, Any]:
    """Sleep in ``window_s`` windows until other processes (all but this one and ``pids``) took fewer
    than ``below`` cores over one window, or ``max_wait_s`` passed. Returns ``{"waited_s", "quiet",
    "other_cores"}`` (the last window's)."""
    import time
    start = time.perf_counter()
    load = CpuLoad(pids)
    while True:
        time.sleep(window_s)
        sample = load.sample()
        other = sample["other_cores"] if sample else 0.0
        waited = time.perf_counter() - start
        if other < below or waited >= max_wait_s:
            return {"waited_s": waited, "quiet": other < below, "other_cores": other}


def xla_matmul_probe(n: int, dtype: str = "float32") -> Callable[[], Any]:
    """One jitted ``(n, n) @ (n, n)`` matmul in XLA in ``dtype`` (``2 n^3`` FLOPs a call)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype) for _ in range(2))
    jmm = jax.jit(jnp.matmul).lower(a, b).compile()
    return lambda: jmm(a, b)


def torch_matmul_probe(n: int, dtype: str = "float32", threads: int | None = None) -> Callable[[], Any]:
    """One ``torch.mm`` of ``(n, n) @ (n, n)`` in ``dtype`` on ``threads`` threads (``2 n^3`` FLOPs)."""
    import numpy as np
    import torch
    if threads:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    ta, tb = (torch.from_numpy(rng.standard_normal((n, n), dtype=np.float32)).to(getattr(torch, dtype))
              for _ in range(2))
    out = torch.empty(n, n, dtype=ta.dtype)
    return lambda: torch.mm(ta, tb, out=out)


def matmul_probes(n: int, threads: int | None = None) -> tuple[dict[str, Callable[[], Any]], float]:
    """``({"xla_matmul": run, "torch_matmul": run}, flops)``: one jitted ``(n, n) @ (n, n)`` float32
    matmul in XLA, one ``torch.mm`` (on ``threads`` threads), and its ``2 n^3`` FLOPs."""
    return {"xla_matmul": xla_matmul_probe(n), "torch_matmul": torch_matmul_probe(n, threads=threads)}, 2.0 * n ** 3


def header_lines(result: dict[str, Any]) -> list[str]:
    """The machine and its load before/after, the first lines of a benchmark's printed table."""
    return [machine_line(result["machine"]["info"]),
            f"load (/proc/loadavg) before: {result['machine']['loadavg_before']}; after: "
            f"{result['machine']['loadavg_after']}"]


def md_row(name: str, cells: list[str]) -> str:
    """One markdown table row."""
    return f"| {name} | " + " | ".join(cells) + " |"
