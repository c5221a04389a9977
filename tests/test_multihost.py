"""Two real processes with jax.distributed on 127.0.0.1 train like one process (CPU, gloo)."""
import json
import sys
from pathlib import Path

import jax
import numpy as np

import jlora

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from launch import run_workers  # noqa: E402
from problem import batch_for, setup  # noqa: E402

STEPS = 3


def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "result.json"
    run_workers(WORKERS / "multihost_worker.py", out, STEPS)
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
