"""Generated tokens/s: opd_jax's KV-cache sampler vs `transformers.generate` (torch, CPU), in one run.

Both run the same weights of a tiny random Qwen3 (4 layers, hidden 256, vocab 512, 4 heads / 2 KV heads,
head_dim 64, intermediate 768: ~3.4M params) in fp32, batch 32, 32-token prompts, for 64 and 256 new tokens
with no stop token (HF is forced to full length with `min_new_tokens`). Sampling is plain T=1 (HF's default
top-k 50 is switched off), plus greedy with `--greedy`. Compile time / first-call overhead is excluded by one
warm-up call; each figure is the median of `--runs` timed calls, with opd_jax and HF calls interleaved so both
see the same machine load. opd_jax is timed twice: as shipped (on a CPU the one-token attention is the FFI
kernel in opd_jax/kernels) and with `model.cpu_decode_kernel: false` (the pure-JAX block loop, what GPU and
TPU programs run), so the kernel's share shows in the same run. Threads: torch uses its default intra-op
thread count (`torch.get_num_threads()`, printed); XLA's CPU backend uses its own default pool over all cores.
Run: `python benchmarks/sampler.py [--runs 5]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import torch
from flax import nnx
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_jax.kernels import cpu as cpu_kernels
from opd_jax.models.hf_io import load_hf_config, load_hf_params
from opd_jax.models.qwen3 import abstract_model, param_count
from opd_jax.sampling import SamplingParams, make_sampler

HF_CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, rope_theta=10000.0,
                 max_position_embeddings=1024)
BATCH, PROMPT_LEN, PAD = 32, 32, 0


def build(tmp: str) -> tuple[Qwen3ForCausalLM, torch.Tensor, Callable[[int, bool], Callable]]:
    """The HF model, the prompts, and `sampler(max_new_tokens, cpu_kernel) -> fn(key, sp)`: opd_jax on the same
    weights."""
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(**HF_CONFIG)).eval()
    hf.save_pretrained(tmp)
    cfg = load_hf_config(tmp)
    params = load_hf_params(tmp, cfg)
    prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (BATCH, PROMPT_LEN)).astype(np.int32)
    tokens, mask = jax.device_put(prompts), jax.device_put(np.ones_like(prompts, bool))

    def sampler(n: int, cpu_kernel: bool) -> Callable:
        graphdef, _ = nnx.split(abstract_model(dataclasses.replace(cfg, cpu_decode_kernel=cpu_kernel)))
        fn = make_sampler(graphdef, max_new_tokens=n, pad_id=PAD)
        return lambda key, sp: fn(params, tokens, mask, key, sp)

    print(f"model: {param_count(params) / 1e6:.2f}M params, batch {BATCH}, prompt {PROMPT_LEN} tokens")
    return hf, torch.tensor(prompts, dtype=torch.long), sampler


def hf_generate(hf: Qwen3ForCausalLM, prompts: torch.Tensor, n: int, greedy: bool) -> torch.Tensor:
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=PAD, **kw)
    assert out.shape[1] == PROMPT_LEN + n
    return out[:, PROMPT_LEN:]


def bench(hf: Qwen3ForCausalLM, prompts: torch.Tensor, sampler: Callable, n: int, greedy: bool,
          runs: int) -> dict[str, float]:
    """Median seconds per call of opd_jax (as shipped), opd_jax on its pure-JAX path, and HF, after one
    warm-up each; calls interleaved."""
    sp = SamplingParams.create(greedy=greedy, temperature=1.0)
    fns = {"opd_jax": sampler(n, True), "opd_jax_pure_jax": sampler(n, False)}
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
    ap.add_argument("--runs", type=int, default=5, help="timed calls per setting (median reported)")
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--greedy", action="store_true", help="also time greedy decoding (doubles the run time)")
    args = ap.parse_args(argv)

    print(f"jax {jax.__version__} backend={jax.default_backend()} devices={len(jax.devices())}; "
          f"torch {torch.__version__} threads={torch.get_num_threads()}; cpu_count={os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        hf, prompts, sampler = build(tmp)
    results: dict[tuple[str, int], dict[str, float]] = {}
    modes = ["sample"] + (["greedy"] if args.greedy else [])
    for mode in modes:
        for n in args.new_tokens:
            results[mode, n] = bench(hf, prompts, sampler, n, mode == "greedy", args.runs)
            print(f"done: {mode} {n}", flush=True)

    print(f"cpu kernels built: {cpu_kernels.available()}")
    print(f"\n{'mode':<7} {'new':>4} {'opd_jax s':>10} {'pure-JAX s':>11} {'hf s':>8} {'opd_jax tok/s':>14} "
          f"{'hf tok/s':>9} {'speedup':>8} {'opd_jax ms/step':>16}")
    for (mode, n), r in results.items():
        ours, pure, theirs = r["opd_jax"], r["opd_jax_pure_jax"], r["hf"]
        print(f"{mode:<7} {n:>4} {ours:>10.3f} {pure:>11.3f} {theirs:>8.3f} {BATCH * n / ours:>14.0f} "
              f"{BATCH * n / theirs:>9.0f} {theirs / ours:>7.2f}x {1e3 * ours / n:>16.2f}")

    print()
    for n in args.new_tokens:  # headline figures: T=1 sampling
        r = results["sample", n]
        print(f"opd_jax_tok_s_{n}: {BATCH * n / r['opd_jax']:.0f}")
        print(f"opd_jax_pure_jax_tok_s_{n}: {BATCH * n / r['opd_jax_pure_jax']:.0f}")
        print(f"hf_tok_s_{n}: {BATCH * n / r['hf']:.0f}")
        print(f"speedup_{n}: {r['hf'] / r['opd_jax']:.2f}x")
        print(f"pure_jax_speedup_{n}: {r['hf'] / r['opd_jax_pure_jax']:.2f}x")
    if args.greedy:
        for n in args.new_tokens:
            r = results["greedy", n]
            print(f"greedy_speedup_{n}: {r['hf'] / r['opd_jax']:.2f}x")
    lo, hi = min(args.new_tokens), max(args.new_tokens)
    if lo != hi:
        for name, label in (("opd_jax", ""), ("opd_jax_pure_jax", "pure_jax_")):
            growth = (results["sample", hi][name] / hi) / (results["sample", lo][name] / lo)
            print(f"{label}per_token_time_growth_{lo}_to_{hi}: {growth:.2f}x")


if __name__ == "__main__":
    main()
