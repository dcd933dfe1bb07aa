"""Walking traced programs in tests: every equation of a jaxpr and of its sub-jaxprs."""

from __future__ import annotations

from collections.abc import Iterator

import jax


def walk(jaxpr: jax.extend.core.Jaxpr) -> Iterator[jax.extend.core.JaxprEqn]:
    """Every equation of a jaxpr and of all its sub-jaxprs (loops, conds, remat, custom derivatives), except inside
    a Pallas kernel (device code: its loops run on the GPU, not in XLA's control flow)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from walk(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from walk(sub)
