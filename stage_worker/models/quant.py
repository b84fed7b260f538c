"""FP8 weights (128x128 blocks, or one scale per channel): their layout on the stage, the linear layer that runs them, and
how checkpoint tensors land in them. Both model families build their linears here (layers.py's
`make_linear` / `make_merged_linear`), so a stage holds one layout whatever the checkpoint.

Layout (DeepSeek-V3's checkpoint format, kept as is on the device):
- dense weight `weight` float8_e4m3fn [N, K] (row n = output feature n), and
  `weight_scale_inv` float32 [ceil(N/group_n), ceil(K/128)], the dequant multiplier:
  W[n, k] = weight[n, k] * weight_scale_inv[n // group_n, k // 128].
- stacked experts (the fused-MoE layout): weight [E, N, K] e4m3 and scale
  [E, ceil(N/group_n), ceil(K/128)] float32, one such grid per expert (`fp8_expert_params`);
  expert e's gate/up rows are its [0, I) / [I, 2I) rows, as the bf16 stacks.
- group_n is 128 (the checkpoint's block) for every real model. A merged weight (q/k/v, gate/up)
  whose parts do not start on 128-row boundaries (tiny test models) keeps each part's scales
  exact by a finer row group: group_n = gcd(128, every part's first row), each checkpoint block's
  scale repeated over its 128/group_n row groups (`Fp8Slot.load`). Kernels take group_n as an
  argument (kernels/fp8.py indexes scales by `n // group_n`).
- In blocks, K is always grouped by 128: the activation quant's 1x128 groups line up with them.
- per channel (`--quantization fp8-channel` on a float checkpoint, the Llama
  family's projections): weight_scale_inv [N, 1], one dequant multiplier per output row
  (group_n 1, group_k K). The Triton kernels read these scales as a [N, ceil(K/128)] grid with
  stride 0 along K (a view, no copy).

Where tensors come from (the loader hands each checkpoint tensor to its `Fp8Slot`):
- an e4m3 checkpoint tensor with its `<name>_scale_inv` (quant_method "fp8", block [128, 128]):
  copied as is;
- a bf16/fp32 tensor when the stage quantizes at load (`--quantization fp8`,
  `with_quantization`): quantized per 128x128 block, or per row (`quantize_blocks`, amax / 448),
  on the device;
- dummy weights (`--load-format dummy`): drawn on the device (dummy_weights.py).

Compute (`Fp8Linear.forward`): on a CUDA GPU with FP8 tensor cores (SM89+), block-scaled layers
quantize activations per token in 1x128 groups and run a block-scaled GEMM (kernels/fp8.py: the
Triton kernel, or torch._scaled_mm's blockwise recipe on SM90 where it measures faster,
`gemm_backend`; the GEMV at one row). Per-channel layers (`channel_gemm_backend`) run the GEMV at
1-2 rows, above that torch._scaled_mm's rowwise recipe with one activation scale per token (SM90,
bf16 stages), else the Triton W8A8 kernel with 1x128 activation groups.
Where a quantized input is wanted, the op before the linear can write it so: `input_quant(m)`
names the form the GEMM takes at m rows, and the RMSNorm and SiLU * up kernels (fused_ops'
`quant`) write their output as that kernels/fp8_act.py `Fp8Act`, which `forward` takes as it is:
the numbers of quantizing after them (kernels/fused_ops.py says how exactly), one launch and one
activation round trip fewer.
Elsewhere (the CPU, pre-Ada GPUs) the weight is dequantized once, when the stage is prepared, to
the stage dtype and a plain matmul runs: exactly the dequantized checkpoint's numbers; the loader
logs one line saying so.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from stage_worker.kernels import fp8 as fp8k
from stage_worker.kernels import fp8_act as fp8a
from stage_worker.kernels import tuning
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig

BLOCK = 128  # weight block rows and columns (DeepSeek-V3's weight_block_size)
FP8_DTYPES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
# --quantization values: none / "" (the checkpoint's own format), fp8 and fp8-channel (`fp8_scheme`).
# fp8 scales a bf16/fp32 checkpoint's weights in 128x128 blocks (DeepSeek-V3's layout and kernels);
# fp8-channel scales the Llama family's projections per output row, activations one per token
# (FBGEMM's scheme: torch._scaled_mm's rowwise recipe on SM90). Blocks are the default: on an H100
# per channel decodes one sequence 1.08x faster (Llama-8B: 273.6 vs 252.3 tok/s) with the mixed
# workload within noise, but on a trained model it is the less accurate one
# (benchmarks/check_fp8_accuracy.py, SmolLM2-135M: KL from the unquantized model 0.239 vs 0.209,
# top-1 agreement 78.1% vs 81.1%; README).
QUANTIZATIONS = ("none", "", "fp8", "fp8-channel")


# -- which stages are FP8 ----------------------------------------------------------------------
def fp8_block(cfg: ModelConfig) -> tuple[int, int] | None:
    """(rows, cols) of the checkpoint's FP8 blocks when config.json says FP8, else None."""
    qc = cfg.raw.get("quantization_config") or {}
    method = qc.get("quant_method")
    if not method:
        return None
    if method != "fp8":
        raise CheckpointError(f"config.json: quantization_config.quant_method {method!r} is not supported (fp8)")
    size = qc.get("weight_block_size")
    if not size:
        raise CheckpointError("config.json: quantization_config fp8 without weight_block_size (per-tensor FP8) "
                              "is not supported: only block-quantized FP8 (DeepSeek-V3's 128x128)")
    if len(size) != 2 or min(size) <= 0:
        raise CheckpointError(f"config.json: bad quantization_config.weight_block_size {size!r}")
    return int(size[0]), int(size[1])


