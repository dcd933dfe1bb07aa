"""Checkpoints with orbax: async saves, max_to_keep, sharded restore; works on local paths and gs://.

A checkpoint holds the train state (trainable params, optimizer state, step; frozen base weights are
re-loaded from their source, not duplicated) and a JSON `meta` item with the RNG seed, the data position and
the skip counters. orbax writes to a temporary directory and renames on success, so a crash or SIGKILL
mid-save never corrupts the last good checkpoint.

`load_run_model` / `restore_trainable` read only the trainable weights of a run's checkpoint (a partial restore,
no optimizer state), so any run's student can be evaluated or used as a teacher.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from opd_jax.config.schema import LoRAConfig, ModelConfig
from opd_jax.errors import CheckpointError
from opd_jax.train_state import LoadedModel, TrainState, load_model, tree_shardings


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

    def restore(self, abstract_state: TrainState, step: int | None = None, *, fallback: bool = False
                ) -> tuple[TrainState, dict, int]:
        """Restore into the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`, or arrays): `step`,
        else the latest. Returns (state with `frozen` taken from abstract_state, meta, step).

        A checkpoint that cannot be read (a truncated data file, a deleted manifest) raises `CheckpointError`
        naming its step and the newest intact one; with `fallback=True` (no explicit `step`) that one is restored
        instead, with a printed warning."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"checkpoint.resume_step={step}: no such checkpoint under {self.directory} "
                                      f"(steps: {sorted(steps) or 'none'})")
            try:
                return self._restore_step(abstract_state, step)
            except Exception as e:  # noqa: BLE001 - any read failure means a damaged checkpoint
                raise CheckpointError(f"checkpoint step {step} under {self.directory} is damaged or unreadable "
                                      f"({_first_line(e)})") from e
        if not steps:
            raise CheckpointError(f"no checkpoint found under {self.directory}")
        try:
            return self._restore_step(abstract_state, steps[0])
        except Exception as e:  # noqa: BLE001
            damaged = f"checkpoint step {steps[0]} under {self.directory} is damaged or unreadable ({_first_line(e)})"
            cause = e
        for older in steps[1:]:
            try:
                out = self._restore_step(abstract_state, older)
            except Exception:  # noqa: BLE001 - damaged too: keep looking
                continue
            if fallback:
                print(f"warning: {damaged}; resuming from step {older}, the newest intact checkpoint")
                return out
            raise CheckpointError(
                f"{damaged}. The newest intact checkpoint is step {older}.",
                hint=f"resume from it with checkpoint.resume_step={older} (or checkpoint.fallback_to_intact=true); "
                     f"the damaged step {steps[0]} is left as it is") from cause
        raise CheckpointError(f"{damaged}, and no older checkpoint is intact either (steps {sorted(steps)})",
                              hint="start over with overwrite=true (the old run is kept, renamed)") from cause

    def _restore_step(self, abstract_state: TrainState, step: int) -> tuple[TrainState, dict, int]:
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _saveable(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


# ---- partial restores: the trainable weights of a run ------------------------------------------------------------
def restore_trainable(checkpoint_dir: str, trainable, t_axes: dict, mesh: Mesh,
                      step: int | None = None) -> tuple[dict, int]:
    """Load only `trainable` (not the optimizer state) of a `Checkpointer` checkpoint into the shardings of
    `t_axes`; `trainable` gives the shapes and dtypes (arrays or ShapeDtypeStructs). Returns (trainable, step).

    The optimizer config of the run that wrote the checkpoint does not matter (its moments are never read)."""
    if "://" not in str(checkpoint_dir):  # orbax wants absolute local paths (`Checkpointer` does the same)
        checkpoint_dir = os.path.abspath(checkpoint_dir)
    path = epath.Path(checkpoint_dir)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint directory {checkpoint_dir}")
    shardings = tree_shardings(mesh, t_axes, trainable)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainable, shardings)
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found under {checkpoint_dir}")
        tree = {"trainable": target}
        restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True)))
    return out["state"]["trainable"], int(step)


def has_checkpoint(checkpoint_dir: str) -> bool:
    path = epath.Path(checkpoint_dir)
    return path.exists() and any(p.name.isdigit() for p in path.iterdir())


def load_run_model(model_cfg: ModelConfig, run_dir: str | None, *, seed: int, mesh: Mesh,
                   lora: LoRAConfig | None = None, step: int | None = None) -> tuple[LoadedModel, int | None]:
    """`train_state.load_model`, then the trainable weights of `run_dir`'s latest (or `step`'s) checkpoint when
    it has one. Returns (LoadedModel, checkpoint step or None). LoRA runs: pass the run's `lora` config (adapters
    are the checkpointed part; the base comes from `model_cfg.hf_path`)."""
    model = load_model(model_cfg, seed=seed, mesh=mesh, lora=lora)
    ckpt_dir = os.path.join(run_dir, "checkpoints") if run_dir else None
    if ckpt_dir is None or not has_checkpoint(ckpt_dir):
        if step is not None:
            raise FileNotFoundError(f"no checkpoints under {run_dir} (asked for step {step})")
        return model, None
    model.trainable, step = restore_trainable(ckpt_dir, model.trainable, model.t_axes, mesh, step)
    return model, step
