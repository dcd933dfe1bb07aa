"""Hugging Face checkpoint I/O: load Qwen3 safetensors straight into sharded stacked params, and export back.

Loading never holds the whole model in host memory: every stacked parameter is built with
`jax.make_array_from_callback`, and the callback reads only the slice one device needs (one host process only
ever asks for its addressable shards).

How tensors are read: safetensors files are memory-mapped with `numpy.memmap` at the byte offsets given in
the file header, and sliced. We do not use `safetensors.safe_open(framework="numpy")` because it raises
`TypeError` on bfloat16 (numpy has no bfloat16; real Qwen3 checkpoints are bf16), and `framework="flax"`
would first copy every slice onto the default device. A memmap slice pages in only the bytes it touches,
which is what `safe_open` does internally too; bf16 comes out as `ml_dtypes.bfloat16`, which JAX accepts.

Remote checkpoints (`gs://...`, anything `etils.epath` opens): safetensors must be mapped from a local file,
so the weight files are first streamed to a local temporary directory (disk, not RAM; every host downloads
the whole checkpoint), loaded from there, and deleted. This needs an epath backend for the scheme (gcsfs or
tensorflow for gs://). Export to a remote directory writes each file locally, then streams it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, Sharding, SingleDeviceSharding
from safetensors.numpy import save_file

from opd_jax.config.schema import LoRAConfig, MeshConfig, ModelConfig
from opd_jax.errors import CheckpointError
from opd_jax.mesh import make_mesh, named_sharding
from opd_jax.models.qwen3 import abstract_model, model_axes
from opd_jax.models.weight_mapping import config_from_hf, config_to_hf, hf_expected_names, ours_to_hf
from opd_jax.models.weights import GLOBAL_WEIGHTS, LAYER_WEIGHTS, weight

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' save_pretrained default ("5GB")

_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# safetensors dtype tag -> numpy dtype (the format is little-endian).
_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype(bool),
}
# Checkpoint tensors we accept and ignore: old RoPE buffers, and a redundant lm_head when the config ties it
# to the embedding (transformers also ignores both).
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


# ---- reading safetensors -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    """One tensor in a local safetensors file: enough to memory-map any slice of it."""

    name: str
    file: str  # local path to read
    where: str  # the checkpoint file as the user named it, for error messages
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, self.dtype)[index]
        mm = np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return np.array(mm[index])  # copy: pages in only what the slice touches


def _read_header(local: str, where: str) -> dict[str, _Tensor]:
    """The tensors of a local safetensors file, checked against the file's size (a file cut short by a failed
    copy or download fails here, naming the file and the first tensor it cannot hold, not at the first read)."""
    size = os.path.getsize(local)
    with open(local, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n < 1 << 28 or 8 + n > size:
            raise CheckpointError(f"{where}: truncated or corrupt safetensors file (bad header length, file of "
                                  f"{size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{where}: truncated or corrupt safetensors file (unreadable header)") from None
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {h['dtype']}")
        begin, end = h["data_offsets"]
        dt = _ST_DTYPES[h["dtype"]]
        if end - begin != math.prod(h["shape"]) * dt.itemsize or 8 + n + end > size:
            raise CheckpointError(f"{where}: truncated or corrupt safetensors file: tensor {name!r} needs bytes "
                                  f"{8 + n + begin}..{8 + n + end} but the file has {size}",
                                  hint="copy or download the checkpoint again")
        out[name] = _Tensor(name, local, where, dt, tuple(h["shape"]), 8 + n + begin)
    return out


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


@contextlib.contextmanager
def _open_checkpoint(path: str | os.PathLike) -> Iterator[dict[str, _Tensor]]:
    """Yield every tensor of an HF checkpoint dir (single file or index + shards), by name."""
    root = epath.Path(path)
    if not root.is_dir():
        raise CheckpointError(f"HF checkpoint: {path} is not a directory")
    weight_map: dict[str, str] | None = None
    if (root / SINGLE_FILE).exists():  # transformers also prefers the single file when both exist
        files = [SINGLE_FILE]
    elif (root / INDEX_FILE).exists():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        raise CheckpointError(f"HF checkpoint: neither {SINGLE_FILE} nor {INDEX_FILE} in {path}")

    tmp = tempfile.mkdtemp(prefix="opd_jax_hf_") if _is_remote(path) else None
    try:
        tensors: dict[str, _Tensor] = {}
        for fname in files:
            src = root / fname
            if not src.exists():
                raise CheckpointError(f"HF checkpoint: {src} (listed in {INDEX_FILE}) does not exist")
            local = os.fspath(src)
            if tmp is not None:
                local = os.path.join(tmp, fname)
                with src.open("rb") as r, open(local, "wb") as w:
                    shutil.copyfileobj(r, w, 16 << 20)
            for name, t in _read_header(local, os.fspath(src)).items():
                if name in tensors:
                    raise CheckpointError(f"HF checkpoint: tensor {name!r} is in both {tensors[name].where} and "
                                          f"{t.where}")
                tensors[name] = t
        for name, fname in (weight_map or {}).items():
            if name not in tensors or os.path.basename(tensors[name].where) != fname:
                raise CheckpointError(f"HF checkpoint: {INDEX_FILE} puts tensor {name!r} in {root / fname}, "
                                 "but that file does not contain it")
        yield tensors
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- layouts -------------------------------------------------------------------------------------------
def _hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of the HF tensor that holds one layer slice (or all) of our parameter `name`."""
    w = weight(name)
    return tuple(reversed(w.matrix(cfg))) if w.linear else w.shape(cfg)  # torch Linear: [out, in]


