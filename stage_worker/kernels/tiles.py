"""Kernel tiles per GPU: the launch shapes a sweep measured best, looked up at launch time.

Each kernel keeps its own default (paged_decode.DECODE_CONFIG, fp8.GEMV_CONFIG); a tiles file
overrides them for one GPU, as vLLM keeps its fused-MoE configs per device name. The sweeps write
the file (benchmarks/gpu/bench_decode_attention.py, bench_fp8.py --gemv-layers, `--tiles-out`):

    {"device": "NVIDIA H100 80GB HBM3",
     "decode": {"bfloat16": [64, 4, 2], "float8_e4m3fn": [128, 4, 3]},   # BLOCK_N, warps, stages
     "gemv": [8, 1024, 4, 2], "gemv_scales": "grid"}                      # BLOCK_N, BLOCK_K, warps, stages

The worker loads one at start (`--kernel-tiles FILE`; by default the file shipped here for its
GPU's name, `tuned/<name with spaces as _>.json`, when there is one) and sets it for the process with
`use`; the kernels read `active()` when they launch (before a CUDA graph's capture, so a graph
keeps the tiles it was captured with). Every key is optional: a missing one keeps the default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED = Path(__file__).with_name("tuned")  # tuned files per device name, shipped with the package
SCALE_MODES = ("grid", "shared")  # fp8.GEMV_SCALE_MODES (defined here: fp8 imports this module)


@dataclass(frozen=True)
class KernelTiles:
    """Launch shapes that override the kernels' defaults; empty fields keep them."""

    device: str = ""  # the GPU the tiles were measured on
    decode: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # pool dtype -> tile
    gemv: tuple[int, int, int, int] | None = None
    gemv_scales: str | None = None  # one of SCALE_MODES

    def __post_init__(self):
        for name, tile in self.decode.items():
            if len(tile) != 3 or min(tile) < 1:
                raise ValueError(f"decode tile for {name}: (BLOCK_N, warps, stages) of positive ints, got {tile}")
        if self.gemv is not None and (len(self.gemv) != 4 or min(self.gemv) < 1):
            raise ValueError(f"gemv tile: (BLOCK_N, BLOCK_K, warps, stages) of positive ints, got {self.gemv}")
        if self.gemv_scales not in (None, *SCALE_MODES):
            raise ValueError(f"gemv_scales {self.gemv_scales!r}: one of {', '.join(SCALE_MODES)}")

    @classmethod
    def from_json(cls, text: str) -> KernelTiles:
        raw = json.loads(text)
        unknown = set(raw) - {"device", "decode", "gemv", "gemv_scales"}
        if unknown:
            raise ValueError(f"unknown keys in a kernel tiles file: {sorted(unknown)}")
        return cls(device=raw.get("device", ""),
                   decode={k: tuple(int(x) for x in v) for k, v in raw.get("decode", {}).items()},
                   gemv=tuple(int(x) for x in raw["gemv"]) if raw.get("gemv") else None,
                   gemv_scales=raw.get("gemv_scales"))

    def to_json(self) -> str:
        raw = {"device": self.device, "decode": {k: list(v) for k, v in self.decode.items()}}
        if self.gemv:
            raw["gemv"] = list(self.gemv)
        if self.gemv_scales:
            raw["gemv_scales"] = self.gemv_scales
        return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in raw.items()) + "\n}\n"


def shipped_path(device_name: str) -> Path:
    return SHIPPED / (device_name.replace(" ", "_") + ".json")


def load(path: str, device_name: str = "") -> KernelTiles:
    """The tiles in `path`; with no path, the shipped file for `device_name` if there is one, else
    none (every kernel's default)."""
    if path:
        return KernelTiles.from_json(Path(path).read_text())
    shipped = shipped_path(device_name) if device_name else None
    if shipped is not None and shipped.is_file():
        return KernelTiles.from_json(shipped.read_text())
    return KernelTiles()


def merge(path: Path, **fields) -> KernelTiles:
    """Write `fields` (a sweep's winners) into the tiles file at `path`, keeping its other keys
    (so two sweeps fill one file); `decode` entries merge per pool dtype."""
    old = KernelTiles.from_json(path.read_text()) if path.is_file() else KernelTiles()
    decode = {**old.decode, **fields.pop("decode", {})}
    new = KernelTiles(**{**old.__dict__, **fields, "decode": decode})
    path.write_text(new.to_json())
    return new


_active = KernelTiles()


def use(tiles: KernelTiles) -> None:
    """Set the process's tiles (the worker's main, once, before any launch)."""
    global _active
    _active = tiles


def active() -> KernelTiles:
    return _active
