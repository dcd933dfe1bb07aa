"""The bad-input battery: each bad input gives one clear line that names the culprit (field, file, tensor, row) and
exit code 2, or a counted and reported skip; and a failure never changes what a run directory holds (its files are
hashed before and after). One test per case of each kind, plus the members of each kind found on the way."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_tokenizer import make_tokenizer_dir

from opd_jax import cli, losses
from opd_jax.config import load_config
from opd_jax.config.schema import LossConfig
from opd_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ["student.vocab_size=32", "student.hidden_size=16", "student.intermediate_size=32", "student.num_layers=1",
        "student.num_heads=2", "student.num_kv_heads=1", "student.head_dim=8",
        "teachers.0.model.vocab_size=32", "teachers.0.model.hidden_size=16", "teachers.0.model.intermediate_size=32",
        "teachers.0.model.num_layers=1", "teachers.0.model.num_heads=2", "teachers.0.model.num_kv_heads=1",
        "teachers.0.model.head_dim=8", "groups_per_batch=8", "group_size=2", "sampling.max_prompt_len=12",
        "sampling.max_new_tokens=4", "data.source=synthetic:arithmetic:1:9", "logging.tensorboard=false",
        "logging.progress=false", "mesh.fsdp=-1"]


def tree_hash(path: Path) -> str:
    """A hash of every file (name and bytes) under `path`; "absent" when it does not exist."""
    if not path.exists():
        return "absent"
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main([*argv])
    return rc, capsys.readouterr().err


def one_clear_line(err: str) -> str:
    """The error line of a user error: one `opd-jax: error:` line (plus a hint line), no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("opd-jax: error:")]
    assert len(errors) == 1 and len(lines) <= 3, err
    return errors[0]


def train(capsys, run_dir: Path, *overrides: str) -> tuple[int, str]:
    return run_cli(capsys, "train", str(REPO / "configs" / "base.yaml"), f"run_dir={run_dir}", *TINY, *overrides)


# ---- 1. a config that cannot work is rejected at load time, naming the fields ----------------------------------
@pytest.mark.parametrize("overrides, field", [
    (["student.vocab_size=640", "teachers.0.model.vocab_size=512"], "student.vocab_size / teachers.0.model.vocab_size"),
    (["student.vocab_size=512", "teachers.0.model.vocab_size=640"], "student.vocab_size / teachers.0.model.vocab_size"),
    (["micro_batches=3"], "micro_batches"),
    (["sampling.micro_batches=5"], "sampling.micro_batches"),
    (["groups_per_batch=0"], "groups_per_batch"),
    (["group_size=-1"], "group_size"),
    (["steps=-5"], "steps"),
    (["sampling.max_prompt_len=0"], "sampling.max_prompt_len"),
    (["sampling.max_new_tokens=0"], "sampling.max_new_tokens"),
    (["sampling.temperature=-1"], "sampling.temperature"),
    (["sampling.top_p=0"], "sampling.top_p"),
    (["sampling.top_p=1.5"], "sampling.top_p"),
    (["sampling.top_k=-3"], "sampling.top_k"),
    (["sampling.stop_token_ids=[600]", "student.vocab_size=512", "teachers.0.model.vocab_size=512"],
     "sampling.stop_token_ids"),
    (["loss.discount=1.5"], "loss.discount"),
    (["loss.beta=2"], "loss.beta"),
    (["loss.clip_eps=0"], "loss.clip_eps"),
    (["loss.logprob_chunk=0"], "loss.logprob_chunk"),
    (["loss.kl_clip=-1"], "loss.kl_clip"),
    (["loss.kind=topk_reverse_kl", "loss.topk=600", "student.vocab_size=512", "teachers.0.model.vocab_size=512"],
     "loss.topk"),
    (["optim.learning_rate=-1e-4"], "optim.learning_rate"),
    (["optim.b2=1"], "optim.b2"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["lora.rank=-2"], "lora.rank"),
    (["lora.rank=4", "lora.targets=[q,qkv]"], "lora.targets"),
    (["lora.rank=4", "lora.alpha=0"], "lora.alpha"),
    (["mesh.data=0"], "mesh.data"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh"),
    (["student.num_heads=3", "student.num_kv_heads=2"], "student.num_heads / student.num_kv_heads"),
    (["student.head_dim=7"], "student.head_dim"),
    (["student.hidden_size=0"], "student.hidden_size"),
    (["student.attention_chunk=-1"], "student.attention_chunk"),
    (["teachers.1.name=teacher"], "teachers.*.name"),
    (["teachers.1.name=second"], "teachers.0.datasets / teachers.1.datasets"),  # two catch-alls: ambiguous
    (["student.preset=qwen3-8bb"], "student.preset"),
    (["data.source=bogus:thing"], "data.source"),
    (["eval.source=nocolon"], "eval.source"),
    (["eval.k=0"], "eval.k"),
    (["eval.top_p=0"], "eval.top_p"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens"),
    (["checkpoint.max_to_keep=0"], "checkpoint.max_to_keep"),
    (["checkpoint.every=-1"], "checkpoint.every"),
    (["max_nonfinite_steps=0"], "max_nonfinite_steps"),
    (["resume=true", "overwrite=true"], "resume / overwrite"),
    (["data.renderer=qwen4"], "data.renderer"),
])
def test_invalid_config_is_one_line_naming_the_field(tmp_path, capsys, overrides, field):
    run = tmp_path / "run"
    before = tree_hash(run)
    with pytest.raises(ConfigError, match=r"^" + field.replace(".", r"\.").replace("*", r"\*")):
        load_config(str(REPO / "configs" / "base.yaml"), overrides)
    rc, err = train(capsys, run, *overrides)
    assert rc == 2 and field in one_clear_line(err)
    assert tree_hash(run) == before == "absent"


def test_vocabularies_from_checkpoints_are_checked_before_compiling(tmp_path, capsys, monkeypatch):
    """The teacher's vocabulary in its config.json (512) against the student's (640): an error naming both sizes
    before anything is compiled (it used to be a shape error at trace time, or NaN teacher logprobs)."""
    import opd_jax.trainer
    from opd_jax.models.hf_io import export_hf
    from opd_jax.models.qwen3 import build_model
    from opd_jax.train_state import split_model

    cfg = load_config(None, [*TINY, "teachers.0.model.vocab_size=512", "student.vocab_size=512"])
    export_hf(split_model(build_model(cfg.teachers[0].model, 1))[1], cfg.teachers[0].model, tmp_path / "teacher")
    monkeypatch.setattr(opd_jax.trainer, "build_opd_step", lambda *a, **k: pytest.fail("compiled despite it"))
    for student_vocab in (640, 256):
        rc, err = train(capsys, tmp_path / f"run{student_vocab}", f"student.vocab_size={student_vocab}",
                        f"teachers.0.model.hf_path={tmp_path / 'teacher'}")
        line = one_clear_line(err)
        assert rc == 2 and "student.vocab_size / teachers.0.model.vocab_size" in line, line
        assert f"{student_vocab} tokens" in line and "512" in line
        assert not (tmp_path / f"run{student_vocab}").exists()


def test_tokenizer_larger_than_the_head(tmp_path, capsys):
    tok = make_tokenizer_dir(tmp_path / "tok")  # 512 tokens
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    rc, err = train(capsys, tmp_path / "run", f"data.source=jsonl:{path}", f"data.tokenizer={tok}",
                    "student.vocab_size=256", "teachers.0.model.vocab_size=256", "sampling.max_prompt_len=48")
    line = one_clear_line(err)
    assert rc == 2 and "data.tokenizer / student.vocab_size" in line and "512 tokens" in line and "256" in line


def test_routing_name_that_matches_no_source(tmp_path, capsys):
    """Two teachers routed to [mbpp] and [gsm8K] over a gsm8k source: every batch would go to teacher 0."""
    tok = make_tokenizer_dir(tmp_path / "tok")
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    rc, err = train(capsys, tmp_path / "run", f"data.source=jsonl:{path}", f"data.tokenizer={tok}",
                    "student.vocab_size=512", "teachers.0.model.vocab_size=512", "sampling.max_prompt_len=48",
                    "teachers.0.datasets=[mbpp]", "teachers.1.name=math", "teachers.1.datasets=[gsm8K]",
                    "teachers.1.model.vocab_size=512")
    line = one_clear_line(err)
    assert rc == 2 and "teachers.*.datasets" in line and "'gsm8k'" in line and "gsm8K" in line and "mbpp" in line
    rc, err = train(capsys, tmp_path / "run2", "teachers.0.datasets=[arith]")  # a synthetic source routes nothing
    assert rc == 2 and "teachers.0.datasets" in one_clear_line(err)


def test_mesh_that_does_not_fit_the_devices(tmp_path, capsys):
    rc, err = train(capsys, tmp_path / "run", "mesh.data=3", "mesh.fsdp=1")  # 8 devices
    line = one_clear_line(err)
    assert rc == 2 and "mesh.data=3" in line and "needs 3 devices" in line and "8 are available" in line
    assert not (tmp_path / "run").exists()


# ---- 2. prompts: one rule for training and eval, truncation that keeps the template ------------------------------
def _text_cfg(tmp_path: Path, tok: str, rows: list[dict], *overrides: str):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(None, [*TINY, f"data.source=jsonl:{path}", f"eval.source=jsonl:{path}", f"data.tokenizer={tok}",
                              "student.vocab_size=512", "teachers.0.model.vocab_size=512", *overrides])


def test_eval_follows_the_training_prompt_rule(tmp_path):
    """Over-long eval prompts are skipped and counted (as training skips them), not a PromptTooLongError."""
    from opd_jax.data.text_task import TextTask
    from opd_jax.eval.evaluate import task_eval
    from opd_jax.mesh import make_mesh

    tok = make_tokenizer_dir(tmp_path / "tok")
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "word " * 60, "answer": "3"},
            {"question": "What is 2 + 3?", "answer": "5"}]
    cfg = _text_cfg(tmp_path, tok, rows, "sampling.max_prompt_len=32", "eval.max_new_tokens=2")
    task = TextTask(cfg)
    assert len(task.eval_problems()) == 2 and task.eval_counts["prompts_skipped"] == 1

    result = task_eval(cfg, task, _stop_sampler(task), None, make_mesh(cfg.mesh), step=0)
    assert result.num_problems == 2 and result.summary()["eval_prompts_skipped"] == 1

    cfg = _text_cfg(tmp_path, tok, rows, "sampling.max_prompt_len=32", "sampling.truncate_prompts=true")
    task = TextTask(cfg)
    assert len(task.eval_problems()) == 3 and task.eval_counts["prompts_truncated"] == 1


def _stop_sampler(task):
    """A stand-in eval sampler whose completions are the stop token (grading and counting only)."""
    def sample(params, tokens, mask, key, sp, active=None):
        from opd_jax.sampling import SampleOutput

        B, N = tokens.shape[0], 2
        return SampleOutput(tokens=jnp.full((B, N), task.stop_token_ids[0], jnp.int32), mask=jnp.ones((B, N), bool),
                            lengths=jnp.full((B,), 1, jnp.int32), logprobs=jnp.zeros((B, N)),
                            sampler_logprobs=jnp.zeros((B, N)), truncated=jnp.zeros((B,), bool))
    return sample


def test_eval_duplicates_are_counted_dropped_and_ids_carried(tmp_path, capsys):
    """Issue #23: an eval JSONL where one id appears twice had both copies scored. A problem counts once (by its
    `id`; without ids, by its text and answer), the drop is counted and printed, and every output row has the id."""
    from opd_jax.data.text_task import TextTask
    from opd_jax.eval.evaluate import task_eval
    from opd_jax.mesh import make_mesh

    tok = make_tokenizer_dir(tmp_path / "tok")
    rows = [{"id": 60, "question": "What is 1 + 1?", "answer": "2"},
            {"id": 61, "question": "What is 2 + 3?", "answer": "5"},
            {"id": 60, "question": "What is 1 + 1? (again)", "answer": "2"}]
    cfg = _text_cfg(tmp_path, tok, rows, "eval.max_new_tokens=2", "sampling.max_prompt_len=32")
    task = TextTask(cfg)
    result = task_eval(cfg, task, _stop_sampler(task), None, make_mesh(cfg.mesh), step=0, out_dir=str(tmp_path / "e"))
    assert result.num_problems == 2 and result.summary()["eval_duplicates_dropped"] == 1
    assert [r["id"] for r in result.rows] == ["60", "61"]
    out = capsys.readouterr().out
    assert "1 duplicate problem(s) dropped" in out and "id '60'" in out
    written = [json.loads(line) for line in (tmp_path / "e" / "eval.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == ["60", "61"]
    # no id field: the same text and answer is the same problem; the same text with another answer is not
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 1 + 1?", "answer": "2"},
            {"question": "What is 1 + 1?", "answer": "3"}]
    cfg = _text_cfg(tmp_path, tok, rows, "eval.max_new_tokens=2", "sampling.max_prompt_len=32")
    task = TextTask(cfg)
    result = task_eval(cfg, task, _stop_sampler(task), None, make_mesh(cfg.mesh), step=0)
    assert result.num_problems == 2 and result.summary()["eval_duplicates_dropped"] == 1


def test_truncation_cuts_the_content_never_the_template(tmp_path):
    """max_prompt_len=24 and a 48-token question: both prompts keep their whole template, the student's
    `<|im_start|>user` header included, and carry the same (cut) question text."""
    from opd_jax.data.text_task import TextTask

    tok = make_tokenizer_dir(tmp_path / "tok")
    question = " ".join(f"w{i}" for i in range(24))  # about 48 tokens
    cfg = _text_cfg(tmp_path, tok, [{"question": question, "answer": "1"}], "sampling.max_prompt_len=24",
                    "sampling.truncate_prompts=true", "teachers.0.renderer=base")
    task = TextTask(cfg)
    assert len(task.tokenizer.encode(question)) >= 40
    rows = task.next_prompts(1)
    s, t = rows.student[0], rows.teacher[0]
    assert len(s) <= 24 and len(t) <= 24 and task.truncated_prompts == 1
    s_text, t_text = task.tokenizer.decode(s), task.tokenizer.decode(t)
    assert s_text.startswith("<|im_start|>user\n") and s_text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert t_text.startswith("Question: ") and t_text.endswith("\nAnswer:")
    s_content = s_text.removeprefix("<|im_start|>user\n").split("<|im_end|>")[0]
    t_content = t_text.removeprefix("Question: ").removesuffix("\nAnswer:")
    assert s_content == t_content and question.endswith(s_content) and 0 < len(s_content) < len(question)


def test_bad_rows_are_counted_by_reason_printed_and_logged(tmp_path, capsys):
    from opd_jax.trainer import Trainer

    tok = make_tokenizer_dir(tmp_path / "tok")
    path = tmp_path / "rows.jsonl"
    good = [json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(6)]
    path.write_text("\n".join([good[0], "{not json", good[1], json.dumps({"answer": "1"}), *good[2:]]) + "\n")
    cfg = load_config(None, [*TINY, f"data.source=jsonl:{path}", f"data.tokenizer={tok}", "student.vocab_size=512",
                             "teachers.0.model.vocab_size=512", "sampling.max_prompt_len=32", "groups_per_batch=8",
                             f"run_dir={tmp_path / 'run'}", "steps=1", "data.shuffle_seed=3"])
    tr = Trainer(cfg)
    out = capsys.readouterr().out
    assert "rows skipped" in out and "bad_format" in out and "missing_field" in out
    tr.run()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["data/skipped/bad_format"] == 1 and row["data/skipped/missing_field"] == 1
    assert row["data/skipped_total"] == 2 and row["nonfinite_steps_total"] == 0


# ---- 3. grading reads the answer of this turn ------------------------------------------------------------------
@pytest.mark.parametrize("renderer", ["base", "qwen3", "qwen3_nothink", "hf_chat_template"])
def test_grading_reads_this_turn_only(tmp_path, renderer):
    from opd_jax.data.renderers import get_renderer, load_tokenizer

    tok = load_tokenizer(make_tokenizer_dir(tmp_path / "tok"))
    r = get_renderer(renderer, tok)

    def completion(answer: str, next_turn: str) -> list[int]:
        if renderer == "base":  # a base model runs on into the next "Question:" of its format
            return tok.encode(f" {answer}\n\nQuestion: {next_turn}")
        end = tok.convert_tokens_to_ids("<|im_end|>")
        return tok.encode(answer) + [end] + tok.encode(f"\n<|im_start|>user\n{next_turn}<|im_end|>")

    class _T:  # TextTask.grade_batch on this renderer, without a data source
        from opd_jax.data.text_task import TextTask

        grade_batch = TextTask.grade_batch

    task = _T()
    task.renderer = r
    right = completion("42", "What is 5 + 5?\nAnswer: 10")
    wrong = completion("41", "What is 30 + 12?\nAnswer: 42")
    assert task.grade_batch([right, wrong], ["42", "42"]) == [True, False]
    assert r.turn_text(right).strip() == "42"


# ---- 4. numerics at the edges ----------------------------------------------------------------------------------
def _support(x, keep):
    return x[..., keep]


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "entropy"])
def test_divergences_with_a_logit_of_minus_inf_in_both(kind):
    """A logit of -inf in both distributions (a logit mask, a truncated teacher): the value is the divergence over
    the other tokens, finite, and so is its gradient (it used to be NaN)."""
    import jax

    s = jnp.array([[1.0, -jnp.inf, 0.5, 2.0], [0.1, 0.2, -jnp.inf, -0.3]])
    t = jnp.array([[0.3, -jnp.inf, 1.5, -1.0], [1.0, -2.0, -jnp.inf, 0.0]])
    fn = {"reverse_kl": losses.reverse_kl, "forward_kl": losses.forward_kl,
          "jsd": lambda a, b: losses.jsd(a, b, 0.3), "entropy": lambda a, b: losses.entropy(a)}[kind]
    got = fn(s, t)
    want = jnp.stack([fn(s[i:i + 1, keep], t[i:i + 1, keep])[0] for i, keep in enumerate([[0, 2, 3], [0, 1, 3]])])
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    grad = jax.grad(lambda a: fn(a, t).sum())(s)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(grad[0, 1]) == 0.0 and float(grad[1, 2]) == 0.0