def is_fp8(cfg: ModelConfig) -> bool:
    """Build this stage's linears as Fp8Linear (FP8 weights)?"""
    return fp8_block(cfg) is not None


def fp8_scheme(cfg: ModelConfig) -> str | None:
    """None (not FP8), "block" (128x128 scales: FP8 checkpoints, DeepSeek's layout) or "channel"
    (one scale per output row: a bf16/fp32 checkpoint quantized at load by
    `--quantization fp8-channel`). The Llama family's projections honour "channel"; DeepSeek's and every MoE expert
    stack stay block-scaled (their kernels take 128x128 scales)."""
    if not is_fp8(cfg):
        return None
    qc = cfg.raw["quantization_config"]
    return "channel" if qc.get("quantized_at_load") and qc.get("weight_scheme") == "channel" else "block"


def with_quantization(cfg: ModelConfig, quantization: str) -> ModelConfig:
    """The config a stage is built from: `--quantization fp8` / `fp8-channel` marks a bf16/fp32
    checkpoint FP8 (quantized at load: 128x128 blocks, or per channel where the family takes it,
    `fp8_scheme`); "none" leaves it as the checkpoint says (an FP8 checkpoint stays as it is)."""
    if quantization not in QUANTIZATIONS:
        raise CheckpointError(f"--quantization {quantization!r} is not supported (fp8, fp8-channel)")
    if quantization in ("none", "") or is_fp8(cfg):
        return cfg
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [BLOCK, BLOCK], "weight_scheme": "channel" if quantization == "fp8-channel" else "block",
          "quantized_at_load": True}
    return dataclasses.replace(cfg, raw={**cfg.raw, "quantization_config": qc})


def row_group(part_rows: list[int]) -> int:
    """group_n of a weight made of parts of these row counts (128 unless a part starts mid-block)."""
    g, start = BLOCK, 0
    for rows in part_rows[:-1]:
        start += rows
        g = math.gcd(g, start)
    return g


