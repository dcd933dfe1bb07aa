"""Checkpoints and tokenizers by Hugging Face Hub id: resolved from a local HF cache with HF_HUB_OFFLINE=1 (the
cache layout `huggingface_hub` itself writes), a pinned revision, and one clear line for an id that is neither
cached nor reachable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_tokenizer import make_tokenizer_dir

from opd_jax import hub
from opd_jax.errors import ConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "tiny-org/tiny-qwen3"


def hub_cache(root: Path, src: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """Lay `src`'s files out as the HF hub cache does: hub/models--org--name/{snapshots/<commit>/, refs/main}."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def cached_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Qwen3 (weights, config.json, tokenizer) in an HF cache under a fresh HF_HOME."""
    from opd_jax.config.schema import ModelConfig
    from opd_jax.models.hf_io import export_hf
    from opd_jax.models.qwen3 import build_model
    from opd_jax.train_state import split_model

    tmp = tmp_path_factory.mktemp("hub")
    src = Path(make_tokenizer_dir(tmp / "src"))
    cfg = ModelConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    export_hf(split_model(build_model(cfg, 0))[1], cfg, src, overwrite=True)
    (src / "notes.bin").write_bytes(b"not something opd_jax reads")  # a file the allow patterns skip
    home = tmp / "hf_home"
    return home, hub_cache(home, src)


@pytest.fixture
def offline_hub(cached_model, monkeypatch):
    from huggingface_hub import constants

    home, snap = cached_model
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))  # read at import; the env is for subprocesses
    return snap


def test_hub_id_grammar(tmp_path, monkeypatch):
    assert hub.is_hub_id("Qwen/Qwen3-8B-Base") and hub.is_hub_id("Qwen/Qwen3-8B-Base@main")
    assert hub.split_revision("Qwen/Qwen3-8B-Base@abc") == ("Qwen/Qwen3-8B-Base", "abc")
    assert not hub.is_hub_id("gs://bucket/model") and not hub.is_hub_id("/abs/path") and not hub.is_hub_id("a/b/c")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("org/name")  # a local directory wins over the Hub
    assert hub.resolve("org/name") == "org/name"


def test_load_model_and_tokenizer_by_hub_id_offline(offline_hub):
    import numpy as np

    from opd_jax.config.schema import ModelConfig
    from opd_jax.data.renderers import load_tokenizer
    from opd_jax.mesh import make_mesh
    from opd_jax.models.hf_io import load_hf_params
    from opd_jax.train_state import load_model, resolve_model

    cfg = ModelConfig(hf_path=REPO_ID)
    resolved = resolve_model(cfg)
    assert resolved.hf_path == str(offline_hub) and resolved.vocab_size == 512 and resolved.hidden_size == 16
    model = load_model(cfg, seed=0, mesh=make_mesh(resolved_mesh()))
    want = load_hf_params(offline_hub, resolved)
    for name in want:
        np.testing.assert_array_equal(np.asarray(model.trainable[name]), np.asarray(want[name]))
    assert len(load_tokenizer(REPO_ID)) == 512
    pinned = resolve_model(ModelConfig(hf_path=f"{REPO_ID}@{COMMIT}"))
    assert pinned.hf_path == str(offline_hub)


def resolved_mesh():
    from opd_jax.config.schema import MeshConfig

    return MeshConfig(data=1, fsdp=-1, tensor=1)


def test_unknown_hub_id_is_one_line(offline_hub, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"'tiny-org/missing'.*not in the cache"):
        hub.resolve("tiny-org/missing")
    with pytest.raises(ConfigError, match=r"not in the cache"):
        hub.resolve(f"{REPO_ID}@{'f' * 40}")  # a revision that is not cached
    from opd_jax import cli

    rc = cli.main(["train", str(Path(__file__).parents[1] / "configs" / "base.yaml"), f"run_dir={tmp_path / 'r'}",
                   "student.hf_path=tiny-org/missing"])
    err = capsys.readouterr().err
    assert rc == 2 and "'tiny-org/missing'" in err and "Traceback" not in err and "huggingface-cli download" in err
    assert not (tmp_path / "r").exists()


def test_hf_home_is_honoured_in_a_new_process(cached_model, tmp_path):
    home, snap = cached_model
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", f"from opd_jax import hub; print(hub.resolve({REPO_ID!r}))"],
                         env=env, capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert out == str(snap)
    files = sorted(p.name for p in Path(out).iterdir())
    assert "config.json" in files and "model.safetensors" in files and "tokenizer.json" in files


def test_convert_by_hub_id(offline_hub, tmp_path):
    from opd_jax import cli

    assert cli.main(["convert", REPO_ID, str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
