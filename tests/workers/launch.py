"""Start N worker processes of one ``jax.distributed`` job on 127.0.0.1 and wait for them."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(script: Path, *args: object, processes: int = 2, timeout: int = 300) -> list[str]:
    """Run ``script PROCESS_ID N PORT *args`` in ``processes`` processes (without the 8-fake-device
    XLA_FLAGS of the test process); raise with their output unless all exit 0. Returns their logs."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(processes), str(port), *map(str, args)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs
