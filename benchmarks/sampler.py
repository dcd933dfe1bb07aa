"""Generated tokens/s: opd_jax's KV-cache sampler vs `transformers.generate`, in one run.

Both run the same random weights, batch 32, no stop token (HF is forced to full length with `min_new_tokens`),
plain T=1 sampling (HF's default top-k 50 switched off), plus greedy with `--greedy`. `--model` (see
`benchmarks/shapes.py`):
- "tiny" (default): a 3.4M-param Qwen3 (4 layers, hidden 256, vocab 512, 4 heads / 2 KV heads, head_dim 64), fp32,
  32-token prompts, 64 and 256 new tokens;
- "qwen3-0.6b": issue #16's shapes: a Qwen3-0.6B-shaped model with an untied head (752M params, fp32 params, bf16
  compute), 128-token prompts, 256 new tokens.
JAX runs on its default backend; transformers on CUDA with bf16 autocast when torch sees a GPU, else on the CPU
in fp32. Compile time / first-call overhead is excluded by one warm-up call; each figure is the median of
`--runs` timed calls, with every variant and HF interleaved so all see the same machine load.

opd_jax variants timed in the same run: on a CPU, as shipped (the one-token attention is the FFI kernel in
opd_jax/kernels) and `pure_jax` (`model.cpu_decode_kernel: false`, the pure-JAX block loop); on a GPU or TPU,
as shipped (`model.decode_attention: auto`, weights cast once: `sampling.cast_weights: auto`), `dense` (dense
decode attention over the whole cache) and `before` (the block loop and the per-layer weight cast: the decode
path before issue #16), so each change shows against the others in one run. Threads: torch uses its default
intra-op thread count (printed); XLA's CPU backend its own pool over all cores.

    python benchmarks/sampler.py [--runs 5]
    python benchmarks/sampler.py --model qwen3-0.6b --runs 3     # a GPU
    python benchmarks/sampler.py --smoke                         # a few tokens, every variant, any backend
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from shapes import MODELS, hf_config, torch_device
from transformers import Qwen3ForCausalLM

from opd_jax import flops
from opd_jax.kernels import cpu as cpu_kernels
from opd_jax.models.qwen3 import abstract_model, param_count
from opd_jax.models.weight_mapping import config_from_hf, params_from_hf
from opd_jax.sampling import SamplingParams, make_sampler

BATCH, PAD = 32, 0


def variants(platform: str) -> dict[str, dict]:
    """name -> (model config changes, make_sampler options) for this platform."""
    if platform == "cpu":
        return {"opd_jax": dict(cfg={}, kw={}), "opd_jax_pure_jax": dict(cfg=dict(cpu_decode_kernel=False), kw={})}
    return {"opd_jax": dict(cfg={}, kw={}), "dense": dict(cfg=dict(decode_attention="dense"), kw={}),
            "before": dict(cfg=dict(decode_attention="blocks"), kw=dict(cast_weights="never"))}


def build(model: str, prompt_len: int, platform: str) -> tuple[Qwen3ForCausalLM, torch.Tensor, Callable, dict]:
    """The HF model (on the torch device), the prompts, `sampler(variant, max_new_tokens) -> fn(key, sp)` (opd_jax
    on the same weights) and the opd_jax config."""
    dims = MODELS[model].student
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(hf_config(dims)).eval()
    cfg = config_from_hf(hf.config.to_dict(), param_dtype=dims.get("param_dtype", "float32"),
                         dtype=dims.get("dtype", "float32"))
    graphdef, state = nnx.split(abstract_model(cfg))
    shapes = nnx.to_pure_dict(state)
    params = {k: jnp.asarray(v, shapes[k].dtype) for k, v in
              params_from_hf({k: v.detach().numpy() for k, v in hf.state_dict().items()}, cfg).items()}
    prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (BATCH, prompt_len)).astype(np.int32)
    tokens, mask = jax.device_put(prompts), jax.device_put(np.ones_like(prompts, bool))
    table = variants(platform)

    def sampler(name: str, n: int) -> Callable:
        v = table[name]
        gd, _ = nnx.split(abstract_model(dataclasses.replace(cfg, **v["cfg"])))
        fn = make_sampler(gd, max_new_tokens=n, pad_id=PAD, **v["kw"])
        return lambda key, sp: fn(params, tokens, mask, key, sp)

    device, _ = torch_device()
    print(f"model {model}: {param_count(params) / 1e6:.1f}M params ({cfg.param_dtype} params, {cfg.dtype} compute), "
          f"batch {BATCH}, prompt {prompt_len} tokens; transformers on {device}")
    return hf.to(device), torch.tensor(prompts, dtype=torch.long, device=device), sampler, dataclasses.asdict(cfg)


def hf_generate(hf: Qwen3ForCausalLM, prompts: torch.Tensor, n: int, greedy: bool) -> torch.Tensor:
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    device, autocast = torch_device()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=PAD, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] == prompts.shape[1] + n
    return out[:, prompts.shape[1]:].cpu()


def bench(hf, prompts, sampler: Callable, names: list[str], n: int, greedy: bool, runs: int) -> dict[str, float]:
    """Median seconds per call of every opd_jax variant and of HF, after one warm-up each; calls interleaved."""
    sp = SamplingParams.create(greedy=greedy, temperature=1.0)
    fns = {name: sampler(name, n) for name in names}
    for name, fn in fns.items():
        out = jax.block_until_ready(fn(jax.random.key(0), sp))  # compile
        assert int(out.lengths.min()) == n, name
    ref = hf_generate(hf, prompts, n, greedy)
    if greedy:  # same weights: the first tokens agree (later ones may drift on near-ties)
        agree = float((np.asarray(out.tokens)[:, :8] == ref[:, :8].numpy()).mean())
        print(f"greedy first-8-token agreement with HF at {n}: {agree:.3f}")
    times: dict[str, list[float]] = {name: [] for name in [*fns, "hf"]}
    for i in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(jax.random.key(i + 1), sp))
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        hf_generate(hf, prompts, n, greedy)
        times["hf"].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=list(MODELS))
    ap.add_argument("--runs", type=int, default=5, help="timed calls per setting (median reported)")
    ap.add_argument("--new-tokens", type=int, nargs="+", default=None, help="default: the model's (shapes.py)")
    ap.add_argument("--greedy", action="store_true", help="also time greedy decoding (doubles the run time)")
    ap.add_argument("--smoke", action="store_true", help="8 and 16 new tokens, one run: checks the script runs")
    args = ap.parse_args(argv)
    shapes = MODELS[args.model]
    if args.smoke:
        args.new_tokens, args.runs = [8, 16], 1
    new_tokens = args.new_tokens or shapes.sampler_new_tokens
    dev = jax.devices()[0]
    platform = "gpu" if dev.platform in ("gpu", "cuda", "rocm") else dev.platform
    names = list(variants(platform))

    print(f"jax {jax.__version__} backend={jax.default_backend()} ({dev.device_kind}) devices={len(jax.devices())}; "
          f"torch {torch.__version__} threads={torch.get_num_threads()} cuda={torch.cuda.is_available()}; "
          f"cpu_count={os.cpu_count()}")
    hf, prompts, sampler, _ = build(args.model, shapes.prompt_len, platform)
    results: dict[tuple[str, int], dict[str, float]] = {}
    modes = ["sample"] + (["greedy"] if args.greedy else [])
    for mode in modes:
        for n in new_tokens:
            results[mode, n] = bench(hf, prompts, sampler, names, n, mode == "greedy", args.runs)
            print(f"done: {mode} {n}", flush=True)

    if platform == "cpu":
        print(f"cpu kernels built: {cpu_kernels.available()}")
    print(f"\n{'mode':<7} {'new':>4} " + " ".join(f"{name + ' s':>18}" for name in names) +
          f" {'hf s':>8} {'opd_jax tok/s':>14} {'hf tok/s':>9} {'speedup':>8} {'opd_jax ms/token':>17}")
    for (mode, n), r in results.items():
        ours, theirs = r["opd_jax"], r["hf"]
        print(f"{mode:<7} {n:>4} " + " ".join(f"{r[name]:>18.3f}" for name in names) +
              f" {theirs:>8.3f} {BATCH * n / ours:>14.0f} {BATCH * n / theirs:>9.0f} {theirs / ours:>7.2f}x "
              f"{1e3 * ours / n:>17.2f}")

    print()
    chip = flops.chip_of(dev)
    print(f"device: {dev.device_kind}" + (f" ({chip.name}, HBM {chip.hbm_bandwidth / 1e12:.2f} TB/s)"
                                          if chip is not None and chip.hbm_bandwidth == chip.hbm_bandwidth else ""))
    for n in new_tokens:  # headline figures: T=1 sampling
        r = results["sample", n]
        print(f"opd_jax_tok_s_{n}: {BATCH * n / r['opd_jax']:.0f}")
        for name in names[1:]:
            print(f"{name}_tok_s_{n}: {BATCH * n / r[name]:.0f}")
        print(f"hf_tok_s_{n}: {BATCH * n / r['hf']:.0f}")
        print(f"speedup_{n}: {r['hf'] / r['opd_jax']:.2f}x")
        for name in names[1:]:
            label = "pure_jax" if name == "opd_jax_pure_jax" else name
            print(f"{label}_speedup_{n}: {r['hf'] / r[name]:.2f}x")
        print(f"opd_jax_ms_per_token_{n}: {1e3 * r['opd_jax'] / n:.2f}")
    if args.greedy:
        for n in new_tokens:
            r = results["greedy", n]
            print(f"greedy_speedup_{n}: {r['hf'] / r['opd_jax']:.2f}x")
    lo, hi = min(new_tokens), max(new_tokens)
    if lo != hi:
        for name in names:
            label = {"opd_jax": "", "opd_jax_pure_jax": "pure_jax_"}.get(name, f"{name}_")
            growth = (results["sample", hi][name] / hi) / (results["sample", lo][name] / lo)
            print(f"{label}per_token_time_growth_{lo}_to_{hi}: {growth:.2f}x")


if __name__ == "__main__":
    main()
