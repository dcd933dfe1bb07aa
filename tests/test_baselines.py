"""Baselines on the synthetic task, on CPU: SFT (loss drops, checkpoints, resumable data), GRPO-style RL in both
modes (in-program reward = the fused step; host reward = sample / grade / update as two programs, checked equal
to the fused step), `opd-jax eval` end to end on a checkpoint, and teacher-sample SFT rows.

Compiles are kept few: one SFT run (module fixture) serves the SFT, eval and teacher-sample tests; the two RL
modes run 2 steps each on the same config.
"""

from __future__ import annotations

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from opd_jax.baselines import rl as rl_mod
from opd_jax.baselines.rl import HostRewardRLTrainer, check_rl_config, make_rl_trainer
from opd_jax.baselines.sft import (
    ListSFTSource,
    SFTBatch,
    SFTTrainer,
    length_buckets,
    pack_rows,
    sft_step,
    teacher_sft_examples,
)
from opd_jax.checkpoint import load_run_model
from opd_jax.config import config_from_dict
from opd_jax.data.synthetic import EOS, ArithmeticTask
from opd_jax.data.task import Task
from opd_jax.eval.evaluate import pass_at_k
from opd_jax.mesh import make_mesh
from opd_jax.sampling import SamplingParams
from opd_jax.trainer import Trainer

QUIET = dict(progress=False, tensorboard=False)


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(v) for k, v in metrics.items() if k != "mfu" and isinstance(v, float))


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# ---- SFT --------------------------------------------------------------------------------------------------
def sft_config(run_dir: str, **over):
    d = dict(
        algorithm="sft", run_dir=run_dir, seed=0, steps=150, groups_per_batch=16, group_size=1,
        student=dict(vocab_size=32), sampling=dict(max_prompt_len=8, max_new_tokens=12),
        optim=dict(learning_rate=3e-3), data=dict(source="synthetic:arithmetic:1:5"),
        checkpoint=dict(async_save=False, every=100), logging=QUIET,
        eval=dict(every=75, num_problems=3, max_new_tokens=12),
    )
    d.update(over)
    return config_from_dict(d)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sft") / "run")
    trainer = SFTTrainer(sft_config(run_dir))
    history = trainer.run()
    return run_dir, history, jax.device_get(trainer.state.trainable)


@pytest.mark.slow
def test_sft_loss_drops_and_checkpoints(sft_run):
    run_dir, history, _ = sft_run
    first, last = history["first"], history["last"]
    assert _finite(first) and _finite(last)
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    assert last["token_accuracy"] > first["token_accuracy"]
    assert last["nonfinite_steps_total"] == 0 and last["truncated_rows"] == 0
    assert last["seq_len"] == 16  # the 16-token bucket, under the 20-token cap
    # the trainer's eval schedule: step 0, every 75 steps, the end; files per eval
    assert set(history["eval_start"]) >= {"eval_accuracy", "eval_pass@1"} and "eval_end" in history
    assert history["eval_end"]["eval_accuracy"] >= history["eval_start"]["eval_accuracy"]
    assert sorted(f for f in os.listdir(os.path.join(run_dir, "eval")) if f.endswith(".csv")) == [
        "eval_step0.csv", "eval_step150.csv", "eval_step75.csv"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["100", "150"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 151))
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 75, 150]


def test_sft_data_pieces():
    # pack_rows: right padding to the smallest bucket, cut rows counted, first token never a target
    rows = [([1, 5, 6, 7], [0, 0, 1, 1]), ([1, 5] + [8] * 20, [0, 0] + [1] * 20)]
    arrays, cut = pack_rows(rows[:1], 24, buckets=length_buckets(24))
    assert arrays["tokens"].shape == (1, 16) and cut == 0
    np.testing.assert_array_equal(arrays["loss_mask"][0, :5], [0, 0, 1, 1, 0])
    arrays, cut = pack_rows(rows, 20, buckets=length_buckets(20))
    assert length_buckets(20) == [16, 20] and arrays["tokens"].shape == (2, 20) and cut == 1
    assert arrays["mask"].sum() == 4 + 20
    # ListSFTSource: seeded epochs, resumable mid-epoch
    src = ListSFTSource([([i], [1]) for i in range(5)], seed=3)
    a = src.next(3)
    state = src.state()
    b = src.next(4)
    src2 = ListSFTSource([([i], [1]) for i in range(5)], seed=3)
    src2.restore(state)
    assert src2.next(4) == b
    assert sorted(r[0][0] for r in a + b[:2]) == list(range(5))  # first epoch is a permutation
    # ArithmeticTask.sft_examples: the reference solutions of the training stream, resumable
    task = ArithmeticTask(seed=1, num_ops=2, max_operand=9)
    ex = task.sft_examples(3)
    assert task.state() == {"position": 3}
    tokens, mask = ex[1]
    assert (tokens, mask) == task.sft_example(task.problem(1))
    assert tokens[-1] == EOS and mask[0] == 0 and mask[-1] == 1
    assert task.decode(tokens).endswith("#" + str(task.problem(1).answer))
    with pytest.raises(NotImplementedError):
        Task.sft_examples(task, 1)


