"""Test set-up: 8 fake CPU devices for mesh tests (must be set before JAX is imported) and exact fp32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: Hub ids resolve from a local cache or fail
# One persistent compilation cache for the session's trainers (`compilation_cache: auto` reads this): the same tiny
# programs compile once. Tests of the cache itself point it elsewhere.
os.environ.setdefault("OPD_JAX_COMPILATION_CACHE", os.path.join(
    __import__("tempfile").mkdtemp(prefix="opd_jax_test_xla_"), "xla"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still runs in CI)")


@pytest.fixture
def shared_data() -> str:
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared eval data not found at {path}")
    return path
