"""Load, validate, override and save `ExperimentConfig`s.

The dataclasses in `schema.py` are the schema. Configs travel as plain nested dicts/lists until the very end:
YAML layers (`extends:`) are deep-merged onto the schema defaults, `key=value` overrides are set by walking the
schema, `${...}` interpolations are resolved by OmegaConf, and only then `config_from_dict` type-checks every value
and builds the dataclasses. We use OmegaConf unstructured (for interpolation only) because its structured mode does
not support `Literal` fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import posixpath
import re
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opd_jax.config.presets import get_preset
from opd_jax.config.schema import ExperimentConfig, ModelConfig
from opd_jax.config.validate import validate
from opd_jax.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------------
# YAML parsing

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} {key_node.start_mark}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None


def _is_remote(path: str) -> bool:
    return "://" in path


def _read_text(path: str) -> str:
    if _is_remote(path):  # gs:// etc. through etils (installed with orbax)
        from etils import epath

        return epath.Path(path).read_text()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None


def _join(base_file: str, rel: str) -> str:
    """`rel` relative to the directory of `base_file` (absolute and remote paths are kept)."""
    if _is_remote(rel) or os.path.isabs(rel):
        return rel
    if _is_remote(base_file):
        scheme, rest = base_file.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), rel))}"
    return os.path.normpath(os.path.join(os.path.dirname(base_file), rel))


def _read_yaml_dict(path: str) -> dict:
    data = _yaml_load(_read_text(path), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Schema walking


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # schema.py uses `from __future__ import annotations`, so annotations are strings until evaluated here.
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed). A union of several types other than None stays a union (e.g.
    `int | Literal["auto"]`); `_convert` tries its arms in order."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional  # noqa: UP007
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    if _is_union(inner):
        name = " or ".join(_type_name(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is list:
        name = f"list[{_type_name(typing.get_args(inner)[0])}]"
    elif dataclasses.is_dataclass(inner):
        name = f"mapping ({inner.__name__})"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _all_paths(cls: type, prefix: str = "") -> list[str]:
    """Every field path under `cls`; list elements appear as index 0 (for 'did you mean')."""
    out = []
    for name, tp in _hints(cls).items():
        path = f"{prefix}{name}"
        out.append(path)
        inner, _ = _strip_optional(tp)
        if typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            out += _all_paths(typing.get_args(inner)[0], f"{path}.0.")
        elif dataclasses.is_dataclass(inner):
            out += _all_paths(inner, f"{path}.")
    return out


def _unknown_key(key: str, cls: type, prefix: str) -> ConfigError:
    valid = list(_hints(cls))
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    suggestions = [prefix + close[0]] if close else []
    if not suggestions:
        # The key may belong in another section, e.g. `learning_rate=` for `optim.learning_rate=`.
        paths = _all_paths(ExperimentConfig)
        leaves = {p.rsplit(".", 1)[-1] for p in paths}
        for leaf in difflib.get_close_matches(key, leaves, n=1, cutoff=0.8):
            suggestions = [p for p in paths if p.rsplit(".", 1)[-1] == leaf][:3]
    msg = f"unknown key {prefix + key!r}"
    if suggestions:
        return ConfigError(msg + " — did you mean " + " or ".join(repr(s) for s in suggestions) + "?")
    return ConfigError(msg + f" (valid keys{' under ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(valid)})")


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against type `tp` and build dataclasses; `path` names the key in errors."""
    inner, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise _type_error(path, tp, value)
    if _is_union(inner):
        for arm in typing.get_args(inner):
            try:
                return _convert(value, arm, path)
            except ConfigError:
                continue
        raise _type_error(path, tp, value)
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise _type_error(path, tp, value)
        hints = _hints(inner)
        kwargs = {}
        for key, sub in value.items():
            if key not in hints:
                raise _unknown_key(str(key), inner, f"{path}." if path else "")
            kwargs[key] = _convert(sub, hints[key], f"{path}.{key}" if path else key)
        return inner(**kwargs)
    origin = typing.get_origin(inner)
    if origin is Literal:
        allowed = typing.get_args(inner)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise ConfigError(f"{path}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        (elem,) = typing.get_args(inner)
        return [_convert(v, elem, f"{path}.{i}") for i, v in enumerate(value)]
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)  # ints are fine for float fields
    if inner in (int, str, bool) and type(value) is inner:
        return value
    raise _type_error(path, tp, value)


