"""Two real processes with jax.distributed on 127.0.0.1 train like one process (CPU, gloo)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import jlora

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from problem import batch_for, setup  # noqa: E402

STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    port, out = free_port(), tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKERS / "multihost_worker.py"), str(i), "2", str(port),
                               str(out), str(STEPS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    result = json.loads(out.read_text())
    assert (result["processes"], result["devices"]) == (2, 4)

    params, trainable, frozen, loss_fn, tx = setup()
    step = jlora.make_train_step(loss_fn, tx, donate=False)
    opt_state, losses = tx.init(trainable), []
    for s in range(STEPS):
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch_for(s))
        losses.append(float(loss))
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    for path, leaf in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        key = "/".join(str(k.key) for k in path)
        np.testing.assert_allclose(result["trainable"][key], leaf, rtol=1e-5, atol=1e-6)