def test_advantages_at_a_masked_position_with_a_minus_inf_teacher_logprob():
    adv = losses.opd_advantages(LossConfig(), jnp.array([[-1.0, -2.0, -0.5]]), jnp.array([[-0.5, -jnp.inf, -1.0]]),
                                jnp.array([[1.0, 0.0, 1.0]]))
    np.testing.assert_allclose(np.asarray(adv), [[0.5, 0.0, -0.5]])


# ---- 5. files and the run directory ----------------------------------------------------------------------------
def test_truncated_safetensors_names_the_file_and_tensor(tmp_path, capsys):
    from opd_jax.models.hf_io import export_hf, load_hf_params
    from opd_jax.models.qwen3 import build_model
    from opd_jax.train_state import split_model

    cfg = load_config(None, TINY)
    m = cfg.student
    export_hf(split_model(build_model(m, 0))[1], m, tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size - 100])  # cut in the data
    from opd_jax.errors import CheckpointError
    from opd_jax.models.hf_io import load_hf_config

    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt.*tensor '"):
        load_hf_params(tmp_path / "ckpt", load_hf_config(tmp_path / "ckpt"))
    run = tmp_path / "run"
    rc, err = train(capsys, run, f"student.hf_path={tmp_path / 'ckpt'}")
    line = one_clear_line(err)
    assert rc == 2 and "model.safetensors" in line and "truncated or corrupt" in line and "tensor '" in line
    assert not run.exists()


