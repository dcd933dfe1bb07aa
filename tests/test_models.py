"""Qwen3 model vs transformers, HF checkpoint load/export, sharded loading and LoRA merging.

Every HF model here is a tiny random `Qwen3ForCausalLM` built locally; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opd_jax.cli import main as cli_main
from opd_jax.config.schema import LoRAConfig, MeshConfig
from opd_jax.mesh import make_mesh
from opd_jax.models import hf_io
from opd_jax.models.attention import attention, decode_attention, tile_keys, untile_keys
from opd_jax.models.hf_io import export_hf, load_hf_config, load_hf_params, merge_lora
from opd_jax.models.qwen3 import abstract_model, positions_from_mask
from opd_jax.models.weight_mapping import hf_to_ours

torch.set_num_threads(1)

VOCAB = 128


def make_hf(path, *, layers=1, heads=4, kv=2, head_dim=16, hidden=48, inter=96, tied=False, seed=0) -> Qwen3ForCausalLM:
    """A tiny random HF Qwen3, perturbed so norms are not all ones, saved (safetensors) to `path`."""
    torch.manual_seed(seed)
    hfc = Qwen3Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        rope_theta=10000.0, max_position_embeddings=256,
    )
    model = Qwen3ForCausalLM(hfc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def batch(b=3, t=10, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and a left-padded mask (row 0 full, the others with 1 and 3 pads)."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, VOCAB, (b, t))
    mask = np.ones((b, t), bool)
    for row, pad in zip(range(1, b), (3, 1, 2, 4), strict=False):
        mask[row, :pad] = False
    return tokens, mask


def hf_logits(model, tokens, mask) -> np.ndarray:
    with torch.no_grad():
        pos = torch.tensor(np.maximum(np.cumsum(mask, axis=-1) - 1, 0))  # pads do not advance positions
        out = model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)), position_ids=pos)
    return out.logits.float().numpy()


_FORWARDS: dict = {}


def our_logits(cfg, params, tokens, mask, mesh=None) -> np.ndarray:
    # One jitted forward per (config, mesh), so equal configs share a compile. (The GraphDef itself cannot be
    # a static jit argument: it holds the unhashable ModelConfig.)
    key = (repr(dataclasses.replace(cfg, hf_path=None)), mesh)
    if key not in _FORWARDS:
        graphdef = nnx.split(abstract_model(cfg))[0]

        @jax.jit
        def fwd(params, tokens, mask):
            model = nnx.merge(graphdef, params)
            h, _ = model(tokens, positions_from_mask(mask), mask, mesh=mesh)
            return model.logits(h)

        _FORWARDS[key] = fwd
    return np.asarray(_FORWARDS[key](params, jnp.asarray(tokens), jnp.asarray(mask)))


def maxdiff(a, b, mask) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask].max())


# ---- parity ----------------------------------------------------------------------------------------------
GQA2_TIED_3L = dict(layers=3, heads=4, kv=2, head_dim=12, tied=True)  # head_dim == hidden/heads
GQA4_UNTIED_3L = dict(layers=3, heads=4, kv=1, head_dim=24, tied=False)


@pytest.mark.parametrize(
    "kw",
    [
        dict(layers=1, heads=4, kv=4, head_dim=16, tied=False),  # MHA, head_dim != hidden/heads
        GQA2_TIED_3L,
        GQA4_UNTIED_3L,
        dict(layers=1, heads=6, kv=2, head_dim=8, tied=True),  # GQA 3, head_dim < hidden/heads
    ],
    ids=["mha-untied-1L", "gqa2-tied-3L", "gqa4-untied-3L", "gqa3-tied-1L"],
)
def test_parity_with_transformers(tmp_path, kw):
    hf = make_hf(tmp_path, **kw)
    cfg = load_hf_config(tmp_path)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (
        kw["layers"], kw["kv"], kw["head_dim"], kw["tied"])
    params = load_hf_params(tmp_path, cfg)
    # exactly the tree of nnx.to_pure_dict(nnx.split(build_model(cfg))[1]) (abstract: eager init is slow)
    want = nnx.to_pure_dict(nnx.split(abstract_model(cfg))[1])
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    tokens, mask = batch()
    assert maxdiff(our_logits(cfg, params, tokens, mask), hf_logits(hf, tokens, mask), mask) <= 1e-4


def test_chunked_attention_parity_with_transformers(tmp_path):
    """`attention_chunk` (memory-efficient attention over key chunks) keeps HF parity, left pads included."""
    hf = make_hf(tmp_path, **GQA4_UNTIED_3L)
    cfg = dataclasses.replace(load_hf_config(tmp_path), attention_chunk=4)
    params = load_hf_params(tmp_path, cfg)
    tokens, mask = batch(t=16)
    assert maxdiff(our_logits(cfg, params, tokens, mask), hf_logits(hf, tokens, mask), mask) <= 1e-4


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["cpu-kernel", "pure-jax"])
def test_kv_cache_decode_matches_full_forward(tmp_path, cpu_kernel):
    """Prefill then one token at a time == one full forward, with the one-token attention run by the CPU
    kernel (where it is built) and by the pure-JAX block loop."""
    make_hf(tmp_path, **GQA2_TIED_3L)  # a parity config: the full forward's compile is shared
    cfg = dataclasses.replace(load_hf_config(tmp_path), cpu_decode_kernel=cpu_kernel)
    params = load_hf_params(tmp_path, cfg)
    graphdef = nnx.split(abstract_model(cfg))[0]
    tokens, mask = batch()
    tok, msk = jnp.asarray(tokens), jnp.asarray(mask)
    pos = positions_from_mask(msk)
    full = our_logits(cfg, params, tokens, mask)

    @partial(jax.jit, static_argnames="cache_empty")
    def step(params, cache, tok, pos, msk, cache_empty=False):
        model = nnx.merge(graphdef, params)
        h, cache = model(tok, pos, msk, cache=cache, cache_empty=cache_empty)
        return model.logits(h), cache

    prefill = 5
    cache = nnx.merge(graphdef, params).init_cache(tokens.shape[0], 12)
    # the sampler's prefill (own tokens only) fills the cache exactly as attending over every slot does
    local_logits, local_cache = step(params, cache, tok[:, :prefill], pos[:, :prefill], msk[:, :prefill], True)
    logits, cache = step(params, cache, tok[:, :prefill], pos[:, :prefill], msk[:, :prefill])
    assert maxdiff(local_logits, logits, mask[:, :prefill]) <= 1e-5
    valid = np.asarray(cache.valid)  # pad slots hold junk that is never attended to
    assert (np.asarray(local_cache.valid) == valid).all() and int(local_cache.index) == int(cache.index)
    for layer in range(cfg.num_layers):
        for got, want in [(untile_keys(local_cache.k[layer]), untile_keys(cache.k[layer])),
                          (jnp.swapaxes(local_cache.v[layer], 1, 2), jnp.swapaxes(cache.v[layer], 1, 2))]:
            np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)
    steps = [logits]
    for t in range(prefill, tokens.shape[1]):  # one token at a time, as in sampling
        logits, cache = step(params, cache, tok[:, t:t + 1], pos[:, t:t + 1], msk[:, t:t + 1])
        steps.append(logits)
    assert int(cache.index) == tokens.shape[1]
    assert maxdiff(np.concatenate(steps, axis=1), full, mask) <= 1e-4


@pytest.mark.parametrize("n_filled", [1, 4, 9, 16])
def test_decode_attention_blocks_equal_dense_attention(n_filled):
    """Blockwise online-softmax decode (several blocks, pad holes, unfilled tail) == dense masked attention."""
    rng = np.random.default_rng(0)
    L, B, KV, S, D, H, block = 2, 3, 2, 16, 8, 4, 4
    kc = jnp.asarray(rng.normal(size=(L, B, KV, S, D)), jnp.float32)
    vc = jnp.asarray(rng.normal(size=(L, B, KV, S, D)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(B, 1, H, D)), jnp.float32)
    valid = rng.random((B, S)) < 0.7
    valid[:, n_filled - 1] = True  # the token being decoded is always a real one
    valid = jnp.asarray(valid)
    kc_t = jnp.stack([tile_keys(jnp.swapaxes(kc[i], 1, 2), block) for i in range(L)])  # the cache's K layout
    got = decode_attention(q, kc_t, vc, jnp.int32(1), valid, jnp.int32(n_filled))
    mask = (valid & (jnp.arange(S) < n_filled))[:, None, :]
    want = attention(q, jnp.swapaxes(kc[1], 1, 2), jnp.swapaxes(vc[1], 1, 2), mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_cache_length_rounds_up_to_decode_block(tmp_path):
    make_hf(tmp_path, **GQA2_TIED_3L)
    cfg = load_hf_config(tmp_path)
    cache = abstract_model(cfg).init_cache(2, 70)
    assert cache.max_len == 128 and cache.v.shape[3] == 128 and cache.k.shape[3:] == (2, cfg.head_dim, 64)
    assert not bool(cache.valid.any())


# ---- export round trips ----------------------------------------------------------------------------------
def test_round_trip_single_file(tmp_path):
    hf = make_hf(tmp_path / "src", layers=2, tied=False)
    cfg = load_hf_config(tmp_path / "src")
    export_hf(load_hf_params(tmp_path / "src", cfg), cfg, tmp_path / "out", dtype="float32")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, mask = batch()
    assert maxdiff(hf_logits(back, tokens, mask), hf_logits(hf, tokens, mask), mask) <= 1e-5
    params = load_hf_params(tmp_path / "src", cfg)
    with pytest.raises(ValueError, match="already holds weights"):
        export_hf(params, cfg, tmp_path / "out")
    # overwrite removes the stale single file, which transformers would otherwise prefer over the index
    export_hf(params, cfg, tmp_path / "out", max_shard_bytes=30_000, overwrite=True)
    assert "model.safetensors" not in os.listdir(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_round_trip_sharded_files(tmp_path):
    hf = make_hf(tmp_path / "src", layers=3, tied=True)
    cfg = load_hf_config(tmp_path / "src")
    params = load_hf_params(tmp_path / "src", cfg)
    export_hf(params, cfg, tmp_path / "out", dtype="float32", max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert len(files) >= 3 and "model.safetensors" not in files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert "lm_head.weight" not in index["weight_map"]  # tied: HF re-ties it
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens, mask = batch()
    assert maxdiff(hf_logits(back, tokens, mask), hf_logits(hf, tokens, mask), mask) <= 1e-5
    # and our loader reads the sharded layout back bit-exactly
    again = load_hf_params(tmp_path / "out", load_hf_config(tmp_path / "out"))
    for name in params:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(params[name]), err_msg=name)


def test_remote_paths_are_staged_locally(tmp_path, monkeypatch):
    """gs:// paths take the copy-to-temp-dir route; exercise it on a local path."""
    make_hf(tmp_path / "src", layers=1)
    cfg = load_hf_config(tmp_path / "src")
    local = load_hf_params(tmp_path / "src", cfg)
    monkeypatch.setattr(hf_io, "_is_remote", lambda path: True)
    remote = load_hf_params(tmp_path / "src", cfg)
    export_hf(remote, cfg, tmp_path / "out", max_shard_bytes=30_000)
    monkeypatch.undo()
    again = load_hf_params(tmp_path / "out", cfg)
    for name in local:
        np.testing.assert_array_equal(np.asarray(remote[name]), np.asarray(local[name]))
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(local[name]))


def test_convert_cli_bf16(tmp_path):
    hf = make_hf(tmp_path / "src", layers=2)
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16",
                     "--max-shard-size", "30KB"]) == 0
    dst = tmp_path / "dst"
    assert (dst / "model.safetensors.index.json").exists() and (dst / "tokenizer_config.json").exists()
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
    want = hf.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16)
    assert torch.equal(back.state_dict()["model.layers.1.mlp.down_proj.weight"], want)


# ---- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "index"])
def test_bad_checkpoint_names_the_tensor(tmp_path, fault):
    hf = make_hf(tmp_path, layers=2)
    sd = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    if fault == "missing":
        name = "model.layers.1.mlp.up_proj.weight"
        del sd[name]
    elif fault == "extra":
        name = "model.layers.0.mlp.extra_proj.weight"
        sd[name] = np.zeros((4, 4), np.float32)
    elif fault == "shape":
        name = "model.layers.0.self_attn.k_proj.weight"
        sd[name] = np.zeros((sd[name].shape[0] + 16, sd[name].shape[1]), np.float32)
    if fault == "index":  # two shards, and an index that puts a tensor in the wrong one
        name = "model.norm.weight"
        os.remove(tmp_path / "model.safetensors")
        first = {k: v for k, v in sd.items() if "layers.1." not in k}
        save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
        save_file({k: v for k, v in sd.items() if k not in first}, str(tmp_path / "model-00002-of-00002.safetensors"))
        weight_map = {k: f"model-0000{1 if k in first else 2}-of-00002.safetensors" for k in sd}
        weight_map[name] = "model-00002-of-00002.safetensors"
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = load_hf_config(tmp_path)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
        load_hf_params(tmp_path, cfg)
    if fault != "missing":
        assert ".safetensors" in str(err.value)


def test_slice_reads_match_full_layout_change(tmp_path):
    """Any block of our layout read straight from the HF tensor equals the block of the fully converted one
    (covers shardings the default rules do not use, e.g. a split head_dim)."""
    rng = np.random.RandomState(0)
    hf_q = rng.randn(6 * 4, 10).astype(np.float32)  # q_proj [heads*head_dim, hidden]
    hf_o = rng.randn(10, 6 * 4).astype(np.float32)  # o_proj [hidden, heads*head_dim]
    save_file({"q": hf_q, "o": hf_o}, str(tmp_path / "t.safetensors"))
    tensors = hf_io._read_header(str(tmp_path / "t.safetensors"), "t.safetensors")
    full = {"q": hf_to_ours(hf_q, True, (10, 6, 4)), "o": hf_to_ours(hf_o, True, (6, 4, 10))}
    for _ in range(20):
        for name, shape, n_in in (("q", (10, 6, 4), 1), ("o", (6, 4, 10), 2)):
            idx = []
            for d in shape:
                a, b = sorted(rng.choice(d + 1, 2, replace=False))
                idx.append(slice(int(a), int(b)))
            got = hf_io._read_ours(tensors[name], True, n_in, shape, tuple(idx))
            np.testing.assert_array_equal(got, full[name][tuple(idx)])


