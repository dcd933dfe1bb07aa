"""Checkpoints with orbax: async saves, max_to_keep, sharded restore; works on local paths and gs://.

A checkpoint holds the train state (trainable params, optimizer state, step; frozen base weights are
re-loaded from their source, not duplicated) and a JSON `meta` item with the RNG seed, the data position and
the skip counters. orbax writes to a temporary directory and renames on success, so a crash or SIGKILL
mid-save never corrupts the last good checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from opd_jax.train_state import TrainState


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        if "://" not in str(directory):  # orbax wants absolute local paths; configs may say runs/x
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> bool:
        """Start a (possibly async) save of the trainable state and the meta dict. Collective on all hosts."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saveable(state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        return bool(saved)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict, int]:
        """Restore into the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`, or arrays).
        Returns (state with `frozen` taken from abstract_state, meta, step)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found under {self.directory}")
        target = jax.tree.map(_abstract, _saveable(abstract_state))
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        restored = out["state"]
        state = TrainState(step=restored["step"], trainable=restored["trainable"], frozen=abstract_state.frozen,
                           opt_state=restored["opt_state"])
        return state, dict(out["meta"]), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _saveable(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
