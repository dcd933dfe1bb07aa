"""Checkpoints with orbax: async saves, max_to_keep, sharded restore; works on local paths and gs://.

A checkpoint holds the train state (trainable params, optimizer state, step; frozen base weights are
re-loaded from their source, not duplicated) and a JSON `meta` item with the RNG seed, the data position and
the skip counters. orbax writes to a temporary directory and renames on success, so a crash or SIGKILL
mid-save never corrupts the last good checkpoint.

`load_run_model` / `restore_trainable` read only the trainable weights of a run's checkpoint (a partial restore,
no optimizer state), so any run's student can be evaluated or used as a teacher.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from opd_jax.config.schema import LoRAConfig, ModelConfig
from opd_jax.errors import CheckpointError
from opd_jax.train_state import LoadedModel, TrainState, load_model, tree_shardings


def _from_orbax(tb) -> bool:
    """Whether a traceback runs through orbax's own code."""
    while tb is not None:
        if f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _quiet_orbax_background_errors() -> None:
    """orbax writes in background threads, coroutines and tensorstore callbacks. A failed write raises in the caller
    (`Checkpointer.save` / `wait` turn it into one CheckpointError line), and orbax *also* reports it many times over:
    its threads' excepthook, absl ERROR logs with tracebacks, asyncio's "exception was never retrieved" log, and
    "Event loop is closed" from every abandoned coroutine and callback. Those echoes of an error that is reported
    are dropped (the error reaches the caller). Everything else passes through; OPD_JAX_DEBUG=1 keeps it all.
    Installed once per process."""
    if getattr(_quiet_orbax_background_errors, "done", False) or os.environ.get("OPD_JAX_DEBUG", "") not in ("", "0"):
        return
    _quiet_orbax_background_errors.done = True
    thread_hook, unraisable_hook, except_hook = threading.excepthook, sys.unraisablehook, sys.excepthook

    def closed_loop(e: BaseException | None) -> bool:
        # tensorstore's callbacks into an event loop orbax already closed: printed before the failed write has even
        # reached the caller
        return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"

    def on_thread_error(args):
        if not _from_orbax(args.exc_traceback):
            thread_hook(args)

    def on_unraisable(u):
        if not ((isinstance(u.exc_value, (RuntimeError, ImportError)) and _from_orbax(u.exc_traceback))
                or closed_loop(u.exc_value)):
            unraisable_hook(u)

    def on_exception(kind, value, tb):  # PyErr_Print from a C++ callback thread ends here too
        if not closed_loop(value):
            except_hook(kind, value, tb)

    threading.excepthook, sys.unraisablehook, sys.excepthook = on_thread_error, on_unraisable, on_exception
    logging.getLogger("asyncio").addFilter(
        lambda record: not ("never retrieved" in record.getMessage() and "orbax" in record.getMessage()))
    # orbax's write coroutines abandoned by the failed write, collected at interpreter exit ("sys:1: RuntimeWarning:
    # coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited")
    warnings.filterwarnings("ignore", message=r"coroutine 'async_serialize\w*[.<]", category=RuntimeWarning)
    logging.getLogger("absl").addFilter(
        lambda record: not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname))


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        _quiet_orbax_background_errors()
        if "://" not in str(directory):  # orbax wants absolute local paths; configs may say runs/x
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )
        self._last_save_step: int | None = None  # the step of the save `wait` waits for

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: dict, *, force: bool = False) -> bool:
        """Start a (possibly async) save of the trainable state and the meta dict. Collective on all hosts.
        A write that fails (a full disk, a quota) raises CheckpointError naming the step and the reason, with the
        half-written temporary directory removed; the checkpoints before it stay intact."""
        self._last_save_step = step
        self._check_space(state, step)
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_saveable(state)),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=force,
            )
        except Exception as e:  # noqa: BLE001 - orbax reports I/O failures as ValueError / OSError / RuntimeError
            raise self._write_failed(step, e) from e
        return bool(saved)

    def _check_space(self, state: TrainState, step: int) -> None:
        """On a local disk: refuse a save that cannot fit in the free space, before anything is written."""
        if "://" in str(self.directory) or not self.directory.exists():
            return
        need = sum(int(x.addressable_data(0).nbytes) * len(x.addressable_shards) if hasattr(x, "addressable_shards")
                   else int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(_saveable(state)))
        free = shutil.disk_usage(str(self.directory)).free
        if need > free:
            raise CheckpointError(
                f"could not write checkpoint step {step} under {self.directory}: it needs about {need / 2**30:.2f} GiB "
                f"and the disk has {free / 2**30:.2f} GiB free",
                hint="free space on that disk (or give the run a larger one), then resume=true continues from "
                     + (f"step {self.latest_step()}" if self.latest_step() is not None else "the start"))

    def _write_failed(self, step: int | None, e: BaseException) -> CheckpointError:
        removed = []
        if jax.process_index() == 0 and self.directory.exists():
            for p in self.directory.iterdir():
                if ".orbax-checkpoint-tmp" in p.name:
                    p.rmtree() if p.is_dir() else p.unlink()
                    removed.append(p.name)
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        found = re.search(r"Failed to write [^:]*: ([^\[\n]+?)\s*\[os_error_code", str(e))
        reason = found.group(1) if found else _first_line(e)
        intact = [s for s in self.manager.all_steps() if s != step]
        return CheckpointError(
            f"could not write {what} under {self.directory}: {reason}"
            + (f" (removed the partial {', '.join(removed)})" if removed else ""),
            hint="free space on that disk (or give the run a larger one), then resume=true continues from "
                 + (f"step {max(intact)}, the newest intact checkpoint" if intact else "the start"))

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
        """Wait for an async save to finish; a failed one raises CheckpointError (as `save` does)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_failed(getattr(self, "_last_save_step", None), e) from e

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
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()}) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found under {checkpoint_dir}")
        _check_shapes(mgr, step, target, checkpoint_dir)
        tree = {"trainable": target}
        restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True)))
    return out["state"]["trainable"], int(step)


def _check_shapes(mgr: ocp.CheckpointManager, step: int, target: dict, checkpoint_dir: str) -> None:
    """Before reading any array: every trainable tensor the config's model has is in the checkpoint with the same
    shape. Raises CheckpointError naming the first tensor that differs (or is missing) and both shapes."""
    try:
        stored = mgr.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored)["trainable"]
    except Exception:  # noqa: BLE001 - no readable metadata: the restore itself reports the damage
        return
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    have = {name(p): getattr(x, "shape", None) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for p, x in jax.tree_util.tree_flatten_with_path(target)[0]:
        tensor = "trainable/" + name(p)
        if tensor[len("trainable/"):] not in have:
            raise CheckpointError(f"checkpoint step {step} under {checkpoint_dir} has no tensor {tensor}: the model "
                                  "config is not the one of the run that wrote it (its config.yaml)")
        if tuple(have[name(p)]) != tuple(x.shape):
            raise CheckpointError(f"checkpoint step {step} under {checkpoint_dir}: tensor {tensor} is "
                                  f"{tuple(have[name(p)])} there, the config's model wants {tuple(x.shape)}: the model "
                                  "fields must match the run that wrote it (its config.yaml)")


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