def _check_keys(data: Any, tp: Any, path: str, where: str) -> None:
    """Unknown keys in one YAML layer, reported with its file name (types are checked after merging)."""
    inner, _ = _strip_optional(tp)
    if dataclasses.is_dataclass(inner) and isinstance(data, dict):
        hints = _hints(inner)
        for key, sub in data.items():
            if key not in hints:
                raise ConfigError(f"{where}: {_unknown_key(str(key), inner, f'{path}.' if path else '')}")
            _check_keys(sub, hints[key], f"{path}.{key}" if path else key, where)
    elif typing.get_origin(inner) is list and isinstance(data, list):
        for i, sub in enumerate(data):
            _check_keys(sub, typing.get_args(inner)[0], f"{path}.{i}", where)


# ---------------------------------------------------------------------------------------------------------------------
# Dicts <-> configs


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Plain nested dicts/lists, as written to `config.yaml`."""
    return dataclasses.asdict(cfg)


def _resolve(d: dict) -> dict:
    """Resolve `${a.b}` interpolations (OmegaConf semantics) in a plain dict."""
    try:
        return OmegaConf.to_container(OmegaConf.create(d), resolve=True)
    except OmegaConfBaseException as e:
        where = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{where}: interpolation failed: {str(e).splitlines()[0]}") from None


def _paths(d: Any, prefix: str = "") -> set[str]:
    """Every dotted path set in a nested dict/list (list items by index), e.g. 'teachers.0.model.num_layers'."""
    out: set[str] = set()
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        path = f"{prefix}{k}"
        out.add(path)
        out |= _paths(v, path + ".")
    return out


# Explicit(prefix, key, value): whether a model field was set by the user (so a preset must not replace it).
Explicit = typing.Callable[[str, str, Any], bool]


def _expand_presets(d: dict, explicit: Explicit) -> None:
    """Fill every model section (`student`, `teachers.N.model`) that names a `preset` from the preset, except the
    fields the user set (`explicit`), whatever they equal; then `preset` is cleared, so the config (and the
    `config.yaml` a run writes) lists the dimensions that train and nothing resolves the preset twice. Unknown
    preset: ConfigError naming the field."""
    sections = [("student", d.get("student"))]
    sections += [(f"teachers.{i}.model", t.get("model")) for i, t in enumerate(d.get("teachers") or [])
                 if isinstance(t, dict)]
    for prefix, m in sections:
        if not isinstance(m, dict) or m.get("preset") is None:
            continue
        try:
            preset = get_preset(str(m["preset"]))
        except ValueError as e:
            raise ConfigError(f"{prefix}.preset: {e}") from None
        for key, value in preset.items():
            if not explicit(prefix, key, m.get(key)):
                m[key] = value
        m["preset"] = None


def config_from_dict(d: dict, explicit: Explicit | None = None) -> ExperimentConfig:
    """Validate a nested dict (partial is fine: missing keys take schema defaults) into an `ExperimentConfig`:
    types and keys against the schema, then values and pairs of values (`config.validate`). Model presets are
    expanded first (`_expand_presets`); a field counts as explicit when `explicit` says so, by default when `d`
    sets it."""
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a mapping, got {type(d).__name__}")
    if explicit is None:
        given = _paths(d)
        explicit = lambda prefix, key, value: f"{prefix}.{key}" in given  # noqa: E731
    d = _resolve(d)
    _expand_presets(d, explicit)
    return validate(_convert(d, ExperimentConfig, ""))


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists included) is replaced by `top`."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _layer_list(path: str, stack: tuple[str, ...] = ()) -> list[dict]:
    """The YAML layers of `path` in the order they apply: the files it `extends` (in order, recursively), then its
    own keys."""
    key = path if _is_remote(path) else os.path.realpath(path)
    if key in stack:
        chain = " -> ".join([*stack[stack.index(key) :], key])
        raise ConfigError(f"cycle in 'extends': {chain}")
    data = _read_yaml_dict(path)
    bases = data.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'extends' must be a path or a list of paths, got {bases!r}")
    _check_keys(data, ExperimentConfig, "", path)
    layers: list[dict] = []
    for base in bases:
        base_path = _join(path, base)
        try:
            layers += _layer_list(base_path, (*stack, key))
        except ConfigError as e:
            if str(e).startswith("config file not found"):
                raise ConfigError(f"{path}: extends: {base!r}: config file not found: {base_path} (paths in "
                                  "'extends' are relative to the file that names them)") from None
            raise
    return [*layers, data]


def _load_layers(path: str) -> dict:
    """One YAML file merged over the files it `extends`."""
    merged: dict = {}
    for layer in _layer_list(path):
        merged = _merge(merged, layer)
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# key=value overrides


def _is_stringish(tp: Any) -> bool:
    inner, _ = _strip_optional(tp)
    if typing.get_origin(inner) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(inner))
    return inner is str


def _parse_value(raw: str, tp: Any) -> Any:
    """A command-line value for a field of type `tp`: strings stay verbatim, everything else is read as YAML."""
    if "${" in raw:
        return raw  # interpolation, resolved later
    if _is_stringish(tp):
        return None if raw == "null" and _strip_optional(tp)[1] else raw  # `name=123` is the string '123'
    try:
        return yaml.load(raw, Loader=_Loader)
    except (yaml.YAMLError, ConfigError):
        return raw  # not YAML: keep the string so validation names the expected type


def _set_override(d: dict, key: str, raw: str) -> None:
    """Set dotted `key` in nested dict `d`, checking each part against the schema (lists take integer indices)."""
    parts = key.split(".")
    node: Any = d
    tp: Any = ExperimentConfig
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        inner, _ = _strip_optional(tp)
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(inner):
            hints = _hints(inner)
            if part not in hints:
                raise _unknown_key(part, inner, f"{prefix}." if prefix else "")
            tp = hints[part]
            if last:
                node[part] = _parse_value(raw, tp)
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = [] if typing.get_origin(_strip_optional(tp)[0]) is list else {}
                node = node[part]
        elif typing.get_origin(inner) is list:
            if not part.isdigit():
                raise ConfigError(f"{key}: {prefix!r} is a list; expected an integer index, got {part!r}")
            idx, tp = int(part), typing.get_args(inner)[0]
            if idx > len(node):
                raise ConfigError(f"{key}: index {idx} out of range for {prefix!r} (length {len(node)})")
            if idx == len(node):  # one past the end appends, e.g. a second teacher from the command line
                elem = _strip_optional(tp)[0]
                node.append(dataclasses.asdict(elem()) if dataclasses.is_dataclass(elem) else None)
            if last:
                node[idx] = _parse_value(raw, tp)
            else:
                node = node[idx]
        else:
            raise ConfigError(f"{key}: {prefix!r} is a {_type_name(tp)}, it has no key {part!r}")


def _apply_to_dict(d: dict, overrides: Iterable[str]) -> dict:
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, not one string")
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_override(d, key, raw)
    return d


def _override_keys(overrides: Iterable[str]) -> list[str]:
    return [item.partition("=")[0].strip() for item in overrides]


def apply_overrides(cfg: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    """A new config with dotted `key=value` overrides applied, e.g. `optim.learning_rate=1e-4`. A `preset` set here
    fills every field of its model not overridden here; a preset already in `cfg` (built in Python, never
    expanded) keeps the fields that differ from the `ModelConfig()` defaults."""
    overrides = list(overrides) if not isinstance(overrides, str) else overrides
    keys = set(_override_keys(overrides)) if not isinstance(overrides, str) else set()
    defaults = ModelConfig()

    def explicit(prefix: str, key: str, value: Any) -> bool:
        if f"{prefix}.{key}" in keys:
            return True
        if f"{prefix}.preset" in keys:
            return False
        return value != getattr(defaults, key)

    return config_from_dict(_apply_to_dict(config_to_dict(cfg), overrides), explicit)


def load_config(path: str | None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """The config in YAML file `path` (None: schema defaults), with its `extends` chain and `overrides` applied.

    Later layers win: a base file, then each file that extends it, then the overrides in order. A model's `preset`
    expands where it is set: the fields set in that layer or a later one win over it, whatever they equal, and the
    fields set only in earlier layers give way to it (`student.preset=bench-3m` on the command line replaces the
    YAML's dimensions, `student.num_layers=2` after it keeps 2)."""
    overrides = list(overrides) if not isinstance(overrides, str) else overrides
    d = config_to_dict(ExperimentConfig())
    rank: dict[str, int] = {}  # dotted path -> the last layer that set it
    layers = _layer_list(str(path)) if path is not None else []
    for i, layer in enumerate(layers):
        d = _merge(d, layer)
        rank.update({p: i for p in _paths(layer)})
    d = _apply_to_dict(d, overrides)
    rank.update({k: len(layers) + i for i, k in enumerate(_override_keys(overrides))})
    return config_from_dict(
        d, lambda prefix, key, value: rank.get(f"{prefix}.{key}", -1) >= rank.get(f"{prefix}.preset", 0))


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: ExperimentConfig, run_dir: str | None = None) -> str:
    """Write the resolved config to `<run_dir>/config.yaml` (default `cfg.run_dir`); returns the file path."""
    run_dir = str(run_dir if run_dir is not None else cfg.run_dir)
    text = to_yaml(cfg)
    if _is_remote(run_dir):
        from etils import epath

        path = epath.Path(run_dir) / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
