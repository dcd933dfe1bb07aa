"""JAX's persistent compilation cache for runs: a restarted or repeated run loads its step program instead of
compiling it again (seconds for the tiny configs, minutes for real models on a pod).

`compilation_cache` in the config: "auto" (the default) uses `$OPD_JAX_COMPILATION_CACHE`, else
`$XDG_CACHE_HOME/opd_jax/xla` (else `~/.cache/opd_jax/xla`); any other string is the directory (a `gs://` path works
on a pod, as JAX supports it); "" turns the cache off. `CacheCounter` counts JAX's own cache hit and miss events
(`jax.monitoring`), so the log can say whether the step program came from the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

HIT, MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def cache_dir(setting: str) -> str | None:
    """The directory a `compilation_cache` setting names (None: off)."""
    if not setting:
        return None
    if setting != "auto":
        return setting
    env = os.environ.get("OPD_JAX_COMPILATION_CACHE")
    if env is not None:
        return env or None
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opd_jax" / "xla")


class CacheCounter:
    """Counts the persistent cache's hits and misses from JAX's monitoring events (process-wide, from creation)."""

    _installed = False
    hits = 0
    misses = 0

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return

        def listener(event: str, **kwargs) -> None:
            if event == HIT:
                cls.hits += 1
            elif event == MISS:
                cls.misses += 1

        jax.monitoring.register_event_listener(listener)
        cls._installed = True

    @classmethod
    def snapshot(cls) -> tuple[int, int]:
        return cls.hits, cls.misses


def enable(setting: str, min_compile_seconds: float = 1.0) -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir(setting)` (programs that take at least
    `min_compile_seconds` to compile are cached). Returns the directory, or None when off. Call before the first
    compile; a directory already set by the user (`jax_compilation_cache_dir`) is kept."""
    path = cache_dir(setting)
    CacheCounter.install()
    if path is None:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and current != path:
        return current
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path


__all__ = ["cache_dir", "enable", "CacheCounter"]
