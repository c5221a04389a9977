"""orbax adapter checkpoints: contents, keep-N, mesh change, wrong base, and kill -9 mid-save + resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import jlora
from jlora.checkpoint import AdapterCheckpointer

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from problem import CONFIG, batch_for, setup  # noqa: E402


def trained(steps=2):
    params, trainable, frozen, loss_fn, tx = setup()
    step = jlora.make_train_step(loss_fn, tx, donate=False)
    opt_state = tx.init(trainable)
    for s in range(steps):
        trainable, opt_state, _ = step(trainable, opt_state, frozen, batch_for(s))
    return params, trainable, opt_state, tx


def test_saves_only_adapters_keeps_n_and_restores_exactly(tmp_path):
    params, trainable, opt_state, _ = trained()
    with AdapterCheckpointer(tmp_path, CONFIG, params, max_to_keep=2) as ckpt:
        for step in range(4):
            ckpt.save(step, trainable, opt_state, metrics={"loss": 0.5})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        meta = ckpt.read_meta()
        assert meta["step"] == 3 and meta["metrics"] == {"loss": 0.5}
        assert jlora.LoraConfig.from_dict(meta["config"]) == CONFIG
        step, restored, restored_opt = ckpt.restore(trainable, opt_state)
        saved = ckpt.manager.item_metadata(3)["state"]["trainable"]
    assert step == 3
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, trainable)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored_opt, opt_state)
    shapes = jax.tree_util.tree_map(lambda m: tuple(m.shape), saved)
    assert shapes == {"params": {"fc1": {"lora_a": (16, 4), "lora_b": (4, 64)},
                                 "fc2": {"lora_a": (64, 4), "lora_b": (4, 64)},
                                 "head": {"bias": (8,), "kernel": (64, 8)}}}  # no frozen fc kernels or biases


def test_restore_onto_a_different_mesh(tmp_path):
    params, trainable, opt_state, tx = trained()
    with AdapterCheckpointer(tmp_path, CONFIG, params) as ckpt:
        ckpt.save(1, trainable, opt_state)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    _, _, frozen, _, _ = setup()
    specs = {"params": {"fc1": {"kernel": P(None, "model")}, "fc2": {"kernel": P("model", None)}}}
    shardings = jlora.plan_shardings(mesh, params, specs, trainable, frozen, tx, CONFIG)
    with AdapterCheckpointer(tmp_path, CONFIG, params) as ckpt:
        _, restored, restored_opt = ckpt.restore(trainable, opt_state,
                                                 shardings=(shardings.trainable, shardings.opt_state))
    assert restored["params"]["fc1"]["lora_b"].sharding.spec == P(None, "model")
    assert restored["params"]["fc2"]["lora_a"].sharding.spec == P("model", None)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, trainable)


def test_restoring_onto_another_base_or_config_is_an_error(tmp_path):
    params, trainable, opt_state, _ = trained()
    with AdapterCheckpointer(tmp_path, CONFIG, params) as ckpt:
        ckpt.save(0, trainable, opt_state)
    other = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    with pytest.raises(ValueError, match=r"checkpoint step 0 .* was made for another base model"):
        AdapterCheckpointer(tmp_path, CONFIG, other).restore(trainable, opt_state)
    other_config = jlora.LoraConfig(r=8, target_modules=("fc1", "fc2"), modules_to_save=("head",))
    with pytest.raises(ValueError, match=r"checkpoint step 0 was made with LoraConfig\(r=4"):
        AdapterCheckpointer(tmp_path, other_config, params).restore(trainable, opt_state)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint"):
        AdapterCheckpointer(tmp_path / "empty", CONFIG, params).restore(trainable, opt_state)


def losses(log):
    out = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["step"], []).append(record["loss"])
    return out


def test_kill_9_mid_save_then_resume_continues_the_loss_sequence(tmp_path):
    steps, kill_at = 8, 4
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    worker = [sys.executable, str(WORKERS / "resume_worker.py")]
    subprocess.run([*worker, str(tmp_path / "reference"), str(steps), str(tmp_path / "reference.jsonl")],
                   check=True, env=env, timeout=300)

    marker = tmp_path / "saving"
    proc = subprocess.Popen([*worker, str(tmp_path / "ckpt"), str(steps), str(tmp_path / "run.jsonl"),
                             str(kill_at), str(marker)], env=env)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert marker.exists(), "worker never reached the save to interrupt"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert complete and max(complete) <= kill_at

    resumed = subprocess.run([*worker, str(tmp_path / "ckpt"), str(steps), str(tmp_path / "run.jsonl")],
                             env=env, timeout=300, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    restored_from = int(resumed.stdout.split("resumed from step ")[1].split()[0])
    assert restored_from in (kill_at - 1, kill_at)  # the save in flight may or may not have finished
    reference, run = losses(tmp_path / "reference.jsonl"), losses(tmp_path / "run.jsonl")
    assert sorted(run) == list(range(steps))
    for step, values in run.items():
        assert all(v == reference[step][0] for v in values), (step, values, reference[step])
