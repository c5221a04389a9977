"""Test setup: 8 fake CPU devices (set before jax is imported), float32 matmuls at full precision."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The "newest" tested set (.ci/run, .ci/constraints-newest.txt: Python 3.12, today's jax/flax) has
# no torch or peft: no CPU build of torch 2.13.0 exists for Python 3.12 on the registry, only a
# CUDA build of GBs. There, tests that need them are skipped with the reason, never errors:
# a module that imports them at the top is skipped whole, and the tests below that need torch only
# in a subprocess are skipped by name, and a test that imports them inside is skipped when it does.
# With torch and peft installed (the pinned set) nothing changes.
import importlib.util  # noqa: E402

import pytest  # noqa: E402

OPTIONAL = ("torch", "peft")
NEEDS_TORCH = {  # node id (prefix) -> what needs torch
    "test_hf_transformers5.py": "transformers 5 loads the exports in PyTorch",
    "test_scripts.py::test_causal_lm_example": "the example checks PyTorch's generation against Flax",
    "test_scripts.py::test_compare_peft_runner_on_a_tiny_config": "the benchmark runs PEFT",
    "test_scripts.py::test_sft_step_benchmark_on_a_tiny_config": "the benchmark runs PEFT",
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


def pytest_collection_modifyitems(config, items):
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
