"""A stage's tensors from a PyTorch pickle checkpoint (`pytorch_model.bin`, or shards listed by
`pytorch_model.bin.index.json`), the format of many older Hugging Face repos without safetensors.

Each shard is opened with `torch.load(weights_only=True, mmap=True)`: the unpickler builds only
tensors and plain containers (no code from the file runs), and the storages stay mapped from the
file, so reading a stage's tensors touches only their bytes. Shards the stage has no tensor in
are never opened. A directory with safetensors is read from those instead (as transformers does).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from stagemesh.errors import CheckpointError

BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def is_bin_checkpoint(model_dir: Path) -> bool:
    """A directory whose weights are PyTorch pickles only."""
    if any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").exists():
        return False
    return (model_dir / BIN_INDEX).is_file() or (model_dir / BIN_FILE).is_file()


class BinTensors:
    """The tensors of a .bin checkpoint by name. Used by one loading thread."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._open: tuple[Path, dict] | None = None  # the last shard loaded (one at a time)

    def locations(self) -> dict[str, Path]:
        index = self.dir / BIN_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                return {name: self.dir / fname for name, fname in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc!r})") from exc
        single = self.dir / BIN_FILE
        return {name: single for name in self._load(single)}

    def _load(self, path: Path) -> dict:
        if self._open is not None and self._open[0] == path:
            return self._open[1]
        if not path.is_file():
            raise CheckpointError(f"{path}: shard file is missing")
        try:
            # torch < 1.6 wrote a format that cannot be mapped: read it whole (such files are small)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:  # UnpicklingError for a non-tensor object, RuntimeError for a bad file
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({exc})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
        self._open = (path, state)
        return state

    def tensors(self, path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        state = self._load(path)
        for name in names:
            if name not in state:
                raise CheckpointError(f"{path}: missing tensor {name}")
            yield name, state[name]
        self._open = None  # let the mapping go once its tensors are copied