def test_failed_setup_leaves_the_run_dir_unchanged(tmp_path, capsys):
    """An empty JSONL source fails during set-up: nothing is written (config.yaml used to be), so the corrected
    rerun is not refused as "already exists"; a used run dir is left byte for byte as it was."""
    tok = make_tokenizer_dir(tmp_path / "tok")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    run = tmp_path / "run"
    bad = [f"data.source=jsonl:{empty}", f"data.tokenizer={tok}", "student.vocab_size=512",
           "teachers.0.model.vocab_size=512", "sampling.max_prompt_len=32"]
    rc, err = train(capsys, run, *bad)
    assert rc == 2 and "empty.jsonl" in one_clear_line(err)
    assert not run.exists()
    rc, _ = train(capsys, run, "steps=1")  # corrected: runs
    assert rc == 0 and (run / "config.yaml").exists()
    before = tree_hash(run)
    for overrides in (bad + ["overwrite=true"], ["resume=true", "mesh.data=3", "mesh.fsdp=1"],
                      ["overwrite=true", "student.hidden_size=0"]):
        rc, err = train(capsys, run, *overrides)
        assert rc == 2, err
        one_clear_line(err)
        assert tree_hash(run) == before, overrides
    assert not list(tmp_path.glob("run.old-*"))  # overwrite moved nothing aside: set-up failed first


def test_resume_without_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = train(capsys, run, "resume=true")
    assert rc == 2 and "nothing to resume" in one_clear_line(err) and not run.exists()
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = tree_hash(run)
    rc, err = train(capsys, run, "resume=true")
    assert rc == 2 and "holds no checkpoint" in one_clear_line(err) and tree_hash(run) == before
    rc, _ = train(capsys, run, "resume=auto", "steps=1")  # auto: no checkpoint, so a fresh start (old run kept)
    assert rc == 0 and len(list(tmp_path.glob("run.old-*"))) == 1


def test_damaged_newest_checkpoint(tmp_path, capsys):
    """The newest checkpoint damaged (a data file truncated, or its manifest deleted): one paragraph naming the
    damaged step and the newest intact one; `checkpoint.fallback_to_intact=true` resumes from that one."""
    run = tmp_path / "run"
    rc, _ = train(capsys, run, "steps=3", "checkpoint.every=1", "checkpoint.async_save=false")
    assert rc == 0 and sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]
    for damage in ("manifest", "truncate"):  # the second damages the same (already damaged) step further
        victim = run / "checkpoints" / "3"
        files = sorted(p for p in victim.rglob("*") if p.is_file())
        if damage == "truncate":
            data = max((p for p in files if "ocdbt" in str(p) or "d/" in str(p)), key=lambda p: p.stat().st_size)
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        else:
            for p in files:
                if p.name.startswith("manifest") or p.name == "_CHECKPOINT_METADATA":
                    p.unlink()
        before = tree_hash(run)
        rc, err = train(capsys, run, "steps=4", "resume=true", "checkpoint.async_save=false")
        line = one_clear_line(err)
        assert rc == 2 and "checkpoint step 3" in line and "damaged" in line and "step 2" in line, (damage, err)
        assert "checkpoint.resume_step=2" in err
        assert tree_hash(run) == before
        if damage == "truncate":
            rc, _ = train(capsys, run, "steps=4", "resume=true", "checkpoint.resume_step=2",
                          "checkpoint.async_save=false", "overwrite=false")
            # resuming from step 2 redoes steps 3 and 4; metrics.jsonl holds each step once
            steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
                     if "loss" in ln]
            assert rc == 0 and steps == [1, 2, 3, 4], steps
            break


