"""Subprocess entry point of `tests/test_multihost.py`: `opd-jax train CONFIG [key=value ...]` with the test
suite's JAX settings (exact fp32 matmuls, as `conftest.py` sets in-process, and an optional persistent compilation
cache shared by the runs of one test session).

The caller sets the platform and device count in the environment (`JAX_PLATFORMS=cpu`,
`XLA_FLAGS=--xla_force_host_platform_device_count=N`) and, for a multi-process run, passes
`distributed.coordinator_address=localhost:PORT distributed.num_processes=P distributed.process_id=I`.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    cache = os.environ.get("OPD_TEST_COMPILATION_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    from opd_jax.cli import main as cli_main

    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
