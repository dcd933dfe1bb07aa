"""Run the miniature's training runs side by side: a pool of worker processes, and threads here that walk each
stage's dependencies and hand every run to the pool.

Why processes: one run of these small models keeps about 1.4 of this machine's 2 cores busy (the decode loop is
mostly serial), so two runs at once finish in about 1.15x the time of one: 1.5-1.8x the throughput (measured on
the 2-core CI host: two 30-step OPD runs took 29 s each side by side, 25.5 s alone). Results do not change with
the worker count: each run is one process's deterministic program, and the 2-worker curves were checked equal to
the 1-worker ones. `workers <= 1` runs everything inline, in this process.

Jobs are module-level functions with picklable arguments (dataclasses, paths, lists). A worker starts by `spawn`
(a fresh interpreter: never a fork of a process that has initialised JAX), inherits this process's environment
(`OPD_CHAINS_RESULTS`, `OPD_JAX_CACHE`, `XLA_FLAGS`) and sets the miniature's JAX defaults once
(`setup.quiet_jax`), then runs job after job.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def _init_worker() -> None:
    from opd_jax.miniature.setup import quiet_jax

    quiet_jax()


class Jobs:
    """`call(fn, *args)` runs `fn` in a worker process and returns its result (blocking the calling thread);
    `start(fn, *args)` runs `fn` in a thread of this process (a chain of `call`s that depend on each other) and
    returns its future. A job's exception is raised again by `call` (and by `Future.result()` of its chain).

    workers: worker processes (>= 2), or 0 / 1 for no pool (every `call` runs inline, `start` runs at once)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_init_worker) if workers > 1 else None)
        self._threads = ThreadPoolExecutor(max_workers=256, thread_name_prefix="chain") if workers > 1 else None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._pool is None:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def start(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future:
        if self._threads is None:
            f: Future = Future()
            try:
                f.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future, like a thread's
                f.set_exception(e)
            return f
        return self._threads.submit(fn, *args, **kwargs)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_all(futures: list[Future]) -> list:
    """Every future's result, in order, after all of them finished; the first failure is raised then (so one
    stage's error does not abandon the others' runs half way)."""
    from concurrent.futures import wait

    wait(futures)
    return [f.result() for f in futures]