@pytest.mark.slow
def test_sft_step_matches_reference_and_micro_batches():
    """The chunked, shifted CE is the plain masked mean NLL; 2 micro-batches give the same update as 1."""
    from opd_jax.config.schema import ModelConfig
    from opd_jax.models.qwen3 import abstract_model, build_model, positions_from_mask
    from opd_jax.train_state import init_train_state, split_model

    task = ArithmeticTask(seed=2, num_ops=2, max_operand=9)
    arrays, _ = pack_rows(task.sft_examples(4), 32, buckets=length_buckets(32))
    batch = SFTBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
    mcfg = ModelConfig(vocab_size=32)
    mdef = split_model(abstract_model(mcfg))[0]
    trainable, frozen = jax.jit(lambda: split_model(build_model(mcfg, seed=0))[1:3])()  # jitted: no eager init
    opt = optax.sgd(1.0)  # the update is the gradient itself

    @jax.jit
    def reference(params, b):  # full logits, shifted by hand
        model = mdef.merge(params)
        h, _ = model(b.tokens, positions_from_mask(b.mask), b.mask)
        logp = jax.nn.log_softmax(model.logits(h), -1)[:, :-1]
        lp = jnp.take_along_axis(logp, b.tokens[:, 1:, None], -1)[..., 0]
        w = b.loss_mask[:, 1:]
        return -(lp * w).sum() / w.sum(), w.sum()

    want, n_tok = map(float, reference(trainable, batch))

    out = {}
    for mb in (1, 2):
        step = jax.jit(lambda s, b, mb=mb: sft_step(mdef, opt, None, s, b, logprob_chunk=5, micro_batches=mb))
        state, metrics = step(init_train_state(opt, trainable, frozen), batch)
        out[mb] = (state, jax.device_get(metrics))
    assert out[1][1]["loss"] == pytest.approx(want, rel=1e-5)
    assert out[1][1]["num_tokens"] == n_tok and out[1][1]["skipped"] == 0
    assert out[2][1]["loss"] == pytest.approx(want, rel=1e-5)
    assert out[2][1]["grad_norm"] == pytest.approx(out[1][1]["grad_norm"], rel=1e-4)
    for a, b in zip(_leaves(out[1][0].trainable), _leaves(out[2][0].trainable), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(trainable), _leaves(out[1][0].trainable),
                                                       strict=True))