# ---- sharded loading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_cfg", [MeshConfig(fsdp=4, tensor=2), MeshConfig(fsdp=8)], ids=["fsdp4-tp2", "fsdp8"])
def test_sharded_load_and_forward(tmp_path, mesh_cfg):
    make_hf(tmp_path, layers=2, heads=4, kv=2, head_dim=16, hidden=64, inter=128)
    cfg = load_hf_config(tmp_path)
    mesh = make_mesh(mesh_cfg)
    params = load_hf_params(tmp_path, cfg, mesh=mesh)
    fsdp, tp = mesh.shape["fsdp"], mesh.shape["tensor"]
    gate, q, embed = params["gate"], params["q"], params["embed"]
    if tp > 1:
        assert gate.sharding.spec == P(None, "fsdp", "tensor")
        assert q.sharding.spec == P(None, "fsdp", "tensor", None)
        assert embed.sharding.spec == P("tensor", "fsdp")
    assert len(gate.addressable_shards) == 8
    assert gate.addressable_shards[0].data.shape == (2, 64 // fsdp, 128 // tp)
    assert params["down"].addressable_shards[0].data.shape == (2, 128 // tp, 64 // fsdp)
    assert embed.addressable_shards[0].data.shape == (VOCAB // tp, 64 // fsdp)

    ref = load_hf_params(tmp_path, cfg)
    for name in ref:  # the per-shard reads reassemble exactly
        np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(ref[name]), err_msg=name)
    tokens, mask = batch(b=4)
    sharded = our_logits(cfg, params, tokens, mask, mesh=mesh)
    assert maxdiff(sharded, our_logits(cfg, ref, tokens, mask), mask) <= 1e-5
    # causal chunked attention (10 tokens in tiles of 4) under the same shardings
    chunked = our_logits(dataclasses.replace(cfg, attention_chunk=4), params, tokens, mask, mesh=mesh)
    assert maxdiff(chunked, sharded, mask) <= 1e-5


# ---- dtypes ----------------------------------------------------------------------------------------------
def test_bf16_load(tmp_path):
    hf = make_hf(tmp_path / "f32", layers=1)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    want = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"].float().numpy()  # bf16 values

    cfg = load_hf_config(tmp_path / "bf16", param_dtype="bfloat16", dtype="bfloat16")
    params = load_hf_params(tmp_path / "bf16", cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(np.asarray(params["q"], np.float32)[0].reshape(cfg.hidden_size, -1), want.T)
    # a bf16 checkpoint read into fp32 params is the exact upcast
    f32 = load_hf_params(tmp_path / "bf16", cfg, dtype="float32")
    assert f32["q"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(f32["q"])[0].reshape(cfg.hidden_size, -1), want.T)
    # fp32 checkpoint, cast on load: same rounding as torch's
    cast = load_hf_params(tmp_path / "f32", cfg)
    np.testing.assert_array_equal(np.asarray(cast["q"]), np.asarray(params["q"]))
    tokens, mask = batch()
    logits = our_logits(cfg, params, tokens, mask)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert np.asarray(params["q"]).dtype == np.dtype(ml_dtypes.bfloat16)


# ---- LoRA ------------------------------------------------------------------------------------------------
def test_lora_zero_b_is_base_and_merge_matches(tmp_path):
    make_hf(tmp_path / "src", **GQA4_UNTIED_3L)
    cfg = load_hf_config(tmp_path / "src")
    base = load_hf_params(tmp_path / "src", cfg)
    lora_cfg = LoRAConfig(rank=4, alpha=8.0)
    # LoRA params as build_model makes them (A random, B zero), without eager init (slow to compile on CPU).
    graphdef, lora_state, _ = nnx.split(abstract_model(cfg, lora_cfg), nnx.LoRAParam, nnx.Param)
    rng = np.random.RandomState(3)
    lora_params = {k: (0.3 * rng.randn(*v.shape) if k.endswith("_a") else np.zeros(v.shape)).astype(np.float32)
                   for k, v in nnx.to_pure_dict(lora_state).items()}
    assert set(lora_params) == {f"lora_{t}_{ab}" for t in lora_cfg.targets for ab in "ab"}
    tokens, mask = batch()

    @jax.jit
    def lora_fwd(params, tokens, mask):
        model = nnx.merge(graphdef, params)
        h, _ = model(tokens, positions_from_mask(mask), mask)
        return model.logits(h)

    base_logits = our_logits(cfg, base, tokens, mask)
    zero_b = np.asarray(lora_fwd({**base, **lora_params}, tokens, mask))
    assert maxdiff(zero_b, base_logits, mask) <= 1e-6  # B = 0: the adapter is a no-op

    for k in lora_params:
        if k.endswith("_b"):
            lora_params[k] = (0.05 * rng.randn(*lora_params[k].shape)).astype(np.float32)
    lora_logits = np.asarray(lora_fwd({**base, **lora_params}, tokens, mask))
    assert maxdiff(lora_logits, base_logits, mask) > 1e-3  # the adapter now matters

    merged = merge_lora(base, lora_params, lora_cfg)
    assert set(merged) == set(base)
    assert maxdiff(our_logits(cfg, merged, tokens, mask), lora_logits, mask) <= 1e-4

    # export merges adapters found in the params dict; transformers then reproduces the LoRA model
    with pytest.raises(ValueError, match="LoRA"):
        export_hf({**base, **lora_params}, cfg, tmp_path / "bad")
    export_hf({**base, **lora_params}, cfg, tmp_path / "out", lora=lora_cfg)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert maxdiff(hf_logits(back, tokens, mask), lora_logits, mask) <= 1e-4