def _hf_entries(cfg: ModelConfig) -> list[tuple[str, str, int | None]]:
    """(our name, HF name, layer or None) for every HF tensor, in HF's usual file order."""
    out: list[tuple[str, str, int | None]] = [("embed", GLOBAL_WEIGHTS["embed"].hf, None)]
    for i in range(cfg.num_layers):
        out += [(name, w.hf.format(i=i), i) for name, w in LAYER_WEIGHTS.items()]
    out.append(("final_norm", GLOBAL_WEIGHTS["final_norm"].hf, None))
    if not cfg.tie_embeddings:
        out.append(("lm_head", GLOBAL_WEIGHTS["lm_head"].hf, None))
    return out


def _flat_block(index: tuple[slice, ...], dims: tuple[int, ...]) -> tuple[int, int, tuple[slice, ...]]:
    """A block of dims that HF flattens into one axis: the flat range covering whole rows of the leading
    dim, plus the slices still to apply to the trailing dims after un-flattening."""
    inner = math.prod(dims[1:])
    return index[0].start * inner, index[0].stop * inner, index[1:]


def _read_ours(t: _Tensor, linear: bool, n_in: int, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Read `index` (slices of our layout `shape`) from HF tensor `t`, touching only the rows/columns needed."""
    if not linear:
        return t.read(index)
    in_dims, out_dims = shape[:n_in], shape[n_in:]
    r0, r1, out_rest = _flat_block(index[n_in:], out_dims)
    c0, c1, in_rest = _flat_block(index[:n_in], in_dims)
    block = t.read((slice(r0, r1), slice(c0, c1))).T  # [in_flat, out_flat]
    n_lead_in, n_lead_out = index[0].stop - index[0].start, index[n_in].stop - index[n_in].start
    block = block.reshape(n_lead_in, *in_dims[1:], n_lead_out, *out_dims[1:])
    return block[(slice(None), *in_rest, slice(None), *out_rest)]


def _normalize(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, d in zip(index, shape, strict=True):
        start, stop, step = s.indices(d)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


# ---- loading -------------------------------------------------------------------------------------------
def load_hf_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """ModelConfig from `path/config.json`; keyword overrides set any field (param_dtype, dtype, remat...)."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:  # config_from_hf would silently setattr them
        raise ValueError(f"load_hf_config: unknown ModelConfig field(s) {unknown}")
    hf = json.loads((epath.Path(path) / "config.json").read_text())
    overrides.setdefault("hf_path", os.fspath(path))
    return config_from_hf(hf, **overrides)


# ModelConfig fields that say how to run a model, not what it is: they come from our config, never config.json
RUN_FIELDS = ("param_dtype", "dtype", "remat", "attention_chunk", "cpu_decode_kernel")


def hf_config_for(cfg: ModelConfig) -> ModelConfig:
    """The architecture in `cfg.hf_path`'s config.json, run the way `cfg` says (RUN_FIELDS)."""
    return load_hf_config(cfg.hf_path, **{name: getattr(cfg, name) for name in RUN_FIELDS})


def _validate(tensors: Mapping[str, _Tensor], cfg: ModelConfig, where: str) -> None:
    expected = hf_expected_names(cfg)
    missing = sorted(expected - set(tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"HF checkpoint {where}: missing tensor {missing[0]!r}{more}")
    tolerated = {GLOBAL_WEIGHTS["lm_head"].hf} if cfg.tie_embeddings else set()
    for name, t in sorted(tensors.items()):
        if name not in expected and name not in tolerated and not _IGNORED.match(name):
            raise CheckpointError(f"HF checkpoint: unexpected tensor {name!r} in {t.where}")
    for ours, hf_name, _ in _hf_entries(cfg):
        t, want = tensors[hf_name], _hf_shape(ours, cfg)
        if t.shape != want:
            raise CheckpointError(f"HF checkpoint: tensor {hf_name!r} in {t.where} has shape {t.shape}, "
                             f"expected {want} for this config")


def load_hf_params(
    path: str | os.PathLike,
    cfg: ModelConfig,
    mesh: Mesh | None = None,
    rules=None,
    dtype: str | None = None,
) -> dict[str, jax.Array]:
    """Load an HF Qwen3 checkpoint into the pure params dict of `build_model(cfg)` (base weights only).

    With a mesh, each parameter is created directly in its `opd_jax.mesh` sharding; without, on one device.
    `dtype` ("float32" / "bfloat16") defaults to `cfg.param_dtype`; the checkpoint's own dtype is cast.
    Raises ValueError naming the tensor and file for a missing, unexpected or mis-shaped tensor."""
    if (dtype or cfg.param_dtype) not in _NP_DTYPES:
        raise ValueError(f"load_hf_params: dtype must be one of {sorted(_NP_DTYPES)}, got {dtype or cfg.param_dtype!r}")
    target = _NP_DTYPES[dtype or cfg.param_dtype]
    _, state = nnx.split(abstract_model(cfg))
    abstract, axes = nnx.to_pure_dict(state), model_axes(state)
    with _open_checkpoint(path) as tensors:
        _validate(tensors, cfg, os.fspath(path))
        params = {}
        for name, leaf in abstract.items():
            if mesh is None:
                sharding: Sharding = SingleDeviceSharding(jax.local_devices()[0])
            else:
                sharding = named_sharding(mesh, axes[name], leaf.shape, rules)
            params[name] = _load_param(name, tuple(leaf.shape), tensors, cfg, sharding, target)
    return params


def _load_param(
    name: str, shape: tuple[int, ...], tensors: Mapping[str, _Tensor], cfg: ModelConfig, sharding: Sharding,
    target: np.dtype,
) -> jax.Array:
    try:
        w = weight(name)
    except KeyError:
        raise ValueError(f"load_hf_params: model parameter {name!r} has no HF mapping") from None
    stacked = name in LAYER_WEIGHTS
    sources = [tensors[w.hf.format(i=i)] for i in range(cfg.num_layers)] if stacked else [tensors[w.hf]]
    linear, n_in = w.linear, w.n_in
    # make_array_from_callback calls back once per addressable device; devices holding the same
    # (partially replicated) shard share one read.
    memo: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        idx = _normalize(index, shape)
        key = tuple((s.start, s.stop) for s in idx)
        if key not in memo:
            if stacked:
                parts = [_read_ours(sources[i], linear, n_in, shape[1:], idx[1:]) for i in range(idx[0].start,
                                                                                                   idx[0].stop)]
                arr = np.stack(parts) if parts else np.zeros([s.stop - s.start for s in idx], target)
            else:
                arr = _read_ours(sources[0], linear, n_in, shape, idx)
            memo[key] = arr.astype(target, copy=False)
        return memo[key]

    return jax.make_array_from_callback(shape, sharding, read)


# ---- LoRA ----------------------------------------------------------------------------------------------
def merge_lora(
    base_params: Mapping[str, jax.Array], lora_params: Mapping[str, jax.Array], lora_cfg: LoRAConfig
) -> dict[str, jax.Array]:
    """W + alpha/rank * A @ B for every LoRA target, computed in fp32 on device, keeping W's dtype and
    sharding. `lora_params` holds `lora_{name}_a` [L, *in, r] and `lora_{name}_b` [L, r, *out]."""
    if lora_cfg.rank <= 0:
        return dict(base_params)
    triples = {}
    for name in lora_cfg.targets:
        ka, kb = f"lora_{name}_a", f"lora_{name}_b"
        if ka not in lora_params or kb not in lora_params:
            raise ValueError(f"merge_lora: adapter {ka!r}/{kb!r} missing for target {name!r}")
        if name not in base_params:
            raise ValueError(f"merge_lora: base parameter {name!r} missing")
        triples[name] = (jnp.asarray(base_params[name]), lora_params[ka], lora_params[kb])
    shardings = {name: w.sharding for name, (w, _, _) in triples.items()}
    # One jit for all targets (one compile); outputs keep each W's sharding.
    merged = jax.jit(_merge_all, static_argnums=1, out_shardings=shardings)(triples, lora_cfg.alpha / lora_cfg.rank)
    return {**base_params, **merged}


def _merge_all(triples: dict[str, tuple[jax.Array, jax.Array, jax.Array]], scale: float) -> dict[str, jax.Array]:
    out = {}
    for name, (w, a, b) in triples.items():
        L, r = a.shape[0], a.shape[-1]
        delta = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(np.float32),
                                 b.reshape(L, r, -1).astype(np.float32), precision=jax.lax.Precision.HIGHEST)
        out[name] = (w.astype(np.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
    return out


# ---- export --------------------------------------------------------------------------------------------
@jax.jit
def _take_layer(x: jax.Array, i: jax.Array) -> jax.Array:
    # A traced index: one compile per parameter shape, not one per layer.
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _host(x) -> np.ndarray:
    """Gather one (possibly sharded, possibly multi-host) array to host memory."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _write_safetensors(dst: epath.Path, tensors: dict[str, np.ndarray]) -> None:
    metadata = {"format": "pt"}  # transformers expects the torch format tag
    if not _is_remote(dst):
        save_file(tensors, os.fspath(dst), metadata=metadata)
        return
    with tempfile.TemporaryDirectory(prefix="opd_jax_export_") as tmp:
        local = os.path.join(tmp, dst.name)
        save_file(tensors, local, metadata=metadata)
        with open(local, "rb") as r, dst.open("wb") as w:
            shutil.copyfileobj(r, w, 16 << 20)


def export_hf(
    params: Mapping[str, jax.Array],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    lora: LoRAConfig | None = None,
    overwrite: bool = False,
) -> None:
    """Write `config.json` and safetensors weights that `transformers.AutoModelForCausalLM` loads.

    `params` is the pure params dict (sharded or not; every process must call this, process 0 writes).
    LoRA adapters (`lora_*` keys) are merged into the base weights with `lora`'s alpha/rank. `dtype`
    ("float32"/"bfloat16") defaults to `cfg.param_dtype`. Weights are gathered one layer slice at a time,
    so host memory holds at most about one output file (`max_shard_bytes`; several files plus
    `model.safetensors.index.json` when the model is larger). Refuses to write into a directory that already
    holds weights unless `overwrite` (stale files would shadow the new ones)."""
    dtype = dtype or cfg.param_dtype
    if dtype not in _NP_DTYPES:
        raise ValueError(f"export_hf: dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
    out_dt = _NP_DTYPES[dtype]
    params = dict(params)
    lora_keys = sorted(k for k in params if k.startswith("lora_"))
    if lora_keys:
        if lora is None or lora.rank <= 0:
            raise ValueError(f"export_hf: params hold LoRA adapters ({lora_keys[0]}, ...) but no LoRAConfig was given")
        params = merge_lora(params, {k: params.pop(k) for k in lora_keys}, lora)

    _, state = nnx.split(abstract_model(cfg))
    abstract = nnx.to_pure_dict(state)
    for name in sorted(set(abstract) | set(params)):
        if name not in params:
            raise ValueError(f"export_hf: parameter {name!r} missing from params")
        if name not in abstract:
            raise ValueError(f"export_hf: unexpected parameter {name!r} for this config")
        if tuple(params[name].shape) != tuple(abstract[name].shape):
            raise ValueError(f"export_hf: parameter {name!r} has shape {tuple(params[name].shape)}, "
                             f"expected {tuple(abstract[name].shape)}")

    out = epath.Path(out_dir)
    if out.exists() and not overwrite:
        stale = sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_FILE)
        if stale:
            raise CheckpointError(f"export_hf: {out_dir} already holds weights ({stale[0]}, ...)",
                                  hint="pass overwrite=True (opd-jax convert --overwrite) or another directory")

    # Plan files from shapes alone, so names ("-of-N") are known before any gathering.
    entries = _hf_entries(cfg)
    shards: list[list[tuple[str, str, int | None]]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(_hf_shape(e[0], cfg)) * out_dt.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in out.iterdir():
                if p.name.endswith(".safetensors") or p.name == INDEX_FILE:
                    p.unlink()
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards, strict=True):
        tensors = {}
        for ours, hf_name, layer in shard:
            x = params[ours]
            if layer is not None:
                x = _take_layer(x, layer) if isinstance(x, jax.Array) else np.asarray(x)[layer]
            # Every process joins the gather (a collective when multi-host); only process 0 keeps the result.
            t = ours_to_hf(_host(x), ours).astype(out_dt)
            tensors[hf_name] = t
            weight_map[hf_name] = fname
            total += t.nbytes
        if writer:
            _write_safetensors(out / fname, tensors)
        del tensors
    if writer:
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        hf_cfg = config_to_hf(cfg)
        hf_cfg["torch_dtype"] = dtype
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("opd_jax.export_hf")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def copy_aux_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the non-weight top-level files of an HF dir (tokenizer, generation config, chat template...)
    next to exported weights. `config.json` and weight/index files are not copied. Returns the names."""
    src_p, dst_p = epath.Path(src), epath.Path(dst)
    copied = []
    dst_p.mkdir(parents=True, exist_ok=True)
    for p in sorted(src_p.iterdir()):
        if p.is_dir() or p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        with p.open("rb") as r, (dst_p / p.name).open("wb") as w:
            shutil.copyfileobj(r, w)
        copied.append(p.name)
    return copied


# ---- convert -------------------------------------------------------------------------------------------
def convert(src: str, dst: str, *, dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            overwrite: bool = False, copy_aux: bool = True) -> str:
    """`opd-jax convert SRC DST`: re-export an HF Qwen3 checkpoint (a local or gs:// directory, or a Hub id)
    through opd_jax (a dtype change, re-sharded files, or a check that opd_jax reads it). `dtype` defaults to the
    source's torch_dtype (float32 unless it is bf16/fp32). Returns the dtype written. Trained opd_jax weights are
    exported from Python with `export_hf` (e.g. `export_hf(trainer.state.trainable, trainer.student.cfg, dir)`)."""
    from opd_jax import hub

    src = hub.resolve(src)
    src_cfg = json.loads((epath.Path(src) / "config.json").read_text())
    dtype = dtype or str(src_cfg.get("torch_dtype") or src_cfg.get("dtype") or "float32")
    if dtype not in _NP_DTYPES:
        dtype = "float32"
    cfg = load_hf_config(src, param_dtype=dtype, dtype=dtype)
    # Spread the weights over every local device (TPU/GPU HBM) rather than one.
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = load_hf_params(src, cfg, mesh=mesh, dtype=dtype)
    export_hf(params, cfg, dst, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    if copy_aux and jax.process_index() == 0:
        copy_aux_files(src, dst)
    return dtype


__all__: Sequence[str] = [
    "load_hf_config", "load_hf_params", "export_hf", "merge_lora", "copy_aux_files", "convert",
    "DEFAULT_MAX_SHARD_BYTES",
]
