"""Running the ``jlora`` command in tests: one call, or a run interrupted with Ctrl-C (SIGINT)."""
import json
import os
import re
import signal
import subprocess
import sys


def jlora_cli(*args, timeout=900):
    """``python -m jlora.app.cli ARGS``, its output captured."""
    return subprocess.run([sys.executable, "-m", "jlora.app.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def interrupt_after(line_prefix, *args, timeout=300):
    """Run ``jlora ARGS`` and send it SIGINT as soon as it prints a line starting with ``line_prefix``;
    returns ``(exit status, everything it printed)``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "jlora.app.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_prefix):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=timeout)[0]
    return proc.returncode, "".join(seen) + rest


def logged_losses(run):
    """``{step: loss}`` of a run folder's metrics.jsonl."""
    return {r["step"]: r.get("loss") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def check_ctrl_c_then_resume(flags, tmp_path, line_prefix):
    """A straight ``jlora finetune FLAGS`` run; the same run interrupted when it prints ``line_prefix``
    (it must save a checkpoint and exit 130), then ``--resume``d: both must log the same losses."""
    straight = jlora_cli("finetune", "--out", tmp_path / "straight", *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    status, printed = interrupt_after(line_prefix, "finetune", "--out", tmp_path / "cut", *flags)
    assert status == 130 and "checkpoint saved" in printed, printed
    resumed = jlora_cli("finetune", "--out", tmp_path / "cut", "--resume", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resumed after step \d+ \(checkpoints/\d+ in ", resumed.stdout), resumed.stdout
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "straight")
