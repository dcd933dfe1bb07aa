"""The reference of every config key, generated from the schema's dataclasses: dotted key, type, default and the
comment written beside the field in `schema.py` (or the class docstring's first line for a section).

`opd-jax train --help` prints it, and `docs/config.md` is this text (`python -m opd_jax.config.reference >
docs/config.md`; a test holds the committed file equal to it).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from functools import cache
from typing import Any

from opd_jax.config import schema
from opd_jax.config.loader import _hints, _strip_optional, _type_name
from opd_jax.config.schema import ExperimentConfig


@cache
def _field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the `# comment` on the field's line(s) in schema.py."""
    source = inspect.getsource(schema)
    lines = source.splitlines()
    out: dict[tuple[str, str], str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        prev_end = node.body[0].lineno - 1 if node.body else node.lineno
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                # comment lines just above the field, then a trailing comment on its line
                above = []
                for ln in range(stmt.lineno - 2, prev_end - 1, -1):
                    text = lines[ln].strip()
                    if not text.startswith("#"):
                        break
                    above.insert(0, text.lstrip("# ").strip())
                trailing = lines[stmt.end_lineno - 1].split("#", 1)
                text = " ".join(above + ([trailing[1].strip()] if len(trailing) > 1 else []))
                if text:
                    out[(node.name, stmt.target.id)] = text
            prev_end = stmt.end_lineno
    return out


def _default(cls: type, f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    comments = _field_comments()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _strip_optional(tp)
        key = f"{prefix}{f.name}"
        comment = comments.get((cls.__name__, f.name), "")
        if dataclasses.is_dataclass(inner):
            doc = (inner.__doc__ or "").strip().splitlines()
            rows.append((key, "section", "", comment or (doc[0] if doc else "")))
            rows += _rows(inner, f"{key}.")
        elif typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            elem = typing.get_args(inner)[0]
            rows.append((key, f"list of {elem.__name__}", f"{len(_default(cls, f) or [])} entries", comment))
            rows += _rows(elem, f"{key}.N.")
        else:
            value = _default(cls, f)
            rows.append((key, _type_name(tp), "null" if value is None else repr(value), comment))
    return rows


def schema_reference() -> str:
    """Every key of `ExperimentConfig`, one per line: `key  type  default  # comment`."""
    rows = _rows(ExperimentConfig)
    width = max(len(r[0]) for r in rows) + 2
    out = ["Config keys (YAML, or key=value overrides; `N` is a list index, e.g. teachers.0.model.preset):", ""]
    for key, tp, default, comment in rows:
        if tp == "section":
            out.append(f"{key}:" + (f"  # {comment}" if comment else ""))
            continue
        line = f"  {key:<{width}}{tp}" + (f" = {default}" if default else "")
        out.append(line + (f"  # {comment}" if comment else ""))
    return "\n".join(out) + "\n"


def markdown() -> str:
    """`docs/config.md`: the same reference as a page."""
    return ("# Config reference\n\nGenerated from `opd_jax/config/schema.py` by `python -m opd_jax.config.reference "
            "> docs/config.md` (`opd-jax train --help` prints the same). A test keeps this page equal to the "
            "schema.\n\n```text\n" + schema_reference() + "```\n")


if __name__ == "__main__":
    print(markdown(), end="")
