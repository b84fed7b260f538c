"""Load one stage's slice of a safetensors checkpoint, reading only the tensors it needs.

Partitioning is a transform (gpt-fast `apply_tp`, nano-vllm `utils/loader.py`): the stage module
is built for its layer range, and exactly its tensors are read, memory-mapped, from only the shard
files that hold them. A 70B stage serving 10 layers thus touches ~1/8 of the checkpoint.
Every failure is a CheckpointError whose one-line message names the offending file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from stage_worker.models import MODEL_REGISTRY
from stagemesh.errors import CheckpointError
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
        raise CheckpointError(f"config.json: no stage implementation for {cfg.architecture!r}")
    return cls(cfg, layer_start, layer_end, dtype=dtype or checkpoint_dtype(cfg), device=device)


def checkpoint_dtype(cfg: ModelConfig) -> torch.dtype:
    dtype = getattr(torch, cfg.torch_dtype.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json: unknown torch_dtype {cfg.torch_dtype!r}")
    return dtype


def load_stage(model_dir: str | Path, layer_start: int, layer_end: int,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(stage module with its weights, ModelConfig) for layers [layer_start, layer_end)."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    model = build_model_on_device(cfg, layer_start, layer_end, device, dtype)
    params = dict(model.named_parameters())  # tied head appears once, as embed_tokens
    locations = _tensor_locations(model_dir)
    wanted = {_hf_name(n): n for n in params}
    tied_head = model.is_last and (cfg.tie_word_embeddings or HEAD not in locations)
    if tied_head and not model.is_first:
        wanted[EMBED] = "lm_head.weight"
    if tied_head:
        wanted.pop(HEAD, None)
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
            _copy_from_file(path, names, wanted, params, on_tensor=bar.update)
    if tied_head and model.is_first:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), cfg


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


def _copy_from_file(path: Path, names: list[str], wanted: dict, params: dict, on_tensor=None) -> None:
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
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(f"{path}: tensor {hf_name} has shape "
                                      f"{tuple(tensor.shape)}, expected {tuple(target.shape)}")
            target.copy_(tensor)
            if on_tensor is not None:
                on_tensor(1)
