"""Test setup: 8 fake CPU devices (set before jax is imported), float32 matmuls at full precision."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The default set (.ci/constraints.txt: Python 3.12, today's jax/flax; the README's test command) has
# no torch or peft: no CPU build of torch 2.13.0 exists for Python 3.12 on the registry, only a
# CUDA build of GBs. There, tests that need them are skipped with the reason, never errors:
# a module that imports them at the top is skipped whole, and the tests below that need torch only
# in a subprocess are skipped by name, and a test that imports them inside is skipped when it does.
# With torch and peft installed (the lowest set, Python 3.11) nothing is skipped, and CI runs that
# set with JLORA_TESTS=lowest: torch and peft must import (else the run stops: a missing peer must
# not pass as skips), and the app's own tests and the README/docs blocks that need no torch
# (APP_ONLY), which the default set already ran, are deselected for time.
import importlib.util  # noqa: E402

import pytest  # noqa: E402

OPTIONAL = ("torch", "peft")
NEEDS_TORCH = {  # node id (prefix) -> what needs torch
    "test_hf_transformers5.py": "transformers 5 loads the exports in PyTorch",
    "test_scripts.py::test_causal_lm_example": "the example checks PyTorch's generation against Flax",
    "test_scripts.py::test_adapter_bank_benchmark_quick": "the benchmark runs PEFT (in this interpreter)",
    # the benchmarks run their PEFT side in .venv-peft's interpreter where it exists (benchmarks/setup-peft.sh),
    # and need no torch here then; else in this one (tests/test_scripts.py: peft_python)
    **({} if os.path.exists(os.path.join(os.path.dirname(__file__), "..", ".venv-peft", "bin", "python")) else {
        "test_scripts.py::test_compare_peft_runner_on_a_tiny_config": "the benchmark runs PEFT",
        "test_scripts.py::test_main_job_step_benchmark_on_a_tiny_bert": "the benchmark runs PEFT",
        "test_scripts.py::test_sft_step_benchmark_on_a_tiny_config": "the benchmark runs PEFT"}),
}


class _SkipWithoutOptional(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as error:
            cause = error.__cause__
            if isinstance(cause, ModuleNotFoundError) and cause.name in OPTIONAL:
                pytest.skip(f"{self.path.name} imports {cause.name}, which is not installed", allow_module_level=True)
            raise


def pytest_pycollect_makemodule(module_path, parent):
    return _SkipWithoutOptional.from_parent(parent, path=module_path)


# run in the default set only (the README's own): the app, and the README's and docs' blocks (test_readme.py)
APP_ONLY = ("test_cli.py", "test_cli_causal_lm.py", "test_serve.py", "test_scripts.py", "test_readme.py")


def _needs_torch(node: str) -> bool:
    return any(node.startswith(prefix) for prefix in NEEDS_TORCH)


def pytest_configure(config):
    mode = os.environ.get("JLORA_TESTS", "")
    if mode not in ("", "lowest"):
        raise pytest.UsageError(f"JLORA_TESTS: expected 'lowest' or unset, got {mode!r}")
    if mode == "lowest":
        missing = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
        if missing:
            raise pytest.UsageError(f"JLORA_TESTS=lowest runs the PEFT/torch parity tests, but {missing} "
                                    "cannot be imported: install the lowest set (bash scripts/setup.sh test --lowest)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("JLORA_TESTS") == "lowest":
        keep = [item for item in items if not item.nodeid.split("/")[-1].startswith(APP_ONLY)
                or _needs_torch(item.nodeid.split("/")[-1])]
        if len(keep) < len(items):
            config.hook.pytest_deselected(items=[item for item in items if item not in keep])
            items[:] = keep
        return
    if importlib.util.find_spec("torch") is not None:
        return
    for item in items:
        node = item.nodeid.split("/")[-1]
        for prefix, why in NEEDS_TORCH.items():
            if node.startswith(prefix):
                item.add_marker(pytest.mark.skip(reason=f"torch is not installed: {why}"))


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    try:
        return (yield)
    except ModuleNotFoundError as error:
        if error.name in OPTIONAL and importlib.util.find_spec(error.name) is None:
            pytest.skip(f"{pyfuncitem.name} imports {error.name}, which is not installed")
        raise