def test_damaged_checkpoint_fallback_flag(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _ = train(capsys, run, "steps=2", "checkpoint.every=1", "checkpoint.async_save=false")
    assert rc == 0
    for p in (run / "checkpoints" / "2").rglob("*"):
        if p.is_file() and p.stat().st_size > 100:
            p.write_bytes(b"\0" * 10)
    rc, out = cli.main(["train", str(REPO / "configs" / "base.yaml"), f"run_dir={run}", *TINY, "steps=3",
                        "resume=true", "checkpoint.fallback_to_intact=true"]), capsys.readouterr()
    assert rc == 0 and "resuming from step 1, the newest intact checkpoint" in out.out + out.err


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("change, field", [
    ("student.hidden_size=32", "student.hidden_size: 16 -> 32"),
    ("data.source=synthetic:arithmetic:2:9", "data.source: 'synthetic:arithmetic:1:9' -> 'synthetic:arithmetic:2:9'"),
    ("optim.grad_clip=1.0", "optim.grad_clip: 0.0 -> 1.0"),
])
def test_resume_refuses_a_config_that_makes_another_run(tmp_path, capsys, change, field):
    """Issue #23: a model shape other than the checkpoint's was reported as a damaged checkpoint (hint: overwrite,
    which throws the run away); other data was accepted silently or crashed. Now: one line naming the field and both
    values, exit 2, the run dir byte for byte as it was."""
    run = tmp_path / "run"
    assert train(capsys, run, "steps=2", "checkpoint.async_save=false")[0] == 0
    before = tree_hash(run)
    rc, err = train(capsys, run, "steps=4", "resume=true", change)
    line = one_clear_line(err)
    assert rc == 2 and field in line and "cannot continue" in line, err
    assert tree_hash(run) == before


def test_resume_on_other_rows_of_the_same_file(tmp_path, capsys):
    """The same data.source path holding other rows: fewer rows used to be a `data state mismatch` traceback, the
    same number of other rows was accepted silently. Both are one line naming the source, the run dir unchanged."""
    tok = make_tokenizer_dir(tmp_path / "tok")
    data = tmp_path / "math.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = [f"data.source=jsonl:{data}", f"data.tokenizer={tok}", "student.vocab_size=512",
            "teachers.0.model.vocab_size=512", "sampling.max_prompt_len=32", "checkpoint.async_save=false",
            "eval.source="]
    run = tmp_path / "run"
    assert train(capsys, run, "steps=1", *text)[0] == 0
    before = tree_hash(run)
    for other in (rows[:6], [{**r, "question": r["question"].replace("+", "plus")} for r in rows]):
        data.write_text("".join(json.dumps(r) + "\n" for r in other))
        rc, err = train(capsys, run, "steps=2", "resume=true", *text)
        line = one_clear_line(err)
        assert rc == 2 and f"jsonl:{data}" in line and "is not the data the run trained on" in line, err
        assert tree_hash(run) == before


def test_resume_lists_allowed_changes_and_keeps_every_config(tmp_path, capsys):
    """A learning rate or step change continues the run, is listed, and the run keeps each config it ran under:
    config.yaml stays the first, the new one lands beside it; a resume that changes nothing writes no copy."""
    run = tmp_path / "run"
    assert train(capsys, run, "steps=2", "optim.learning_rate=1e-3", "checkpoint.async_save=false")[0] == 0
    first = (run / "config.yaml").read_text()
    rc = cli.main(["train", str(REPO / "configs" / "base.yaml"), f"run_dir={run}", *TINY, "steps=3", "resume=true",
                   "optim.learning_rate=3e-4", "checkpoint.async_save=false"])
    out = capsys.readouterr().out
    assert rc == 0 and "optim.learning_rate: 0.001 -> 0.0003" in out and "steps: 2 -> 3" in out
    assert (run / "config.yaml").read_text() == first
    (copy,) = run.glob("config.resume-*.yaml")
    assert "learning_rate: 0.0003" in copy.read_text() and "steps: 3" in copy.read_text()
    # the next resume compares with the newest config; unchanged: nothing new written
    assert train(capsys, run, "steps=3", "resume=true", "optim.learning_rate=3e-4")[0] == 0
    assert len(list(run.glob("config.resume-*.yaml"))) == 1


