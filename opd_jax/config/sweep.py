"""Sweep files: one base config crossed with grids and zipped lists of overrides.

    name: example                 # optional; default: the file name without .yaml
    base: ../base.yaml            # relative to this file
    run_dir: runs/example         # optional root of the runs; default runs/<name>
    overrides: {steps: 50}        # applied to every run
    grid: {loss.kl_penalty_coef: [0.5, 1.0], optim.learning_rate: [1e-4, 3e-4]}   # cartesian product
    zip: {student.hidden_size: [64, 128], student.intermediate_size: [128, 256]}  # zipped, then crossed

Each run is expressed as `key=value` strings on top of the base file, so `SweepRun.command()` reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
import shlex
from typing import Any

from opd_jax.config.loader import ConfigError, _join, _read_yaml_dict, load_config
from opd_jax.config.schema import ExperimentConfig

_SWEEP_KEYS = ("name", "base", "run_dir", "overrides", "grid", "zip")
_MAX_SLUG = 150


@dataclasses.dataclass
class SweepRun:
    name: str  # "<sweep>/<key=value,...>"
    config: ExperimentConfig
    overrides: list[str]  # applied on top of `base`, in order; run_dir included
    base: str  # the config file the overrides apply to

    def command(self, extra: list[str] | tuple[str, ...] = ()) -> str:
        """The `opd-jax train` command of this run; `extra` overrides go last (e.g. resume=auto)."""
        return shlex.join(["opd-jax", "train", self.base, *self.overrides, *extra])


def _fmt_float(v: float) -> str:
    """Readable exact spelling: 1e-4 rather than 0.0001, but 0.5 and 100.0 as they are."""
    text = repr(v)
    mantissa, exp = f"{v:.15e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    sci = f"{mantissa}e{int(exp)}"
    use_sci = (abs(v) < 1e-2 or abs(v) >= 1e4) and len(sci) < len(text) and float(sci) == v
    return sci if use_sci else text


def _fmt_value(v: Any) -> str:
    """A value as a command-line override that the loader reads back to the same value."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)  # true / false / null
    if isinstance(v, float):
        return _fmt_float(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))  # JSON is YAML
    return str(v)


def _slug_value(v: Any) -> str:
    if isinstance(v, list):
        return "+".join(_slug_value(x) for x in v)
    return _fmt_value(v).replace('"', "")


def _safe(text: str) -> str:
    """Filesystem- and shell-friendly: anything unusual becomes '_'; very long names keep a hash for uniqueness."""
    text = re.sub(r"[^A-Za-z0-9._=,+\-]", "_", text)
    if len(text) > _MAX_SLUG:
        text = text[: _MAX_SLUG - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return text


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Swept keys named by their last part (`learning_rate`) unless two would clash; then the full path."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _mapping(spec: dict, key: str, path: str) -> dict:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{key}' must be a mapping of dotted keys, got {type(value).__name__}")
    return value


def _value_lists(spec: dict, key: str, path: str) -> dict[str, list]:
    value = _mapping(spec, key, path)
    if key in spec and not value:  # `grid: {}` would silently be one run, like an empty list of values
        raise ConfigError(f"{path}: '{key}' is empty: give it at least one dotted key with a list of values, or drop "
                          "it")
    for k, vals in value.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{path}: {key}.{k} must be a non-empty list of values, got {vals!r}")
    return value


def expand_sweep(path: str) -> list[SweepRun]:
    """The concrete runs of sweep file `path` (grid product × zipped lists), each with a validated config."""
    path = str(path)
    spec = _read_yaml_dict(path)
    for key in spec:
        if key not in _SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), _SWEEP_KEYS, n=1)
            hint = f" — did you mean {close[0]!r}?" if close else f" (valid: {', '.join(_SWEEP_KEYS)})"
            raise ConfigError(f"{path}: unknown sweep key {key!r}{hint}")
    if not isinstance(spec.get("base"), str):
        raise ConfigError(f"{path}: 'base' (the config file to sweep over, relative to the sweep) is required")
    base = _join(path, spec["base"])
    name = _safe(str(spec.get("name") or os.path.splitext(os.path.basename(path))[0]))
    root = str(spec.get("run_dir") or f"runs/{name}").rstrip("/")

    fixed = _mapping(spec, "overrides", path)
    grid = _value_lists(spec, "grid", path)
    zipped = _value_lists(spec, "zip", path)
    if len({len(v) for v in zipped.values()}) > 1:
        lengths = ", ".join(f"{k}: {len(v)}" for k, v in zipped.items())
        raise ConfigError(f"{path}: the lists under 'zip' must have equal lengths ({lengths})")
    for (a, da), (b, db) in itertools.combinations([("overrides", fixed), ("grid", grid), ("zip", zipped)], 2):
        if both := sorted(set(da) & set(db)):
            raise ConfigError(f"{path}: {both} set in both '{a}' and '{b}'")
    if "run_dir" in fixed:
        raise ConfigError(f"{path}: set the sweep's root with a top-level 'run_dir', not in 'overrides'")

    short = _short_keys([*grid, *zipped])
    pins_run_dir = "run_dir" in short
    zip_rows = list(zip(*zipped.values(), strict=True)) if zipped else [()]
    runs, seen = [], set()
    for grid_row, zip_row in itertools.product(itertools.product(*grid.values()), zip_rows):
        swept = [*zip(grid, grid_row, strict=True), *zip(zipped, zip_row, strict=True)]
        slug = _safe(",".join(f"{short[k]}={_slug_value(v)}" for k, v in swept)) or "base"
        if slug in seen:  # values that differ only in unsafe characters
            slug = _safe(f"{slug}-{len(runs)}")
        seen.add(slug)
        overrides = [f"{k}={_fmt_value(v)}" for k, v in [*fixed.items(), *swept]]
        if not pins_run_dir:
            overrides.append(f"run_dir={root}/{slug}")
        try:
            cfg = load_config(base, overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: run {slug!r}: {e}") from None
        runs.append(SweepRun(name=f"{name}/{slug}", config=cfg, overrides=overrides, base=base))
    return runs
