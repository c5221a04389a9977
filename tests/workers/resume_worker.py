"""Train with an adapter checkpoint every step; resume from the latest complete one if present.

    python resume_worker.py CKPT_DIR STEPS LOSS_LOG [KILL_MARKER_STEP MARKER_FILE]

Appends ``{"step": s, "loss": ...}`` lines to LOSS_LOG (flushed and fsynced). With
KILL_MARKER_STEP, after *starting* the async save of that step it writes MARKER_FILE and sleeps,
for the test to SIGKILL it in the middle of the save.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from problem import CONFIG, batch_for, setup  # noqa: E402

import jlora  # noqa: E402
from jlora.checkpoint import AdapterCheckpointer  # noqa: E402


def main() -> None:
    ckpt_dir, steps, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    kill_step = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    params, trainable, frozen, loss_fn, tx = setup()
    opt_state = tx.init(trainable)
    step_fn = jlora.make_train_step(loss_fn, tx, donate=False)
    checkpointer = AdapterCheckpointer(ckpt_dir, CONFIG, params, max_to_keep=2)
    start = 0
    if checkpointer.latest_step() is not None:
        done, trainable, opt_state = checkpointer.restore(trainable, opt_state)
        start = done + 1
        print(f"resumed from step {done}", flush=True)
    with open(log_path, "a") as log:
        for step in range(start, steps):
            trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch_for(step))
            log.write(json.dumps({"step": step, "loss": float(loss)}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            checkpointer.save(step, trainable, opt_state, metrics={"loss": float(loss)})
            if step == kill_step:
                with open(sys.argv[5], "w") as marker:
                    marker.write(str(step))
                time.sleep(600)
    checkpointer.close()


if __name__ == "__main__":
    main()