# ---- opd-jax eval --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_cli_end_to_end(sft_run, capsys):
    from opd_jax.cli import main

    run_dir, _, _ = sft_run
    cfg_path = os.path.join(run_dir, "config.yaml")
    assert main(["eval", cfg_path, "eval.k=2", "eval.num_problems=3", "eval.max_new_tokens=12"]) == 0
    out = capsys.readouterr().out
    summary_line = json.loads(out.strip().splitlines()[-1])
    base = os.path.join(run_dir, "eval", "eval_cli_step150")  # the latest checkpoint was loaded
    with open(base + "_summary.json") as f:
        summary = json.load(f)
    assert summary == summary_line
    with open(base + ".jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(base + ".csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(rows) == 3 and len(csv_rows) == 3
    assert summary["eval_k"] == 2 and summary["eval_problems"] == 3
    assert all(len(r["completions"]) == 2 and 0 <= r["correct"] <= 2 for r in rows)
    assert summary["eval_accuracy"] == pytest.approx(np.mean([r["correct"] / 2 for r in rows]))
    assert summary["eval_pass@2"] == pytest.approx(np.mean([pass_at_k(2, r["correct"], 2) for r in rows]))
    assert summary["eval_pass@2"] >= summary["eval_accuracy"]
    assert [int(r["correct"]) for r in csv_rows] == [r["correct"] for r in rows]
    assert summary["eval_mean_length"] == pytest.approx(np.mean([r["mean_length"] for r in rows]))
    assert 0 < summary["eval_mean_length"] <= 12


@pytest.mark.slow
def test_teacher_sft_examples(sft_run):
    run_dir, _, trained = sft_run
    cfg = sft_config(run_dir)
    mesh = make_mesh(cfg.mesh)
    teacher, step = load_run_model(cfg.student, run_dir, seed=99, mesh=mesh)  # a checkpoint as the teacher
    assert step == 150  # the latest; its trainable weights only (the optimizer state is not read)
    for a, b in zip(_leaves(teacher.trainable), _leaves(trained), strict=True):
        np.testing.assert_array_equal(a, b)
    # a run_dir relative to the working directory, as `opd-jax visualize ... run_dir=runs/x` passes it (orbax itself
    # takes only absolute paths)
    cwd = os.getcwd()
    try:
        os.chdir(os.path.dirname(run_dir))
        _, rel_step = load_run_model(cfg.student, os.path.basename(run_dir), seed=99, mesh=mesh)
    finally:
        os.chdir(cwd)
    assert rel_step == 150
    task = ArithmeticTask(seed=5, num_ops=1, max_operand=5)
    stats: dict = {}
    rows = teacher_sft_examples(teacher, task, 6, SamplingParams.create(1.0), max_new_tokens=12,
                                max_prompt_len=8, mesh=mesh, batch_size=8, samples_per_prompt=2,
                                only_correct=False, drop_truncated=False, stats=stats)
    assert len(rows) == 6 and stats["sampled"] == 8 and stats["kept"] == 6
    for tokens, mask in rows:
        n_prompt = mask.index(1)
        assert tokens[0] == 1 and all(m == 0 for m in mask[:n_prompt]) and all(mask[n_prompt:])
        assert 0 < len(tokens) - n_prompt <= 12
    # keep only graded-correct, stopped samples: each row is then a correct solution
    task2 = ArithmeticTask(seed=6, num_ops=1, max_operand=5)
    good = teacher_sft_examples(teacher, task2, 2, SamplingParams.create(0.0), max_new_tokens=12, max_prompt_len=8,
                                mesh=mesh, batch_size=8, only_correct=True, max_rounds=20)
    for tokens, mask in good:
        n_prompt = mask.index(1)
        expr = task2.decode(tokens[1:n_prompt]).rstrip("=")
        assert tokens[-1] == EOS and task2.decode(tokens[n_prompt:]).endswith("#" + str(eval(expr)))


# ---- RL --------------------------------------------------------------------------------------------------
def _even_first_token(tokens, mask, answer):
    """A reward a random policy hits about half the time, so group-normalized advantages are non-zero."""
    return (tokens[:, 0] % 2 == 0).astype(jnp.float32)


class InGraphRewardTask(ArithmeticTask):
    reward_fn = staticmethod(_even_first_token)


class HostRewardTask(ArithmeticTask):
    reward_fn = None

    def grade(self, completion, answer):
        return completion[0] % 2 == 0


def rl_config(run_dir: str):
    return config_from_dict(dict(
        algorithm="rl", run_dir=run_dir, seed=0, steps=2, groups_per_batch=2, group_size=4,
        student=dict(vocab_size=32), sampling=dict(max_prompt_len=16, max_new_tokens=8),
        loss=dict(kind="importance_sampling", kl_penalty_coef=0.0, task_reward_coef=1.0),
        optim=dict(learning_rate=1e-3), data=dict(source="synthetic:arithmetic"),
        checkpoint=dict(async_save=False), logging=QUIET,
    ))


@pytest.mark.slow
def test_rl_both_modes(tmp_path):
    runs = {}
    for name, task_cls, want in (("fused", InGraphRewardTask, Trainer), ("host", HostRewardTask,
                                                                         HostRewardRLTrainer)):
        cfg = rl_config(str(tmp_path / name))
        trainer = make_rl_trainer(cfg, task_cls(seed=0))
        assert type(trainer) is want and trainer.teachers == []  # kl_penalty_coef 0: no teacher loaded
        before = _leaves(trainer.state.trainable)
        history = trainer.run()
        after = _leaves(trainer.state.trainable)
        last = history["last"]
        assert _finite(last) and "task_reward" in last and 0 < last["task_reward"] < 1
        assert last["grad_norm"] > 0 and last["nonfinite_steps_total"] == 0
        assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        assert os.listdir(os.path.join(cfg.run_dir, "checkpoints")) == ["2"]
        runs[name] = (history, after)
    # the split host-graded step is the fused step: same samples, same rewards, same update
    (h_f, p_f), (h_h, p_h) = runs["fused"], runs["host"]
    for step in ("first", "last"):
        assert h_f[step]["task_reward"] == h_h[step]["task_reward"]
        assert h_f[step]["loss"] == pytest.approx(h_h[step]["loss"], rel=1e-4, abs=1e-6)
    for a, b in zip(p_f, p_h, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rl_config_checks_and_cli_dispatch(tmp_path, monkeypatch):
    cfg = rl_config(str(tmp_path / "x"))
    check_rl_config(cfg)
    for over, msg in ((dict(loss=dict(task_reward_coef=0.0)), "task_reward_coef"),
                      (dict(loss=dict(kind="reverse_kl", task_reward_coef=1.0)), "policy-gradient"),
                      (dict(group_size=1, loss=dict(task_reward_coef=1.0)), "group_size")):
        d = dict(algorithm="rl", **over)
        with pytest.raises(ValueError, match=msg):
            check_rl_config(config_from_dict(d))
    # `opd-jax train` with algorithm rl goes through the RL baseline (which picks the mode from the task)
    from opd_jax import cli

    seen = {}

    def fake_train_rl(c):
        seen["cfg"] = c
        return {"last": {}}

    monkeypatch.setattr(rl_mod, "train_rl", fake_train_rl)
    path = tmp_path / "rl.yaml"
    path.write_text("algorithm: rl\nloss: {task_reward_coef: 1.0}\n")
    assert cli.main(["train", str(path), f"run_dir={tmp_path / 'y'}"]) == 0
    assert seen["cfg"].algorithm == "rl"
