"""One process of a multi-host ``jlora finetune`` on 127.0.0.1 (2 CPU devices per process, gloo).

    python cli_worker.py PROCESS_ID NUM_PROCESSES PORT FINETUNE_FLAGS...
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

from jlora.app.cli import main  # noqa: E402

if __name__ == "__main__":
    process_id, processes, port, *flags = sys.argv[1:]
    sys.exit(main(["finetune", *flags, "--coordinator", f"127.0.0.1:{port}", "--num-processes", processes,
                   "--process-id", process_id]))
