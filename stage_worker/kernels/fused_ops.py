"""Fused elementwise ops of a decoder layer: fewer, larger kernel launches on the CUDA path.

A CUDA-graph decode step of an 8B Llama launches ~30 small kernels per layer, most of them
elementwise (RMSNorm's casts and products, the residual add, rotary's muls/adds/cat, the two
index_copy_ into the KV pool, SiLU and the gate*up product, the split combine of paged decode).
Each function here does one of those groups in one Triton kernel:

- `rms_norm(x, weight, eps)`: RMSNorm of [T, H] rows (the first layer's input norm).
- `fused_add_rms_norm(x, residual, weight, eps) -> (normed, new_residual)`: the residual add and
  the next RMSNorm in one pass (every other norm of the layer stack).
- `silu_and_mul(gate_up)`: [T, 2I] fused gate/up projection output -> silu(gate) * up, [T, I];
  `gelu_tanh_and_mul(gate_up)` the same with Gemma's gelu_pytorch_tanh (same kernel, ACT=1).
- `rotary_and_cache(qkv, cos, sin, n_q, n_kv, k_cache, v_cache, slot_mapping) -> q`: rotary
  embedding of q and k from the fused qkv projection output [T, n_q + 2 n_kv, D], rotated k and
  raw v written into the flat-slot KV pool ([N, n_kv, D], see kv_cache.py), rotated q returned.
- `combine_splits(part, lse, dtype)`: the flash-decoding split combine of paged_decode.py.

The norms and SiLU/GELU * up take `quant` ("group": 1x128 groups, "row": one scale per row):
their output then comes out quantized for the FP8 GEMM after it (kernels/fp8_act.py `Fp8Act`) in
the op's own kernel (`_store_quant`, kernels/fp8_act.py's quant formula): norm-then-quant up to the
order in which the norm sums its squares, which the compiler may lay out differently once the
128-wide groups are in the kernel (on an H100: equal bits in every bf16/fp16 case of
benchmarks/check_fused_ops.py, fp32 scales within 4 ulp; the mesh's batch-1 tokens on random
weights changed, README).

Each has a plain-torch reference (`*_torch`, used on CPU or when Triton is missing) with the
formula the model code had before the kernel (models/llama.py, paged_decode.py); the dispatcher picks
Triton when the tensor is on CUDA and Triton imports (`use_triton=None`), or as forced (the Triton
interpreter runs the kernels on CPU tensors: TRITON_INTERPRET=1 with use_triton=True).
Everything is shape-static and free of host synchronisation, so it can be captured in a CUDA
graph; T == 0 returns empty tensors without launching anything.

Numerics (what the kernels match; benchmarks/check_fused_ops.py measures it):
- Every intermediate the torch formula rounds to the activation dtype is rounded here too (casts
  in the kernel), so in bf16/fp16 the results equal torch's up to the fp32 work inside one op.
- RMSNorm: sum of squares in fp32 (tree order, not torch's: the only source of difference),
  mean and 1/sqrt correctly rounded (div_rn, sqrt_rn: as torch's CPU rsqrt, 1 / sqrt), then
  (x * inv).to(dtype), then weight * that in fp32 rounded once (torch's bf16 * bf16).
- SiLU: g / (1 + exp(-g)) in fp32 rounded to dtype, times up in fp32 rounded to dtype. tl.exp is
  the hardware approximation on CUDA (a few fp32 ulp), so rare 1-ulp bf16 differences remain.
- Rotary: x*cos and rotate_half(x)*sin are each rounded to dtype, then their sum (torch's three
  bf16 kernels); negating before a product is exact, so the first half is x1*c - x2*s.
- Kernels are compiled with enable_fp_fusion=False: no mul+add contracted into an FMA, so fp32
  products and sums round as torch's separate kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stage_worker.kernels import fp8_act as fp8a
from stage_worker.kernels.fp8_act import Fp8Act, quantize_act
from stage_worker.kv_cache import FP8_KV, FP8_KV_MAX, write_slots

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

ROTARY_ELEMS = 2048  # elements (heads * head_dim) one rotary program handles
SILU_BLOCK = 1024  # columns of the output one silu_and_mul program handles


_QUANT_CODES = {None: 0, "group": 1, "row": 2}  # the kernels' QUANT: fp8_act.Fp8Act kinds


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def _pick(use_triton: bool | None, x: torch.Tensor) -> bool:
    if use_triton is None:
        return triton_available(x.device)
    if use_triton and triton is None:
        raise RuntimeError("use_triton=True but Triton is not installed")
    return use_triton


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a unit stride along its last dim (a view when it already has one)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm_warps(block: int) -> int:
    return min(16, max(4, block // 512))  # 4096 columns -> 8 warps, 16 B per thread and load


# ----------------------------------------------------------------------------- RMSNorm

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, use_triton: bool | None = None,
             quant: str | None = None) -> torch.Tensor | Fp8Act:
    """x: [T, H]; weight: [H] -> weight * rms_norm(x) [T, H] (dtype: torch's weight * x).

    quant "group" / "row": the normalised rows come out quantized for the FP8 GEMM that reads
    them (kernels/fp8_act.py Fp8Act: quantize_act of the normalised tensor, up to the order of its
    sum of squares, module docstring), in the norm's own kernel: no [T, H] write and read between
    them, one launch fewer."""
    if not _pick(use_triton, x):
        return _quantized(rms_norm_torch(x, weight, eps), quant)
    return _rms_norm_triton(x, None, weight, eps, quant)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       use_triton: bool | None = None,
                       quant: str | None = None) -> tuple[torch.Tensor | Fp8Act, torch.Tensor]:
    """x, residual: [T, H] same dtype -> (rms_norm(x + residual), x + residual), both [T, H];
    quant as rms_norm's (the first comes out quantized)."""
    if x.dtype != residual.dtype or x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must match")
    if not _pick(use_triton, x):
        out, res = fused_add_rms_norm_torch(x, residual, weight, eps)
        return _quantized(out, quant), res
    return _rms_norm_triton(x, residual, weight, eps, quant)


def _quantized(out: torch.Tensor, quant: str | None) -> torch.Tensor | Fp8Act:
    """The reference of a fused quant: the op's output, then kernels/fp8_act.py's activation quant."""
    return out if quant is None else quantize_act(out, quant, use_triton=False)


def _outputs(t: int, k: int, dtype: torch.dtype, quant: str | None, device):
    """What a kernel with `quant` writes: (result, OUT, Q, S, rows). result: the plain [T, K]
    output in dtype, or (quant) the empty Fp8Act it fills; OUT, Q, S: its pointers, stand-ins
    where unwritten (OUT then one element of dtype, the type the kernel rounds to); rows: the
    programs' rows (T, or T padded for "group")."""
    if quant is None:
        out = torch.empty(t, k, dtype=dtype, device=device)
        return out, out, out, out, t
    act = fp8a.empty_act(t, k, quant, device)
    return act, torch.empty(1, 1, dtype=dtype, device=device), act.q, act.scale, act.q.shape[0]


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference (and the CPU path of models/layers.py's RMSNorm): transformers' formula, float32
    statistics; on CUDA torch's fused F.rms_norm for them."""
    dtype = x.dtype
    if x.is_cuda:
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(dtype)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fused_add_rms_norm_torch(x, residual, weight, eps):
    res = x + residual
    return rms_norm_torch(res, weight, eps), res


def _rms_norm_triton(x, residual, weight, eps, quant=None):
    t, h = x.shape
    res_out = torch.empty_like(x) if residual is not None else None
    result, out, q, sc, rows = _outputs(t, h, torch.promote_types(weight.dtype, x.dtype), quant, x.device)
    if rows == 0:
        return result, res_out
    x = _rows(x)
    r = _rows(residual) if residual is not None else x  # dummy pointer when HAS_RES is False
    ro = res_out if res_out is not None else x
    block = max(triton.next_power_of_2(h), fp8a.GROUP_K if quant == "group" else 1)
    _rms_norm_kernel[(rows,)](
        x, r, weight.contiguous(), out, ro, q, sc, t,
        x.stride(0), r.stride(0), out.stride(0), ro.stride(0), q.stride(0), sc.stride(0), sc.stride(1),
        h, float(h), float(eps), fp8a.EPS, fp8a.FP8_MAX,
        HAS_RES=residual is not None, QUANT=_QUANT_CODES[quant], GROUP=fp8a.GROUP_K, BLOCK=block,
        num_warps=_norm_warps(block), enable_fp_fusion=False,
    )
    return result, res_out


# ----------------------------------------------------------------------------- SiLU * up

def silu_and_mul(gate_up: torch.Tensor, use_triton: bool | None = None,
                 quant: str | None = None) -> torch.Tensor | Fp8Act:
    """gate_up: [T, 2I] (gate columns first, as chunk(2, -1)) -> silu(gate) * up [T, I]; quant
    as rms_norm's (the product comes out quantized for the FP8 GEMM after it)."""
    if not _pick(use_triton, gate_up):
        return _quantized(silu_and_mul_torch(gate_up), quant)
    return _act_and_mul_triton(gate_up, 0, quant)


def gelu_tanh_and_mul(gate_up: torch.Tensor, use_triton: bool | None = None,
                      quant: str | None = None) -> torch.Tensor | Fp8Act:
    """gate_up: [T, 2I] -> gelu(gate, approximate="tanh") * up [T, I] (Gemma's gelu_pytorch_tanh)."""
    if not _pick(use_triton, gate_up):
        return _quantized(gelu_tanh_and_mul_torch(gate_up), quant)
    return _act_and_mul_triton(gate_up, 1, quant)


def act_quant_fusable(i: int, quant: str | None) -> bool:
    """Whether silu_and_mul / gelu_tanh_and_mul can quantize an [T, I] product in its kernel:
    "row" holds a whole row in one program (up to kernels/fp8_act.py ROW_QUANT_ONE_PASS_MAX)."""
    return quant != "row" or triton.next_power_of_2(i) <= fp8a.ROW_QUANT_ONE_PASS_MAX


def _act_and_mul_triton(gate_up: torch.Tensor, act_fn: int, quant: str | None = None) -> torch.Tensor | Fp8Act:
    t, two_i = gate_up.shape
    i = two_i // 2
    if not act_quant_fusable(i, quant):
        return quantize_act(_act_and_mul_triton(gate_up, act_fn), quant, use_triton=True)
    result, out, q, sc, rows = _outputs(t, i, gate_up.dtype, quant, gate_up.device)
    if rows == 0 or i == 0:
        return result
    gate_up = _rows(gate_up)
    if quant == "row":  # a program per row
        block = triton.next_power_of_2(i)
    else:
        block = max(min(SILU_BLOCK, triton.next_power_of_2(i)), fp8a.GROUP_K if quant else 1)
    _silu_mul_kernel[(rows, triton.cdiv(i, block))](
        gate_up, out, q, sc, t, gate_up.stride(0), out.stride(0), q.stride(0), sc.stride(0), sc.stride(1),
        i, fp8a.EPS, fp8a.FP8_MAX, BLOCK=block, ACT=act_fn, QUANT=_QUANT_CODES[quant], GROUP=fp8a.GROUP_K,
        num_warps=4 if block <= SILU_BLOCK else 16, enable_fp_fusion=False,
    )
    return result


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference: chunk(2) of the merged gate/up output, silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference: gelu(gate, approximate="tanh") * up, as transformers' Gemma MLP."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# ----------------------------------------------------------------------------- rotary + KV write

def rotary_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     use_triton: bool | None = None) -> torch.Tensor:
    """Rotate q and k, write k and v into the pool, return q.

    qkv: [T, n_q + 2 n_kv, D] (q heads, k heads, v heads; unit stride along D); cos, sin: [T, D]
    in qkv's dtype (LlamaStage.rotary); k_cache, v_cache: [N, n_kv, D]; slot_mapping: [T] long,
    every slot in [0, N) (duplicates allowed: padding rows share a scratch slot, whose content
    is then a mix of those rows, element by element, since their programs race).
    Returns the rotated q as a new [T, n_q, D] tensor in qkv's dtype. Mutates k_cache, v_cache.
    """
    t, nh, d = qkv.shape
    if nh != n_q + 2 * n_kv:
        raise ValueError(f"qkv has {nh} heads, expected n_q + 2 n_kv = {n_q + 2 * n_kv}")
    if d % 2:
        raise ValueError(f"head_dim {d} must be even")
    if not _pick(use_triton, qkv):
        return rotary_and_cache_torch(qkv, cos, sin, n_q, n_kv, k_cache, v_cache, slot_mapping)
    q = torch.empty(t, n_q, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    qkv, cos, sin = _rows(qkv), _rows(cos), _rows(sin)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a unit stride along head_dim")
    half = d // 2
    half_pad = triton.next_power_of_2(half)
    heads = min(triton.next_power_of_2(nh), max(1, ROTARY_ELEMS // (2 * half_pad)))
    _rotary_cache_kernel[(t, triton.cdiv(nh, heads))](
        qkv, cos, sin, q, k_cache, v_cache, slot_mapping,
        qkv.stride(0), qkv.stride(1), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        N_Q=n_q, N_KV=n_kv, HALF=half, HALF_PAD=half_pad, HEADS=heads, FP8_CACHE=k_cache.dtype == FP8_KV,
        FP8_MAX=FP8_KV_MAX, num_warps=4, enable_fp_fusion=False,
    )
    return q


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_and_cache_torch(qkv, cos, sin, n_q, n_kv, k_cache, v_cache, slot_mapping):
    """Reference: rotate_half rotary of q and k (transformers' apply_rotary_pos_emb), then index_copy_ of k, v."""
    qk = qkv[:, : n_q + n_kv]
    qk = qk * cos[:, None, :] + _rotate_half(qk) * sin[:, None, :]
    q, k, v = qk[:, :n_q], qk[:, n_q:], qkv[:, n_q + n_kv:]
    write_slots(k_cache, slot_mapping, k)
    write_slots(v_cache, slot_mapping, v)
    return q.contiguous()


# ----------------------------------------------------------------------------- split combine

def combine_splits(part: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype,
                   use_triton: bool | None = None) -> torch.Tensor:
    """part: [B, Hq, S, D] fp32; lse: [B, Hq, S] fp32 (-inf: empty split) -> [B, Hq, D] dtype.

    out = sum_s softmax(lse)[s] * part[:, :, s]. A row whose splits are all empty is NaN (as the
    torch code); paged decode never produces one (context length >= 1).
    """
    if not _pick(use_triton, part):
        return combine_splits_torch(part, lse, dtype)
    b, hq, s, d = part.shape
    out = torch.empty(b, hq, d, dtype=dtype, device=part.device)
    if b * hq == 0:
        return out
    part, lse = _rows(part), _rows(lse)
    _combine_kernel[(b * hq,)](
        part, lse, out, hq,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        S=s, S_PAD=triton.next_power_of_2(s), D=d, D_PAD=triton.next_power_of_2(d),
        num_warps=4 if s * d > 1024 else 2, enable_fp_fusion=False,
    )
    return out


def combine_splits_torch(part, lse, dtype):
    """Reference: paged_decode.py `_paged_decode_triton`, num_splits > 1."""
    w = torch.softmax(lse, dim=-1)  # [B, Hq, S]; empty splits have lse -inf -> weight 0
    return (part * w.unsqueeze(-1)).sum(2).to(dtype)


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    from stage_worker.kernels.fp8_act import quant_scale, quant_values

    @triton.jit
    def _store_quant(y, cols, N, row, Q, S, s_q, s_sm, s_sg, eps, fp8_max,
                     QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
        """y [BLOCK] fp32: an op's output at columns `cols` (< N are real) of row `row`, already
        rounded to the op's dtype, stored quantized as kernels/fp8_act.py's activation quants do it.
        QUANT 1: 1x128 groups (cols starts on a group; scale = max(amax, eps) / 448 each);
        QUANT 2: one scale for the row (this program holds all of it)."""
        mask = cols < N
        if QUANT == 1:
            yg = tl.reshape(y, (BLOCK // GROUP, GROUP))
            s = quant_scale(tl.max(tl.abs(yg), axis=1), eps, fp8_max)  # [BLOCK // GROUP]
            q = tl.reshape(quant_values(yg, s[:, None], fp8_max), (BLOCK,))
            g = tl.min(cols, axis=0) // GROUP + tl.arange(0, BLOCK // GROUP)
            tl.store(S + row * s_sm + g * s_sg, s, mask=g * GROUP < N)
        else:
            s = quant_scale(tl.max(tl.abs(y), axis=0), eps, fp8_max)
            q = quant_values(y, s, fp8_max)
            tl.store(S + row * s_sm, s)
        tl.store(Q + row * s_q + cols, q.to(Q.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_kernel(X, R, W, OUT, RES_OUT, Q, S, T, s_x, s_r, s_o, s_ro, s_q, s_sm, s_sg, H, H_f, eps,
                         q_eps, fp8_max, HAS_RES: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK: tl.constexpr):
        """One row per program. QUANT 0: the normalised row to OUT; 1 / 2: to Q and S instead
        (_store_quant), over T rows padded to the program count (padding rows quantize zeros)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        real = mask & (row < T)
        x = tl.load(X + row * s_x + cols, mask=real, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * s_r + cols, mask=real, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # torch's x + r
            tl.store(RES_OUT + row * s_ro + cols, x, mask=real)
        xf = x.to(tl.float32)
        ms = tl.math.div_rn(tl.sum(xf * xf, axis=0), H_f)
        inv = tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))
        y = (xf * inv).to(X.dtype.element_ty).to(tl.float32)  # .to(dtype) before the weight
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        out = (w * y).to(OUT.dtype.element_ty)
        if QUANT == 0:
            tl.store(OUT + row * s_o + cols, out, mask=mask)
        else:
            _store_quant(out.to(tl.float32), cols, H, row, Q, S, s_q, s_sm, s_sg, q_eps, fp8_max, QUANT, GROUP, BLOCK)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, Q, S, T, s_gu, s_o, s_q, s_sm, s_sg, I, q_eps, fp8_max, BLOCK: tl.constexpr,
                         ACT: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr):
        """Columns [pid1 * BLOCK, +BLOCK) of one row; QUANT as _rms_norm_kernel's (2: BLOCK >= I)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        real = mask & (row < T)
        g = tl.load(GU + row * s_gu + cols, mask=real, other=0.0).to(tl.float32)
        u = tl.load(GU + row * s_gu + I + cols, mask=real, other=0.0).to(tl.float32)
        dt = OUT.dtype.element_ty
        if ACT == 0:
            act = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(dt).to(tl.float32)  # F.silu in dtype
        else:  # gelu tanh: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh(z) = 1 - 2 / (e^2z + 1)
            z2 = tl.minimum(tl.maximum(1.5957691216057308 * (g + 0.044715 * g * g * g), -40.0), 40.0)  # 2z
            act = (0.5 * g * (2.0 - 2.0 / (tl.exp(z2) + 1.0))).to(dt).to(tl.float32)
        out = (act * u).to(dt)
        if QUANT == 0:
            tl.store(OUT + row * s_o + cols, out, mask=mask)
        else:
            _store_quant(out.to(tl.float32), cols, I, row, Q, S, s_q, s_sm, s_sg, q_eps, fp8_max, QUANT, GROUP, BLOCK)

    @triton.jit
    def _to_cache(x, ptr, FP8: tl.constexpr, FP8_MAX: tl.constexpr):
        """x in the pool's element type; FP8 pools saturate at +-FP8_MAX (kv_cache.write_slots)."""
        if FP8:
            x = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _rotary_cache_kernel(QKV, COS, SIN, Q, KC, VC, SLOT,
                             s_t, s_h, s_c, s_s, s_qt, s_qh, s_kn, s_kh, s_vn, s_vh,
                             N_Q: tl.constexpr, N_KV: tl.constexpr, HALF: tl.constexpr,
                             HALF_PAD: tl.constexpr, HEADS: tl.constexpr, FP8_CACHE: tl.constexpr,
                             FP8_MAX: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # [HEADS] heads of q | k | v
        j = tl.arange(0, HALF_PAD)  # [HALF_PAD] columns of one half
        jm = j < HALF
        m = (h < N_Q + 2 * N_KV)[:, None] & jm[None, :]
        base = QKV + t * s_t + h[:, None] * s_h + j[None, :]
        x1 = tl.load(base, mask=m, other=0.0)
        x2 = tl.load(base + HALF, mask=m, other=0.0)
        c1 = tl.load(COS + t * s_c + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + t * s_c + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + t * s_s + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + t * s_s + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        dt = QKV.dtype.element_ty
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # torch in dtype: (x * cos) rounded, (rotate_half(x) * sin) rounded, their sum rounded.
        o1 = ((f1 * c1).to(dt).to(tl.float32) - (f2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
        is_q = (h < N_Q)[:, None] & m
        q_ptr = Q + t * s_qt + h[:, None] * s_qh + j[None, :]
        tl.store(q_ptr, o1, mask=is_q)
        tl.store(q_ptr + HALF, o2, mask=is_q)
        slot = tl.load(SLOT + t).to(tl.int64)
        is_k = (h >= N_Q)[:, None] & (h < N_Q + N_KV)[:, None] & m
        k_ptr = KC + slot * s_kn + (h - N_Q)[:, None] * s_kh + j[None, :]
        tl.store(k_ptr, _to_cache(o1, KC, FP8_CACHE, FP8_MAX), mask=is_k)
        tl.store(k_ptr + HALF, _to_cache(o2, KC, FP8_CACHE, FP8_MAX), mask=is_k)
        is_v = (h >= N_Q + N_KV)[:, None] & m
        v_ptr = VC + slot * s_vn + (h - N_Q - N_KV)[:, None] * s_vh + j[None, :]
        tl.store(v_ptr, _to_cache(x1, VC, FP8_CACHE, FP8_MAX), mask=is_v)
        tl.store(v_ptr + HALF, _to_cache(x2, VC, FP8_CACHE, FP8_MAX), mask=is_v)

    @triton.jit
    def _combine_kernel(P, L, OUT, HQ, s_pb, s_ph, s_ps, s_lb, s_lh, s_ob, s_oh,
                        S: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr,
                        D_PAD: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // HQ).to(tl.int64)
        h = (pid % HQ).to(tl.int64)
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        sm = s < S
        lse = tl.load(L + b * s_lb + h * s_lh + s, mask=sm, other=float("-inf"))
        e = tl.exp(lse - tl.max(lse, axis=0))  # padding and empty splits -> 0
        w = tl.math.div_rn(e, tl.sum(e, axis=0))
        pm = sm[:, None] & (d < D)[None, :]
        p = tl.load(P + b * s_pb + h * s_ph + s[:, None] * s_ps + d[None, :], mask=pm, other=0.0)
        acc = tl.sum(p * w[:, None], axis=0)  # [D_PAD]
        tl.store(OUT + b * s_ob + h * s_oh + d, acc.to(OUT.dtype.element_ty), mask=d < D)