# -- quantize / dequantize (torch, on the tensor's device) ----------------------------------------
def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], scale_inv fp32 [ceil(N/b0), ceil(K/b1)]), DeepSeek-V3's format:
    each block's amax maps to 448."""
    rows, cols = w.shape
    b0, b1 = block
    gr, gc = fp8a.cdiv(rows, b0), fp8a.cdiv(cols, b1)
    padded = torch.zeros(gr * b0, gc * b1, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(gr, b0, gc, b1)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / fp8a.FP8_MAX  # [gr, gc]
    q = (tiles / scale[:, None, :, None]).clamp(-fp8a.FP8_MAX, fp8a.FP8_MAX).to(fp8a.FP8_DTYPE)
    return q.view(gr * b0, gc * b1)[:rows, :cols].contiguous(), scale


def dequantize_blocks(w: torch.Tensor, scale_inv: torch.Tensor, group_n: int = BLOCK,
                      group_k: int = BLOCK) -> torch.Tensor:
    """w [..., N, K] fp8, scale_inv [..., ceil(N/group_n), ceil(K/group_k)] -> float32 [..., N, K]."""
    n, k = w.shape[-2:]
    expect = (fp8a.cdiv(n, group_n), fp8a.cdiv(k, group_k))
    if tuple(scale_inv.shape[-2:]) != expect:
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)}, expected {expect} "
                         f"for a {n}x{k} weight in {group_n}x{group_k} blocks")
    return fp8k.dequant_weight(w, scale_inv, group_n, group_k)


