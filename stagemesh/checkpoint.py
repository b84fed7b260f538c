"""Up-front checks of a checkpoint directory, so a bad one fails at startup with one line naming
the file instead of deep inside a worker. Reads only JSON, safetensors headers, the tensor names of
a .bin's pickle (never its objects) and GGUF metadata (no torch)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

from stagemesh.errors import CheckpointError
from stagemesh.gguf_file import hf_tensor_names, is_gguf
from stagemesh.model_config import ModelConfig


def validate_checkpoint(model_dir: str | Path) -> ModelConfig:
    """The checkpoint's config once its layers' tensors are all listed: a Hugging Face directory
    (safetensors or PyTorch .bin weights) or a .gguf file."""
    model_dir = Path(model_dir)
    if is_gguf(model_dir):
        cfg = ModelConfig.from_dir(model_dir)
        _check_names(cfg, set(hf_tensor_names(model_dir)), model_dir)
        return cfg
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (nor a .gguf file)")
    cfg = ModelConfig.from_dir(model_dir)
    files = _weight_files(model_dir)
    names: set[str] = set()
    legacy = [f for f in files if f.suffix == ".bin" and not zipfile.is_zipfile(f)]
    for f in files:
        names |= _bin_names(f) if f.suffix == ".bin" else _header_names(f)
    if not legacy:  # torch < 1.6's .bin format is one pickle stream: its names need torch (the worker checks)
        _check_names(cfg, names, files[0] if len(files) == 1 else model_dir)
    tok = model_dir / "tokenizer.json"
    if tok.exists():
        try:
            json.loads(tok.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{tok}: not valid JSON ({exc})") from exc
    return cfg


def _check_names(cfg: ModelConfig, names: set[str], where) -> None:
    for i in range(cfg.num_hidden_layers):
        # Every decoder layer of every supported family has this norm (DeepSeek V3 has no q_proj).
        probe = f"model.layers.{i}.input_layernorm.weight"
        if probe not in names:
            raise CheckpointError(f"{where}: missing tensor {probe}")
    if "model.embed_tokens.weight" not in names:
        raise CheckpointError(f"{where}: missing tensor model.embed_tokens.weight")


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    files: list[Path] = []
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from exc
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not index.exists() and not files:
        files = _bin_files(model_dir)
        if not files:
            raise CheckpointError(f"{model_dir}: no model.safetensors, pytorch_model.bin (or their index) "
                                  "in the checkpoint directory")
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


def _bin_files(model_dir: Path) -> list[Path]:
    index = model_dir / "pytorch_model.bin.index.json"
    if index.exists():
        try:
            return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from exc
    single = model_dir / "pytorch_model.bin"
    return [single] if single.is_file() else []


class _Opaque:
    """Whatever a .bin's pickle builds besides dicts: a stand-in that runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _KeysOnly(pickle.Unpickler):
    """Reads a torch.save pickle's dict keys without torch and without running anything from it."""

    def find_class(self, module, name):
        return OrderedDict if (module, name) == ("collections", "OrderedDict") else _Opaque

    def persistent_load(self, pid):
        return None


def _bin_names(path: Path) -> set[str]:
    """Tensor names of a torch.save (zip) state dict, read from its data.pkl (none: legacy format)."""
    if path.is_file() and not zipfile.is_zipfile(path):
        return set()
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
            state = _KeysOnly(io.BytesIO(z.read(pkl))).load()
        return {str(k) for k in state}
    except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, TypeError, ValueError,
            AttributeError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({exc!r})") from exc
