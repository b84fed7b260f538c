"""Load one stage's slice of a safetensors checkpoint, reading only the tensors it needs.

Partitioning is a transform (gpt-fast `apply_tp`, nano-vllm `utils/loader.py`): the stage module
is built for its layer range, and exactly its tensors are read, memory-mapped, from only the shard
files that hold them. So is fusion: each checkpoint tensor is copied into the view of the stage's
tensor it belongs to (q/k/v into rows of qkv_proj, an expert's gate/up/down into its slices of
the stacked expert weights; `PipelineStage.checkpoint_tensors`), so a stage has one layout. A 70B stage serving 10 layers thus touches ~1/8 of the checkpoint.
Every failure is a CheckpointError whose one-line message names the offending file.
A GGUF file (stage_worker/gguf.py: dequantized per tensor) or a directory of PyTorch .bin shards
(stage_worker/torch_bin.py) is another source of the same named tensors, copied the same way.

FP8 block-quantized checkpoints (DeepSeek-V3's `quantization_config: {"quant_method": "fp8",
"weight_block_size": [128, 128]}`): a float8 weight and its sibling `<name>_scale_inv`
[ceil(out/128), ceil(in/128)] are copied as they are into the stage's FP8 layout (models/quant.py:
Fp8Linear, FP8 expert stacks), so the weights stay FP8 on the GPU. `quantization="fp8"`
(`--quantization fp8`) quantizes a bf16/fp32 checkpoint into the same layout at load. An FP8
tensor whose target is a dense weight (MLA's kv_b_proj, absorbed into attention) is dequantized,
`w = fp8.float() * scale_inv` per block. Once loaded, `quant.prepare` picks each FP8 layer's
compute (block-scaled FP8 GEMMs on CUDA SM89+, else dequantized once: one log line says so).
`load_format="dummy"` draws random weights on the device from config.json alone (dummy_weights.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import structlog
import torch
from safetensors import safe_open
from tqdm import tqdm

from stage_worker import dummy_weights
from stage_worker.models import MODEL_REGISTRY, quant
from stage_worker.gguf import GGUFTensors
from stage_worker.torch_bin import BinTensors, is_bin_checkpoint
from stagemesh.errors import CheckpointError
from stagemesh.gguf_file import is_gguf
from stagemesh.model_config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def build_model_on_device(cfg: ModelConfig, layer_start: int, layer_end: int,
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """An uninitialised stage module of the right family (weights are empty, not random)."""
    cls = MODEL_REGISTRY.get(cfg.architecture)
    if cls is None:
        raise CheckpointError(f"config.json: no stage implementation for {cfg.architecture!r} "
                              f"(supported: {', '.join(sorted(MODEL_REGISTRY))})")
    return cls(cfg, layer_start, layer_end, dtype=dtype or checkpoint_dtype(cfg), device=device)


def checkpoint_dtype(cfg: ModelConfig) -> torch.dtype:
    dtype = getattr(torch, cfg.torch_dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json: unknown torch_dtype {cfg.torch_dtype!r}")
    return dtype


LOAD_FORMATS = ("auto", "dummy")


def load_stage(model_dir: str | Path, layer_start: int, layer_end: int,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               quantization: str = "", load_format: str = "auto"):
    """(stage module with its weights, ModelConfig) for layers [layer_start, layer_end).

    quantization "fp8": FP8 128x128 blocks quantized at load; "fp8-channel": per output row where
    the family takes it (models/quant.py, with_quantization);
    load_format "dummy": random weights drawn on the device, no weight files read.
    """
    model_dir = Path(model_dir)
    if load_format not in LOAD_FORMATS:
        raise CheckpointError(f"--load-format {load_format!r} is not supported ({', '.join(LOAD_FORMATS)})")
    cfg = quant.with_quantization(ModelConfig.from_dir(model_dir), quantization)
    model = build_model_on_device(cfg, layer_start, layer_end, device, dtype)
    if load_format == "dummy":
        dummy_weights.init_weights(model, cfg)
        return _prepared(model), cfg
    # Checkpoint name -> the tensor (or the row slice of a merged one) it fills; a tied head
    # appears once, as embed_tokens.
    params = model.checkpoint_tensors()
    other = _other_source(model_dir, cfg)  # a GGUF file or .bin shards; None: safetensors
    locations = _Locations(other.locations()) if other else _tensor_locations(model_dir)
    if other:
        locations.source = model_dir
    wanted = {_hf_name(n): n for n in params}
    tied_head = model.is_last and (cfg.tie_word_embeddings or HEAD not in locations)
    if tied_head and not model.is_first:
        wanted[EMBED] = "lm_head.weight"
    if tied_head:
        wanted.pop(HEAD, None)
    block = quant.fp8_block(cfg) or (quant.BLOCK, quant.BLOCK)
    by_file: dict[Path, list[str]] = {}
    for hf_name in wanted:
        if hf_name not in locations:
            where = locations.source
            raise CheckpointError(f"{where}: missing tensor {hf_name}")
        by_file.setdefault(locations[hf_name], []).append(hf_name)
    # A bar on stderr while tensors are copied (big stages take minutes); tqdm hides it off a TTY.
    bar = tqdm(total=len(wanted), desc=f"loading layers [{layer_start},{layer_end})", unit="tensor",
               file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)
    with torch.no_grad(), bar:
        for path, names in sorted(by_file.items()):
            if other:
                _copy_tensors(other.tensors(path, names), path, wanted, params, on_tensor=bar.update)
                continue
            _copy_from_file(path, names, wanted, params, on_tensor=bar.update,
                            locations=locations, block=block)
    if tied_head and model.is_first:
        model.lm_head.weight = model.embed_tokens.weight
    with torch.no_grad():
        model.after_load()  # a family's own weight conventions (Gemma 2's 1 + w norms)
    return _prepared(model), cfg


def _prepared(model):
    """The stage in eval mode with its FP8 compute chosen; one log line when FP8 weights are
    dequantized for want of FP8 compute on this device (models/quant.py)."""
    path = quant.prepare(model)
    if path is not None:
        device = next(model.parameters()).device
        fields = dict(device=str(device), weight_bytes=quant.weight_bytes(model), layers=model.num_local_layers)
        if path == "dequant" and not quant.fp8_compute_available(device):
            structlog.get_logger().warning(
                "fp8_compute_unavailable", **fields, dtype=str(model.dtype).replace("torch.", ""),
                detail="no FP8 compute on this device: FP8 weights are dequantized at load")
        else:
            structlog.get_logger().info("fp8_weights", **fields, compute=path)
    return model.eval()


def _other_source(model_path: Path, cfg: ModelConfig):
    """The tensor source of a checkpoint not in safetensors (stage_worker/gguf.py, torch_bin.py)."""
    if is_gguf(model_path):
        return GGUFTensors(model_path, cfg.num_attention_heads, cfg.num_key_value_heads)
    if is_bin_checkpoint(model_path):
        return BinTensors(model_path)
    return None


def _copy_tensors(tensors, path: Path, wanted: dict, params: dict, on_tensor=None) -> None:
    """Copy (checkpoint name, tensor) pairs from another source into the model's parameters."""
    for hf_name, tensor in tensors:
        target = params[wanted[hf_name]]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {hf_name} has shape "
                                  f"{tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        if on_tensor is not None:
            on_tensor(1)


