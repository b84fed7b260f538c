"""Up-front checks of a checkpoint directory, so a bad one fails at startup with one line naming
the file instead of deep inside a worker. Reads only JSON and safetensors headers (no torch)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig


def validate_checkpoint(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    cfg = ModelConfig.from_dir(model_dir)
    files = _weight_files(model_dir)
    names: set[str] = set()
    for f in files:
        names |= _header_names(f)
    for i in range(cfg.num_hidden_layers):
        # Every decoder layer of every supported family has this norm (DeepSeek V3 has no q_proj).
        probe = f"model.layers.{i}.input_layernorm.weight"
        if probe not in names:
            raise CheckpointError(f"{files[0] if len(files) == 1 else model_dir}: missing tensor {probe}")
    if "model.embed_tokens.weight" not in names:
        raise CheckpointError(f"{model_dir}: missing tensor model.embed_tokens.weight")
    tok = model_dir / "tokenizer.json"
    if tok.exists():
        try:
            json.loads(tok.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{tok}: not valid JSON ({exc})") from exc
    return cfg


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from exc
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir}: no model.safetensors (or index) in the checkpoint directory")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing")
    return files


def _header_names(path: Path) -> set[str]:
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100 * 1024 * 1024:
                raise ValueError("header length is implausible")
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from exc
    return {k for k in header if k != "__metadata__"}