def test_resume_of_a_finished_run_and_each_eval_once(tmp_path, capsys):
    """Resuming a run at its last step says so in one line and does nothing (no eval rerun); an eval row appeared
    again at the resume step after every resume: each step's eval appears once, like the training rows."""
    run = tmp_path / "run"
    common = ["eval.every=2", "checkpoint.every=2", "checkpoint.async_save=false", "eval.num_problems=4",
              "eval.max_new_tokens=4"]
    assert train(capsys, run, "steps=4", *common)[0] == 0
    for steps in (6, 8):
        assert train(capsys, run, f"steps={steps}", "resume=true", *common)[0] == 0
    evals = [r["step"] for r in metric_rows(run) if "eval_accuracy" in r]
    trains = [r["step"] for r in metric_rows(run) if "loss" in r]
    assert evals == [0, 2, 4, 6, 8] and trains == list(range(1, 9)), (evals, trains)
    before = tree_hash(run)
    rc = cli.main(["train", str(REPO / "configs" / "base.yaml"), f"run_dir={run}", *TINY, "steps=8", "resume=true",
                   *common])
    out = capsys.readouterr().out
    assert rc == 0 and "already at step 8 of 8" in out
    assert tree_hash(run) == before


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    rc, err = train(capsys, tmp_path / "run", "optim.learning_rate=-1")
    assert rc == 2 and "optim.learning_rate" in one_clear_line(err) and "--debug" in err
    with pytest.raises(ConfigError):
        cli.main(["--debug", "train", str(REPO / "configs" / "base.yaml"), "optim.learning_rate=-1"])
    rc, err = run_cli(capsys, "train", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "missing.yaml" in one_clear_line(err)


def test_missing_files_name_themselves(tmp_path, capsys):
    tok = make_tokenizer_dir(tmp_path / "tok")
    rc, err = train(capsys, tmp_path / "run", f"data.source=jsonl:{tmp_path / 'nope.jsonl'}", f"data.tokenizer={tok}",
                    "student.vocab_size=512", "teachers.0.model.vocab_size=512")
    assert rc == 2 and "nope.jsonl" in one_clear_line(err)
    rc, err = train(capsys, tmp_path / "run", f"student.hf_path={tmp_path / 'no_such_ckpt'}")
    assert rc == 2 and "student.hf_path:" in one_clear_line(err) and "no_such_ckpt" in err
    (tmp_path / "not_a_model").mkdir()
    rc, err = train(capsys, tmp_path / "run", f"teachers.0.model.hf_path={tmp_path / 'not_a_model'}")
    assert rc == 2 and "teachers.0.model.hf_path:" in one_clear_line(err) and "no config.json" in err
    assert not (tmp_path / "run").exists()
    # a wrong relative path in `extends:` says where it came from
    (tmp_path / "child.yaml").write_text("extends: ../nowhere/base.yaml\nsteps: 1\n")
    rc, err = run_cli(capsys, "train", str(tmp_path / "child.yaml"))
    line = one_clear_line(err)
    assert rc == 2 and "child.yaml: extends: '../nowhere/base.yaml'" in line and "relative to the file" in line


# ---- 5. the environment: optional packages, libtpu, unwritable places, a full disk, a model of another shape ---
def test_missing_optional_package_before_anything_is_written(tmp_path, capsys):
    """logging.wandb=true without wandb used to fail after 27 s with a traceback, leaving config.yaml, tensorboard/
    and checkpoints/ behind (so the retry was refused as "already exists")."""
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    rc, err = train(capsys, tmp_path / "run", "logging.wandb=true", "logging.tensorboard=true")
    line = one_clear_line(err)
    assert rc == 2 and "logging.wandb=true" in line and "opd_jax[wandb]" in err
    assert tree_hash(tmp_path / "run") == "absent"


def test_compile_without_libtpu_is_one_line(capsys, monkeypatch):
    from opd_jax import aot

    monkeypatch.setattr(aot, "ensure_libtpu", lambda: False)  # as on a machine without libtpu
    rc, err = run_cli(capsys, "compile", str(REPO / "configs" / "base.yaml"), "--topology", "v5p-8", *TINY)
    line = one_clear_line(err)
    assert rc == 2 and "v5p-8" in line and "needs libtpu" in line and "libtpu==" in err


def test_unwritable_run_dir_is_one_line(tmp_path, capsys):
    """A run dir where nothing can be written (here /sys, which refuses files even to root, as a read-only mount
    does) is one line naming it, before anything is loaded."""
    run = Path("/sys/opd_jax_test_run")
    try:
        os.close(os.open("/sys/.opd_jax_probe", os.O_CREAT | os.O_WRONLY))
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    rc, err = train(capsys, run)
    assert rc == 2 and f"run_dir {run} cannot be written" in one_clear_line(err)


def test_checkpoint_that_does_not_fit_on_the_disk(tmp_path, capsys, monkeypatch):
    """A save the disk cannot hold is refused before writing (one line, the sizes); the checkpoints before it stay,
    no orbax temporary directory is left, and the run resumes once there is room."""
    import shutil

    from opd_jax import checkpoint

    run = tmp_path / "run"
    assert train(capsys, run, "steps=1", "checkpoint.async_save=false")[0] == 0
    full = shutil.disk_usage(str(tmp_path))._replace(free=1000)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: full)
    rc, err = train(capsys, run, "steps=2", "resume=true", "checkpoint.async_save=false")
    line = one_clear_line(err)
    assert rc == 2 and "could not write checkpoint step 2" in line and "GiB free" in line, err
    assert "resume=true continues from step 1" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]
    monkeypatch.undo()
    assert train(capsys, run, "steps=2", "resume=true")[0] == 0


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(tmp_path):
    """The write itself failing (here: a file-size limit, RLIMIT_FSIZE, which fails orbax's writes as a full disk
    does) used to print a 579-line orbax traceback and leave `<step>.orbax-checkpoint-tmp` behind."""
    import subprocess
    import sys

    # the limit is set inside the child, before it imports anything (no preexec_fn fork from a JAX process)
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); sys.argv = ['opd-jax', *sys.argv[1:]]; "
               "runpy.run_module('opd_jax.cli', run_name='__main__')")
    run = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    for async_save in ("false", "true"):
        p = subprocess.run([sys.executable, "-c", limited, "train", str(REPO / "configs" / "base.yaml"),
                            f"run_dir={run}", "overwrite=true", "steps=2", "compilation_cache=",
                            "logging.progress=false", "logging.tensorboard=false",
                            f"checkpoint.async_save={async_save}"],
                           capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 2, p.stderr[-3000:]
        line = one_clear_line(p.stderr)
        assert "could not write checkpoint step 2" in line and "File too large" in line, line
        assert not [q for q in (run / "checkpoints").iterdir() if "orbax-checkpoint-tmp" in q.name]


def test_eval_of_a_checkpoint_with_another_model_shape(tmp_path, capsys):
    """`opd-jax eval` with a model config whose shapes differ from the checkpoint's: one line naming the tensor and
    both shapes (it was a 157-line orbax traceback)."""
    run = tmp_path / "run"
    assert train(capsys, run, "steps=1", "checkpoint.async_save=false")[0] == 0
    before = tree_hash(run)
    rc, err = run_cli(capsys, "eval", str(REPO / "configs" / "base.yaml"), f"run_dir={run}", *TINY,
                      "student.hidden_size=32", "eval.source=synthetic:arithmetic:1:9", "eval.num_problems=2")
    line = one_clear_line(err)
    assert rc == 2 and "checkpoint step 1" in line and "tensor trainable/" in line and "wants" in line, err
    assert tree_hash(run) == before


# ---- 6. the AOT report -----------------------------------------------------------------------------------------
def test_aot_report_uses_gib():
    from opd_jax.aot import AotReport, GiB

    r = AotReport(topology="v4:4x4x4", topology_name="v4:4x4x4", chip="v4", num_chips=64, mesh={"fsdp": 64},
                  hbm_bytes=32 * GiB, argument_bytes=int(31.9 * GiB))
    text = "\n".join(r.lines())
    assert "32 GiB HBM" in text and "31.90 GiB" in text and " GB" not in text and r.fits


def test_aot_levers_found_by_compiling(monkeypatch):
    """A program the compiler refuses, where the first lever tried (more gradient micro-batches) does not help
    enough: the search compiles each change alone, stacks the helpful ones, keeps only those that lower the
    memory the compiler reports, and ends with overrides that fit. The compiler here is a stand-in whose memory
    grows with the sampling batch and the dense attention scores (a real v5e search of the same shape passed
    too, in 5.5 minutes of compiles: too slow for every CI run)."""
    from opd_jax import aot

    GiB = aot.GiB

    def fake_compile(cfg, topology, fast=False):
        need = (8 * GiB * cfg.micro_batches ** -0.1 + 24 * GiB / cfg.sampling.micro_batches
                + (10 * GiB if cfg.student.attention_chunk == 0 else 0))
        fits = need <= 15.75 * GiB
        return aot.AotReport(topology=topology, topology_name=topology, chip="v5e", num_chips=4, mesh={"fsdp": 4},
                             hbm_bytes=16 * GiB, argument_bytes=int(need), error="" if fits else "RESOURCE_EXHAUSTED")

    monkeypatch.setattr(aot, "compile_step", fake_compile)
    cfg = load_config(None, [*TINY, "groups_per_batch=64", "group_size=16"])
    report = fake_compile(cfg, "v5e:2x2")
    assert not report.fits
    logs: list[str] = []
    path = aot.search_levers(cfg, "v5e:2x2", report, budget=16, log=logs.append)
    assert path and path[-1][1].fits, "\n".join(logs)
    needs = [aot.required_bytes(report)] + [aot.required_bytes(r) for _, r in path]
    assert needs == sorted(needs, reverse=True) and len(set(needs)) == len(needs)  # every kept step lowered it
    assert "micro_batches=2" in logs[0] and "refused" in logs[0], logs  # the first guess alone did not fit
    assert len(path[-1][0]) >= 2, path[-1][0]  # it took a combination
    assert all("micro_batches" not in o or o != "micro_batches=2" for o in path[-1][0][1:])
    # a budget too small to find a fit reports the closest, never a change that made it worse
    short = aot.search_levers(cfg, "v5e:2x2", report, budget=2, log=lambda _: None)
    assert all(aot.required_bytes(r) < aot.required_bytes(report) for _, r in short)