def _hf_name(param_name: str) -> str:
    return param_name if param_name.startswith("lm_head.") else "model." + param_name


class _Locations(dict):
    """tensor name -> file holding it; `source` names the file that lists them (for errors)."""

    source: Path


def _tensor_locations(model_dir: Path) -> _Locations:
    index, single = model_dir / INDEX_FILE, model_dir / SINGLE_FILE
    locs = _Locations()
    if index.is_file():
        locs.source = index
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            locs.update({name: model_dir / fname for name, fname in weight_map.items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc!r})") from exc
        return locs
    if not single.is_file():
        raise CheckpointError(f"{single}: no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")
    locs.source = single
    try:
        with safe_open(single, framework="pt") as f:
            locs.update({name: single for name in f.keys()})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{single}: not a readable safetensors file ({exc})") from exc
    return locs


def _copy_from_file(path: Path, names: list[str], wanted: dict, params: dict, on_tensor=None,
                    locations: "_Locations | None" = None, block: tuple[int, int] = (128, 128)) -> None:
    """Copy `names` from one (memory-mapped) shard into the model's parameters."""
    if not path.is_file():
        raise CheckpointError(f"{path}: shard file is missing")
    try:
        f = safe_open(path, framework="pt")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    with f:
        present = set(f.keys())
        for hf_name in names:
            if hf_name not in present:
                raise CheckpointError(f"{path}: missing tensor {hf_name}")
            target = params[wanted[hf_name]]
            tensor = f.get_tensor(hf_name)
            if tensor.dtype in quant.FP8_DTYPES:
                scale = _scale_inv(path, f, present, hf_name, locations)
                tensor = _fp8_into(target, tensor, scale, block, f"{path}: {hf_name}")
            if tensor is not None:  # (None: copied as it is into an FP8 layer)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(f"{path}: tensor {hf_name} has shape "
                                          f"{tuple(tensor.shape)}, expected {tuple(target.shape)}")
                target.copy_(tensor)  # an Fp8Slot quantizes a float tensor (--quantization fp8)
            if on_tensor is not None:
                on_tensor(1)


def _fp8_into(target, tensor: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], where: str):
    """An FP8 checkpoint tensor: into an FP8 layer as is (None returned), else its float32 value."""
    try:
        if isinstance(target, quant.Fp8Slot):
            target.load(tensor, scale, block)
            return None
        return quant.dequantize_blocks(tensor, scale, *block)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


def _scale_inv(path: Path, f, present: set, hf_name: str, locations: "_Locations | None") -> torch.Tensor:
    """An FP8 weight's `<name>_scale_inv` (this shard or another)."""
    scale_name = hf_name + "_scale_inv"  # x.weight -> x.weight_scale_inv (DeepSeek-V3 naming)
    if scale_name in present:
        scale = f.get_tensor(scale_name)
    elif locations is not None and scale_name in locations:
        other = locations[scale_name]
        try:
            with safe_open(other, framework="pt") as g:
                scale = g.get_tensor(scale_name)
        except Exception as exc:
            raise CheckpointError(f"{other}: cannot read {scale_name} ({exc})") from exc
    else:
        raise CheckpointError(f"{path}: FP8 tensor {hf_name} has no {scale_name} to dequantize it")
    return scale
