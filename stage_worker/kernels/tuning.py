"""Kernel tuning per GPU: launch tiles and dispatch thresholds, one file, read at launch time.

Every setting a benchmark measured and may want to change for a GPU lives here, with its default
and the measurement behind it: no environment variable is read at import time (STYLE item 7). A
tuning file overrides the defaults for one GPU, as vLLM keeps its fused-MoE configs per device
name; the sweeps write one (`--tuning-out FILE`: benchmarks/gpu/bench_decode_attention.py,
bench_gemv.py --layers, bench_moe.py --sweep), and a same-run comparison of two settings is two
meshes with two files. For example:

    {"device": "NVIDIA H100 80GB HBM3",
     "decode": {"bfloat16": [64, 4, 2], "float8_e4m3fn": [128, 4, 3]},
     "gemv": [8, 1024, 4, 2], "gemv_scales": "grid", "gemv_max_m": 1}

The worker loads one at start (`--kernel-tuning FILE`; by default the file shipped here for its
GPU's name, `tuned/<name with spaces as _>.json`, when there is one) and sets it for the process
with `use`; the kernels and dispatchers read `active()` when they launch (before a CUDA graph's
capture, so a graph keeps what it was captured with), mla_expand_min_tokens when a DeepSeek stage
is built. Every key is optional: a missing one keeps the default.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED = Path(__file__).with_name("tuned")  # tuning files per device name, shipped with the package
SCALE_MODES = ("grid", "shared")  # fp8.GEMV_SCALE_MODES (defined here: fp8 imports this module)
POOL_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")  # K/V pools paged decode reads
MOE_KINDS = ("fp8", "16bit")  # fused_moe's tile tables by expert weight type


def _is_int(v, least: int) -> bool:
    return type(v) is int and v >= least  # not a bool, not a float


def _pow2(v) -> bool:
    return _is_int(v, 1) and v & (v - 1) == 0


def _tile(t, n: int) -> bool:
    return isinstance(t, tuple) and len(t) == n and all(_is_int(v, 1) for v in t)


def _from_json(value):
    """JSON as the dataclass holds it: lists as tuples (tiles), numeric object keys as ints (MoE
    buckets: "32" -> 32); anything else as it is, for the checks to name."""
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict):
        return {int(k) if k.isdigit() else k: _from_json(v) for k, v in value.items()}
    return value


def _check_moe_table(kind, table) -> None:
    if kind not in MOE_KINDS:
        raise ValueError(f"moe: unknown weight type {kind!r} (known: {', '.join(MOE_KINDS)})")
    if not isinstance(table, dict) or 0 not in table or not all(_is_int(b, 0) for b in table):
        raise ValueError(f"moe {kind}: an object of rows-per-expert buckets (ints, 0 among them) -> tile")
    for bucket, tile in table.items():
        ok = _tile(tile, 6) and all(_pow2(v) and v >= 16 for v in tile[:3])
        if not ok or (kind == "fp8" and tile[2] not in (128, 256)):
            raise ValueError(f"moe {kind} bucket {bucket}: [BLOCK_M, BLOCK_N, BLOCK_K (powers of two >= 16; "
                             f"FP8: BLOCK_K 128 or 256), GROUP_M, warps, stages] of positive ints, got {tile!r}")


@dataclass(frozen=True)
class KernelTuning:
    """Launch tiles and dispatch thresholds of the stage's kernels (defaults: measured on an H100)."""

    device: str = ""  # the GPU the file was measured on (informational)

    # -- attention ------------------------------------------------------------------------------
    # Paged decode tile (BLOCK_N, num_warps, num_stages) per pool dtype ("bfloat16",
    # "float8_e4m3fn", ...); a missing dtype takes kernels/paged_decode.DECODE_CONFIG.
    decode: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # Fused MoE tiles (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per expected rows
    # per expert (numel / E; the largest bucket <= it wins; bucket 0 required), one table per expert
    # weight type ("fp8": BLOCK_K 128, or 256 for two quant groups a step; "16bit": bf16/fp16/fp32),
    # each replacing kernels/fused_moe.CONFIGS_FP8 / CONFIGS_16BIT whole (benchmarks/gpu/bench_moe.py
    # --sweep --tuning-out writes them).
    moe: dict[str, dict[int, tuple[int, int, int, int, int, int]]] = field(default_factory=dict)
    # MLA decode: a head block's output columns split over this many programs. 1 until measured to
    # win on a GPU (kernels/mla_decode.py).
    mla_split_r: int = 1
    # MLA prefill chunks of at least this many new tokens take the expanded form (0: never). By FLOP
    # count at V3's widths the expanded form wins above ~30-60 queries a chunk; below 256 tokens a
    # fresh prompt's attention is a few per cent of its cost either way (kernels/mla_expand.py).
    mla_expand_min_tokens: int = 256

    # -- FP8 GEMMs (kernels/fp8.py, fp8_act.py; dispatch in models/quant.py) ----------------------
    # The GEMV's (BLOCK_N, BLOCK_K, num_warps, num_stages); None takes fp8.GEMV_CONFIG.
    gemv: tuple[int, int, int, int] | None = None
    # Programs that share each N block's K in the GEMV (partials summed in split order by the last
    # to arrive). 1 until a sweep measures more to win (bench_gemv.py --layers): ncu (2026-12-07, one
    # row, Llama-8B o and down, N / 8 = 512 programs of 4 warps) put achieved occupancy at 23% of
    # 50% and DRAM throughput at 47-65%: short of bytes in flight, which more programs add.
    gemv_split_k: int = 1
    # How the GEMV applies the weight scales (fp8.gemv_scale_fits). "grid" by default: on an H100
    # (ncu, 2026-12-07, one row, tile 8,1024,4,2) "shared" ran 5-7% slower at Llama-8B's o and down
    # (11.1-11.2 vs 10.5-10.7 us, 30.3-30.4 vs 28.2-28.3 us).
    gemv_scales: str = "grid"
    # The GEMV at one row: products summed across the [BLOCK_N, BLOCK_K] tile once at the end instead
    # of at every K step. Off: timed on an H100, no gain (README).
    gemv_late_sum: bool = False
    # Rows up to which block-scaled linears run the GEMV instead of the tensor-core kernel. On an H100
    # (bench_gemv.py, then bench_fp8.py --gemv; 2026-12-07): at one row it reads the weights at 1.0-2.1 TB/s against
    # 0.14-1.96 for activation quant + tensor-core kernel, at every V3 and Llama-8B shape (1.1-2.5x);
    # at four rows it loses at most shapes. Batch-1 decode through the mesh: Llama-8B FP8 199 -> 249
    # tok/s, the V3 stage 284 -> 304. 0: off.
    gemv_max_m: int = 1
    # Rows up to which per-channel linears run the GEMV (scales read once per row): on an H100
    # (bench_fp8.py --rowwise, 2026-12-07) at Llama-8B's four projections, 1 row 118 us in all
    # against 133 for the block-scaled GEMV and 200 for bf16; 2 rows 166 against 226 for quant +
    # rowwise _scaled_mm and 199 for bf16; 4 rows 234 against 173 (so not there). 0: off.
    channel_gemv_max_m: int = 2
    # Rows up to which the W8A16 tensor-core GEMM (x unquantized) runs on narrow weights
    # (quant.W8A16_MAX_N), from the GEMV's rows. Off: on an H100 (bench_fp8.py --llama --tune,
    # 2026-12-07, 16 rows) it beat _scaled_mm and the W8A8 kernel at Llama-8B's qkv, o and down, but
    # through the mesh (shipped tiles, prescaled form) it took the mixed workload from 6,442 to 5,785
    # output tok/s.
    w8a16_max_m: int = 0
    # The W8A16 GEMM's weight tile dequantized before the MMA (one accumulate chain, the numbers of
    # x @ dequant(w).to(x.dtype)) rather than each 128-wide K block's product scaled after it.
    w8a16_prescale: bool = True
    # Quant groups one activation-quant program takes. On an H100 (bench_fp8.py --act-quant,
    # 2026-12-07, outputs equal): one 128-value group per 1-warp program read 170-640 GB/s at the V3
    # stage's shapes (242-4,096 rows), 8 groups 200-2,700 GB/s (1.1-4.3x; 1 of 18 cases slower),
    # and the V3 stage's mixed workload went 4,077 -> 4,186 output tok/s with it (README).
    act_quant_groups: int = 8
    # The op before an FP8 GEMM (RMSNorm, SiLU * up) writes its input quantized instead of a separate
    # quant launch (fused_ops' `quant`, asked through Fp8Linear.input_quant).
    fuse_act_quant: bool = True

    def __post_init__(self):
        hints = typing.get_type_hints(KernelTuning)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hints[f.name] is bool and not isinstance(value, bool):
                raise ValueError(f"{f.name}: true or false, got {value!r}")
            if hints[f.name] is int and not _is_int(value, 0):
                raise ValueError(f"{f.name}: an int >= 0, got {value!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device: a string, got {self.device!r}")
        if not isinstance(self.decode, dict):
            raise ValueError(f"decode: an object of pool dtype -> tile, got {self.decode!r}")
        for name, tile in self.decode.items():
            if name not in POOL_DTYPES:
                raise ValueError(f"decode: unknown pool dtype {name!r} (known: {', '.join(POOL_DTYPES)})")
            if not (_tile(tile, 3) and _pow2(tile[0])):
                raise ValueError(f"decode tile for {name}: [BLOCK_N (a power of two), warps, stages] of "
                                 f"positive ints, got {tile!r}")
        if self.gemv is not None and not (_tile(self.gemv, 4) and _pow2(self.gemv[0]) and self.gemv[1] % 128 == 0
                                          and _pow2(self.gemv[1] // 128)):
            raise ValueError(f"gemv tile: [BLOCK_N (a power of two), BLOCK_K (128 times a power of two), warps, "
                             f"stages] of positive ints, got {self.gemv!r}")
        if not isinstance(self.moe, dict):
            raise ValueError(f"moe: an object of weight type -> bucket table, got {self.moe!r}")
        for kind, table in self.moe.items():
            _check_moe_table(kind, table)
        if self.gemv_scales not in SCALE_MODES:
            raise ValueError(f"gemv_scales {self.gemv_scales!r}: one of {', '.join(SCALE_MODES)}")
        if self.act_quant_groups < 1:
            raise ValueError("act_quant_groups must be >= 1")
        if not 1 <= self.gemv_split_k <= 16:
            raise ValueError(f"gemv_split_k: 1 to 16, got {self.gemv_split_k}")
        if not _pow2(self.mla_split_r) or self.mla_split_r > 8:  # a head block's 512 output columns split evenly
            raise ValueError(f"mla_split_r: 1, 2, 4 or 8, got {self.mla_split_r}")

    @classmethod
    def from_json(cls, text: str) -> KernelTuning:
        """A tuning file's text -> KernelTuning; ValueError naming what is wrong."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"a kernel tuning file holds one JSON object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown keys in a kernel tuning file: {sorted(unknown)} (known: {sorted(known)})")
        return cls(**{k: _from_json(v) for k, v in raw.items()})

    def changed(self) -> dict:
        """The fields that differ from the defaults."""
        default = KernelTuning()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def to_json(self) -> str:
        """The fields that differ from the defaults, one per line (`device` always)."""
        raw = {"device": self.device, **self.changed()}
        return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in raw.items()) + "\n}\n"


def shipped_path(device_name: str) -> Path:
    return SHIPPED / (device_name.replace(" ", "_") + ".json")


def load(path: str, device_name: str = "") -> KernelTuning:
    """The tuning in `path`; with no path, the shipped file for `device_name` if there is one, else
    the defaults."""
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"kernel tuning file {path}: {exc.strerror or exc}") from exc
        return KernelTuning.from_json(text)
    shipped = shipped_path(device_name) if device_name else None
    if shipped is not None and shipped.is_file():
        return KernelTuning.from_json(shipped.read_text())
    return KernelTuning()


def merge(path: Path, **fields) -> KernelTuning:
    """Write `fields` (a sweep's winners) into the tuning file at `path`, keeping its other keys
    (so several sweeps fill one file); `decode` merges per pool dtype, `moe` per weight type."""
    old = KernelTuning.from_json(path.read_text()) if path.is_file() else KernelTuning()
    for name in ("decode", "moe"):
        fields[name] = {**getattr(old, name), **fields.get(name, {})}
    new = dataclasses.replace(old, **fields)
    path.write_text(new.to_json())
    return new


_active = KernelTuning()


def use(tuning: KernelTuning) -> None:
    """Set the process's tuning (the worker's main, once, before any launch; tests)."""
    global _active
    _active = tuning


def active() -> KernelTuning:
    return _active
