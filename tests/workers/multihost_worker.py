"""One process of a multi-host data-parallel LoRA run on 127.0.0.1 (CPU devices, gloo collectives).

    python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON STEPS

Each process has 2 CPU devices and feeds only its own half of every global batch
(``jax.make_array_from_process_local_data``); the mesh spans all processes' devices.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from problem import CONFIG, GLOBAL_BATCH, batch_for, setup  # noqa: E402

import jlora  # noqa: E402


def main() -> None:
    process_id, num_processes, port, out, steps = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                                   sys.argv[4], int(sys.argv[5]))
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    params, trainable, frozen, loss_fn, tx = setup()
    shardings = jlora.plan_shardings(mesh, params, {}, trainable, frozen, tx, CONFIG, batch_spec=P("data"))
    trainable, opt_state, frozen = shardings.place(trainable, tx.init(trainable), frozen)
    step_fn = jlora.make_train_step(loss_fn, tx, shardings)
    rows = GLOBAL_BATCH // jax.process_count()
    losses = []
    for step in range(steps):
        local = {k: np.asarray(v)[process_id * rows:(process_id + 1) * rows] for k, v in batch_for(step).items()}
        batch = {k: jax.make_array_from_process_local_data(shardings.batch, v) for k, v in local.items()}
        trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch)
        losses.append(float(multihost_utils.process_allgather(loss, tiled=True)))
    gathered = multihost_utils.process_allgather(trainable, tiled=True)
    if process_id == 0:
        flat = {"/".join(str(k.key) for k in path): np.asarray(leaf).tolist()
                for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]}
        with open(out, "w") as fh:
            json.dump({"losses": losses, "trainable": flat, "devices": jax.device_count(),
                       "processes": jax.process_count()}, fh)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
