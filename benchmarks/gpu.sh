#!/usr/bin/env bash
# Issue #16's GPU benchmark set in one command, one log: under 6 minutes on one H200.
#
#   bash benchmarks/gpu.sh            # on a GPU machine, from the repository root
#   bash benchmarks/gpu.sh --smoke    # every part at tiny shapes on whatever backend JAX finds (a CPU here)
#
# Log: $OUT/gpu.log when $OUT is set (the device tool's output folder), else benchmarks/gpu.log. Each part runs
# under its own timeout, so one failing or hanging part does not lose the others; the log ends with every
# part's exit status and all `name: value` headline lines collected in one block.
#
# Parts (timeouts sum to 360 s; expected about 5 minutes on an H200):
#   1. versions and the device;
#   2. correctness on the device: tests/test_decode.py (every decode attention equals dense attention; on a GPU
#      also the compiled Triton kernel, fp32 <= 1e-5) and the one-program test;
#   3. benchmarks/decode_attention.py: one layer, B=32, 16 q / 8 KV heads, head_dim 128, bf16, 384 and 5,120
#      slots, half and full: every decode variant against one dense masked product, and the read roofline;
#   4. benchmarks/sampler.py --model qwen3-0.6b: the sampler (as shipped, dense, and the pre-#16 decode path)
#      against transformers.generate (CUDA, bf16 autocast);
#   5. benchmarks/opd_step.py --model qwen3-0.6b: the fused step vs unfused vs TRL GKDTrainer (CUDA, bf16
#      autocast), with the decode ms/step, the weight-read roofline and MFU;
#   6. benchmarks/profile_decode.py --model qwen3-0.6b: one sampler call under jax.profiler, the device ops by
#      time per decode step and launches per step (the cost after attention); the trace is kept in $OUT/trace.
#
# Dependencies. jax (CUDA), flax, optax, orbax, transformers and torch come from the image; opd_jax from this
# checkout (PYTHONPATH, nothing is installed into the image). Part 5's TRL side needs trl and accelerate (pure
# Python) besides datasets, pandas, pyarrow and psutil. If the image lacks trl or accelerate, fetch their wheels on
# a machine with PyPI into .whl/ (git-ignored; carry it to the GPU machine with the checkout):
#     pip download --no-deps -d .whl trl==1.16.0 accelerate==1.15.0
# and this script installs them from there (pip --no-index --no-deps --target, a private folder on PYTHONPATH).
# Should datasets (or pandas / pyarrow / psutil) be missing too, fetch binary wheels for the image's Python:
#     pip download -d .whl --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12 \
#         datasets pandas pyarrow psutil dill multiprocess xxhash
# Without them part 5 runs the opd_jax variants only (--skip-trl) and says so.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
# timeouts are sized for an H200 host; a smoke run on a small shared CPU machine gets more (TIMEOUT_SCALE)
SCALE=${TIMEOUT_SCALE:-$([[ $SMOKE == 1 ]] && echo 6 || echo 1)}
PY=${PYTHON:-python}
LOG=${OUT:+$OUT/gpu.log}
LOG=${LOG:-$ROOT/benchmarks/gpu.log}
mkdir -p "$(dirname "$LOG")"
: > "$LOG"
DEPS=$(mktemp -d /tmp/opd_gpu_deps.XXXXXX)
export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
STATUS=()

log() { echo "$@" | tee -a "$LOG"; }

part() {  # part NAME TIMEOUT_S CMD...: run, tee into the log, record the exit status
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    log ""
    log "=== $name (timeout ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "=== $name: exit $rc after $((SECONDS - t0)) s$([[ $rc == 124 || $rc == 137 ]] && echo ' (TIMED OUT)')"
    STATUS+=("$name: exit $rc ($((SECONDS - t0)) s)")
}

log "opd_jax GPU benchmarks ($([[ $SMOKE == 1 ]] && echo smoke || echo full)), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+changes')"

# ---- 1. versions, device, dependencies -------------------------------------------------------------------------
if ! "$PY" -c "import trl, accelerate" 2>/dev/null; then
    if ls "$ROOT"/.whl/trl-*.whl >/dev/null 2>&1; then
        log "installing trl/accelerate from .whl/ into $DEPS"
        "$PY" -m pip install -q --no-index --no-deps --find-links "$ROOT/.whl" --target "$DEPS" trl accelerate \
            2>&1 | tee -a "$LOG"
    else
        log "trl/accelerate missing and no .whl/trl-*.whl: part 5 runs without TRL (see the header for the download)"
    fi
fi
TRL=1
"$PY" -c "import trl, accelerate, datasets" 2>/dev/null || TRL=0
part versions 15 "$PY" - <<'EOF'
import importlib, os, platform, sys
import jax
print(f"python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs")
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "transformers", "torch", "trl", "accelerate",
             "datasets"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: not importable ({type(e).__name__})")
print("jax devices:", jax.devices())
d = jax.devices()[0]
print(f"device_kind: {d.device_kind}, platform {d.platform}")
from opd_jax import flops
chip = flops.chip_of(d)
print(f"chip: {chip}")
import torch
print(f"torch cuda: {torch.cuda.is_available()}" + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""))
EOF

# ---- 2. correctness on the device --------------------------------------------------------------------------------
part tests 45 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_decode.py \
    "tests/test_step.py::test_fused_step_is_one_program"

# ---- 3. one layer's decode attention -----------------------------------------------------------------------------
if [[ $SMOKE == 1 ]]; then
    part decode_attention 40 "$PY" benchmarks/decode_attention.py --smoke
else
    part decode_attention 40 "$PY" benchmarks/decode_attention.py --runs 5 --reps 20
fi

# ---- 4, 5. sampler and the OPD step at the issue's shapes --------------------------------------------------------
# JAX and torch share the GPU in one process: let JAX allocate on demand instead of taking 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [[ $SMOKE == 1 ]]; then
    part sampler 100 "$PY" benchmarks/sampler.py --smoke
    part opd_step 130 "$PY" benchmarks/opd_step.py --smoke $([[ $TRL == 1 ]] || echo --skip-trl)
    part profile 30 "$PY" benchmarks/profile_decode.py --smoke
else
    part sampler 100 "$PY" benchmarks/sampler.py --model qwen3-0.6b --runs 3
    part opd_step 130 "$PY" benchmarks/opd_step.py --model qwen3-0.6b --rounds 3 --threads 0 \
        $([[ $TRL == 1 ]] || echo --skip-trl)
    part profile 30 "$PY" benchmarks/profile_decode.py --model qwen3-0.6b --new-tokens 64
fi

# ---- summary ---------------------------------------------------------------------------------------------------
log ""
log "=== summary"
for s in "${STATUS[@]}"; do log "  $s"; done
log "=== headline lines"
grep -E '^[a-z][a-z0-9_]*: ' "$LOG" | grep -vE '^(jax devices|device_kind|chip|torch cuda|trl|accelerate|datasets|trace|model|device):' \
    > "$LOG.headlines" || true
tee -a "$LOG" < "$LOG.headlines"
rm -f "$LOG.headlines"
rm -rf "$DEPS"
echo "log: $LOG"
