"""One of two processes that checksum and save arrays sharded across both (not fully addressable).

    python checkpoint_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT CKPT_DIR OUT_JSON

Every array of the problem's trainable tree and optimizer state is split over the 4 devices of
both processes along its first axis where that divides (else replicated), checksummed with
``array_checksum`` and saved with ``AdapterCheckpointer``; the base fingerprint is taken of the
base params both as given and sharded the same way. Process 0 writes the results to OUT_JSON.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from problem import CONFIG, setup  # noqa: E402

from jlora.checkpoint import AdapterCheckpointer, array_checksum, base_fingerprint  # noqa: E402


def main() -> None:
    process_id, num_processes, port, ckpt_dir, out = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                                      sys.argv[4], sys.argv[5])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))

    def spread(x):
        value = np.asarray(x)
        spec = P("data") if value.ndim and value.shape[0] % jax.device_count() == 0 else P()
        return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index: value[index])

    params, trainable, _, _, tx = setup()
    trainable, opt_state = jax.tree_util.tree_map(spread, (trainable, tx.init(trainable)))
    sharded_params = jax.tree_util.tree_map(spread, params)
    leaves = jax.tree_util.tree_flatten_with_path({"trainable": trainable, "opt_state": opt_state})[0]
    checksums = {jax.tree_util.keystr(path): array_checksum(leaf) for path, leaf in leaves}
    addressable = [leaf.is_fully_addressable for _, leaf in leaves]
    fingerprints = [base_fingerprint(params), base_fingerprint(sharded_params)]
    with AdapterCheckpointer(ckpt_dir, CONFIG, sharded_params) as checkpointer:
        checkpointer.save(3, trainable, opt_state, metrics={"loss": 1.5})
    if process_id == 0:
        with open(out, "w") as fh:
            json.dump({"checksums": checksums, "fingerprints": fingerprints, "processes": jax.process_count(),
                       "any_fully_addressable": any(addressable)}, fh)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