# -- where one checkpoint tensor lands -----------------------------------------------------------
@dataclasses.dataclass
class Fp8Slot:
    """The rows of an FP8 weight that one checkpoint tensor fills, and their scale rows.

    weight: [rows, K] e4m3 view; scale: [ceil(rows/group_n), ceil(K/128)] fp32 view, or per
    channel [rows, 1] (a float tensor quantized here, one scale per row).
    """

    weight: torch.Tensor
    scale: torch.Tensor
    group_n: int
    channel: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @torch.no_grad()
    def load(self, tensor: torch.Tensor, scale_inv: torch.Tensor | None, block: tuple[int, int]) -> None:
        """An e4m3 checkpoint tensor with its scale_inv (checkpoint blocks), or a float tensor
        (quantized here in `block`s, or per row in a per-channel slot); ValueError names what
        does not fit."""
        if self.channel:  # quantized here, one scale per row
            if tensor.dtype in FP8_DTYPES:
                raise ValueError("an FP8 checkpoint tensor for a per-channel FP8 weight")
            block = (1, self.weight.shape[1])
        b0, b1 = block
        if (b1 != BLOCK and not self.channel) or b0 % self.group_n:
            raise ValueError(f"FP8 blocks of {b0}x{b1}: FP8 compute needs {BLOCK}-column blocks "
                             f"and rows a multiple of {self.group_n}")
        if tuple(tensor.shape) != tuple(self.weight.shape):
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(self.weight.shape)}")
        tensor = tensor.to(self.weight.device)
        if tensor.dtype in FP8_DTYPES:
            if scale_inv is None:
                raise ValueError("an FP8 tensor without its scale_inv")
            expect = (fp8a.cdiv(tensor.shape[0], b0), fp8a.cdiv(tensor.shape[1], b1))
            if tuple(scale_inv.shape) != expect:
                raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)}, expected {expect}")
            q, s = tensor.to(fp8a.FP8_DTYPE), scale_inv.to(self.scale.device, torch.float32)
        else:
            q, s = quantize_blocks(tensor, (b0, b1))
        self.weight.copy_(q)
        rows = self.scale.shape[0]
        self.scale.copy_(s.repeat_interleave(b0 // self.group_n, 0)[:rows])

    def copy_(self, tensor: torch.Tensor) -> "Fp8Slot":
        """A float tensor, quantized into the slot in 128x128 blocks, or per row in a per-channel
        slot (the loaders' copy_)."""
        self.load(tensor, None, (BLOCK, BLOCK))
        return self


# -- the linear layer ----------------------------------------------------------------------------
class Fp8Linear(nn.Module):
    """y = x @ W^T + b with W block-quantized (layout above); merged when `parts` is given.

    parts: checkpoint name (a sibling of this module, e.g. "q_proj") -> its output rows, as
    MergedLinear; None: one weight named after this module. Holds weight [N, K] e4m3,
    weight_scale_inv [ceil(N/group_n), ceil(K/128)] fp32, bias [N] in the stage dtype.
    channel: one scale per output row instead (weight_scale_inv [N, 1]: group_n 1, group_k K),
    for a float checkpoint quantized at load (`fp8_scheme`).
    `prepare()` (the loader calls it once the weights are in) picks the compute path for the
    device; forward is then shape-static and sync-free (CUDA-graph capturable).
    """

    def __init__(self, in_features: int, out_features: int | None = None, bias: bool = False,
                 parts: dict[str, int] | None = None, channel: bool = False):
        super().__init__()
        self.parts = dict(parts) if parts else None
        n = sum(self.parts.values()) if self.parts else int(out_features)
        self.in_features, self.out_features, self.channel = in_features, n, channel
        self.group_n = 1 if channel else row_group(list(self.parts.values())) if self.parts else BLOCK
        self.group_k = in_features if channel else BLOCK
        gn, gk = fp8a.cdiv(n, self.group_n), fp8a.cdiv(in_features, self.group_k)
        self.weight = nn.Parameter(torch.empty(n, in_features, dtype=fp8a.FP8_DTYPE), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(torch.empty(gn, gk, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n), requires_grad=False) if bias else None
        self.compute_dtype = torch.get_default_dtype()
        self.backend: str | None = None  # "dequant" | "fp8"; set by prepare()
        self._dense: torch.Tensor | None = None  # dequantized weight (backend "dequant")
        self._ws_mm: torch.Tensor | None = None  # weight scales in _scaled_mm's layout
        self._ws_grid: torch.Tensor | None = None  # per channel: [N, ceil(K/128)] view for the Triton kernels

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scales={'channel' if self.channel else f'group_n={self.group_n}'}, "
                f"bias={self.bias is not None}, backend={self.backend}")

    def fix_dtypes(self, dtype: torch.dtype) -> None:
        """After the stage's `.to(dtype)` (on the meta device, before materialising): weight back
        to e4m3, scales back to fp32; `dtype` is the compute (activation) dtype."""
        self.weight.data = self.weight.data.to(fp8a.FP8_DTYPE)
        self.weight_scale_inv.data = self.weight_scale_inv.data.float()
        self.compute_dtype = dtype

    def checkpoint_views(self, path: str) -> dict:
        """Checkpoint name -> Fp8Slot (weights) or a bias view (what the loader fills)."""
        if self.parts is None:
            views = {f"{path}.weight": Fp8Slot(self.weight, self.weight_scale_inv, self.group_n, self.channel)}
            if self.bias is not None:
                views[f"{path}.bias"] = self.bias
            return views
        parent = path.rpartition(".")[0]
        prefix = parent + "." if parent else ""
        views, start = {}, 0
        for name, rows in self.parts.items():
            views[f"{prefix}{name}.weight"] = fp8_slot(self.weight, self.weight_scale_inv, self.group_n, start, rows,
                                                       self.channel)
            if self.bias is not None:
                views[f"{prefix}{name}.bias"] = self.bias[start:start + rows]
            start += rows
        return views

    @torch.no_grad()
    def prepare(self) -> str:
        """Pick the compute path for the weight's device (once, after loading); returns it."""
        device = self.weight.device
        if fp8_compute_available(device):
            self.backend, self._dense, self._ws_mm, self._ws_grid = "fp8", None, None, None
            n, k = self.out_features, self.in_features
            if self.channel:
                self._ws_grid = self.weight_scale_inv.expand(n, fp8a.cdiv(k, BLOCK))
                if fp8k.rowwise_ok(n, k) and self.compute_dtype == torch.bfloat16 and rowwise_available(device):
                    self._ws_mm = self.weight_scale_inv.view(1, n)
            elif fp8k.scaled_mm_ok(n, k, self.group_n) and scaled_mm_available(device):
                self._ws_mm = fp8k.scaled_mm_weight_scale(self.weight_scale_inv)
        else:
            self.backend = "dequant"
            self._dense = self.dense_weight()
        return self.backend

    def dense_weight(self) -> torch.Tensor:
        """The dequantized weight [N, K] in the compute dtype (a new tensor)."""
        return dequantize_blocks(self.weight, self.weight_scale_inv, self.group_n, self.group_k).to(self.compute_dtype)

    def _backend(self, m: int) -> str:
        """The GEMM for m rows (`backend` "fp8")."""
        if self.channel:
            return channel_gemm_backend(m, self._ws_mm is not None)
        return gemm_backend(m, self.out_features, self.in_features, self._ws_mm is not None)

    def input_quant(self, m: int) -> str | None:
        """How this layer's GEMM wants m rows of input: quantized ("group": 1x128, "row": one scale
        per row; kernels/fp8.py Fp8Act) or as they are (None: the GEMV, W8A16, dequantized
        weights). The op before it can then write them so (fused_ops' `quant`): one pass fewer."""
        if self.backend is None:
            self.prepare()
        if self.backend != "fp8" or not tuning.active().fuse_act_quant:
            return None
        return fp8k.act_kind(fp8k.resolve_backend(self._backend(m), self.compute_dtype))

    def forward(self, x: torch.Tensor | fp8a.Fp8Act) -> torch.Tensor:  # x: [..., K], or [M, K] quantized
        if self.backend is None:
            self.prepare()
        if isinstance(x, fp8a.Fp8Act):  # written by the op before, as input_quant(M) asked
            if self.backend != "fp8":
                raise ValueError(f"quantized input for an FP8 linear on the {self.backend!r} path")
            lead, x2, m, dtype = (x.rows,), x, x.rows, self.compute_dtype
        else:
            if self.backend == "dequant":
                return F.linear(x, self._dense, self.bias)
            lead, dtype = x.shape[:-1], x.dtype
            x2 = x.reshape(-1, self.in_features)
            m = x2.shape[0]
        # Per channel, the Triton kernels read the per-row scales as a [N, K/128] grid (stride 0 along K).
        ws, group_n = (self._ws_grid, 1) if self.channel else (self.weight_scale_inv, self.group_n)
        y = fp8k.fp8_gemm(x2, self.weight, ws, group_n, self._backend(m), self._ws_mm, dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


def input_quant(module: nn.Module, m: int) -> str | None:
    """What `module` (a linear, or a block whose first op is one) wants its m input rows as:
    Fp8Linear.input_quant, None for anything else (a bf16 linear, a MoE block)."""
    fn = getattr(module, "input_quant", None)
    return fn(m) if fn is not None else None


def fp8_slot(weight: torch.Tensor, scale: torch.Tensor, group_n: int, start: int, rows: int,
             channel: bool = False) -> Fp8Slot:
    """The slot of rows [start, start + rows) of a [N, K] FP8 weight and its scale grid."""
    if start % group_n:
        raise ValueError(f"part starting at row {start} is not on a {group_n}-row group")
    g0 = start // group_n
    return Fp8Slot(weight[start:start + rows], scale[g0:g0 + fp8a.cdiv(rows, group_n)], group_n, channel)


# -- stacked experts -------------------------------------------------------------------------------
def fp8_expert_params(experts: int, part_rows: list[int], k: int) -> tuple[nn.Parameter, nn.Parameter, int]:
    """(weight [E, N, K] e4m3, scale [E, ceil(N/group_n), ceil(K/128)] fp32, group_n) of a stack
    of experts whose rows are `part_rows` (gate, up: [I, I]; down: [H]); group_n is 128 for every
    real model (`row_group`); `fp8_slot` gives each expert's checkpoint tensor its rows."""
    n = sum(part_rows)
    gn = row_group(part_rows)
    w = nn.Parameter(torch.empty(experts, n, k, dtype=fp8a.FP8_DTYPE), requires_grad=False)
    s = nn.Parameter(torch.empty(experts, fp8a.cdiv(n, gn), fp8a.cdiv(k, BLOCK), dtype=torch.float32),
                     requires_grad=False)
    return w, s, gn


# -- the device's FP8 compute --------------------------------------------------------------------
def fp8_compute_available(device: torch.device) -> bool:
    """FP8 tensor cores and Triton: CUDA SM89+ (Ada, Hopper, Blackwell)."""
    return (device.type == "cuda" and fp8k.triton is not None
            and torch.cuda.get_device_capability(device) >= (8, 9))


def rowwise_available(device: torch.device) -> bool:
    """torch._scaled_mm's rowwise recipe (per-row x per-column scales, bf16 out): SM90, torch >= 2.5
    (CUTLASS before CUDA 12.9, cuBLASLt from it; measured: torch 2.11 + CUDA 13.0)."""
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return device.type == "cuda" and version >= (2, 5) and torch.cuda.get_device_capability(device) == (9, 0)


def scaled_mm_available(device: torch.device) -> bool:
    """torch._scaled_mm's blockwise 1x128 x 128x128 recipe: SM90 with CUDA >= 12.9."""
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0) and cuda >= (12, 9)


# Where torch._scaled_mm (cuBLASLt blockwise) beats our Triton kernel, measured on an H100 at
# DeepSeek-V3's shapes (benchmarks/gpu/bench_fp8.py, README): from M = 64 at every shape (1.1-1.8x),
# and from M = 16 when K is long (o_proj, down_proj, gate_up: K >= 4096; q_b's K = 1536 ties);
# smaller M runs Triton (cuBLASLt also needs M % 4 == 0: kernels/fp8.py pads). Shapes it cannot
# take (N or K not a multiple of 128: kv_a_proj's 576 rows) always run Triton.
SCALED_MM_MIN_M, SCALED_MM_MIN_M_LONG_K, LONG_K = 64, 16, 4096


# Where each FP8 GEMM runs is measured: the thresholds are the tuning's (kernels/tuning.py:
# gemv_max_m, w8a16_max_m, channel_gemv_max_m; their measurements there). W8A16 runs on weights of at
# most this many rows (Llama-8B's qkv; the 28,672-row gate_up was no faster than _scaled_mm).
W8A16_MAX_N = 6144


def gemm_backend(m: int, n: int, k: int, scaled_mm_ready: bool) -> str:
    """The GEMM for an [M, K] x [N, K]^T product: "gemv" (decode's few rows, kernels/fp8.py
    w8a16_gemv, up to the tuning's gemv_max_m), "w8a16" (up to its w8a16_max_m rows, narrow
    weights), "scaled_mm" or "triton" (measured rules above)."""
    t = tuning.active()
    if m <= min(t.gemv_max_m, fp8k.GEMV_MAX_M):
        return "gemv"
    if m <= t.w8a16_max_m and n <= W8A16_MAX_N:
        return "w8a16"
    if scaled_mm_ready and (m >= SCALED_MM_MIN_M or (m >= SCALED_MM_MIN_M_LONG_K and k >= LONG_K)):
        return "scaled_mm"
    return "triton"


def channel_gemm_backend(m: int, rowwise_ready: bool) -> str:
    """The GEMM of a per-channel FP8 linear: the GEMV at decode's few rows, torch._scaled_mm's
    rowwise recipe where the device has it, else the Triton W8A8 kernel."""
    if m <= min(tuning.active().channel_gemv_max_m, fp8k.GEMV_MAX_M):
        return "gemv"
    return "rowwise" if rowwise_ready else "triton"


def fp8_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that can hold FP8 weights (Fp8Linear, expert stacks: an `fp8_prepare` method
    that returns None when its stacks are not FP8)."""
    return [m for m in model.modules() if isinstance(m, Fp8Linear) or hasattr(m, "fp8_prepare")]


def fix_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    for m in model.modules():
        if hasattr(m, "fix_dtypes"):
            m.fix_dtypes(dtype)


def prepare(model: nn.Module) -> str | None:
    """Choose every FP8 module's compute path after loading. Returns None (no FP8 weights),
    "fp8" (FP8 GEMMs) or "dequant" (weights dequantized: no FP8 compute on this device)."""
    paths = {m.prepare() if isinstance(m, Fp8Linear) else m.fp8_prepare() for m in fp8_modules(model)}
    paths.discard(None)  # a module that could hold FP8 weights but does not
    if not paths:
        return None
    return "dequant" if "dequant" in paths else "fp8"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stage's parameters as held (FP8 weights count 1 byte, scales 4)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
