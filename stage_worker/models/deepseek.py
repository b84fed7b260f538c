"""DeepSeek V2 / V2-Lite / V3 / R1 decoders as plain modules, built for a layer range.

Same stage contract as models/llama.py (first stage embeds, last owns the final norm and head,
checkpoint names are the Hugging Face names minus `model.` with *global* layer indices, so a
stage reads only its layers' tensors, experts included; gate/up are merged and the routed experts
stacked, filled in place by the loader, models/layers.py).

Per layer: RMSNorm -> Multi-head Latent Attention -> residual -> RMSNorm -> dense SwiGLU MLP
(the first `first_k_dense_replace` layers) or a mixture of experts (shared experts + routed
top-k) -> residual. As in models/llama.py the residual stream is carried beside the hidden
state, so each residual add runs inside the next RMSNorm, and the norms and SiLU * up go
through kernels/fused_ops (Triton on CUDA, the same torch formulas elsewhere).

MLA data flow for T new tokens (H heads, R = kv_lora_rank, Dn/Dr = qk nope/rope dims, Dv):
  q  = q_proj(x) | q_b_proj(norm(q_a_proj(x)))              [T, H, Dn + Dr]
  latent = kv_a_layernorm(c_kv) | rope(k_pe)                   [T, R + Dr] -> written to the pool
  q_cat  = q_nope @ W_UK | rope(q_pe)                          [T, H, R + Dr], the latent query
           (both in kernels/mla_rope: one bmm and one Triton kernel on GPU)
  attention, absorbed weights, in the latent space (the context is never expanded per head):
           q_lat = q_nope @ W_UK [H, R]; score = q_lat . c_kv + q_pe . k_pe; o = (p @ c_kv) @ W_UV
           for every row of the micro-batch at once: prefill chunks and decode rows in one
           kernels/mla_prefill launch, decode-only steps in kernels/mla_decode (GPU); one
           padded SDPA call over all sequences (CPU). Equal to transformers (float32).
           On a GPU at >= 64 heads, the long prefill chunks of an eager step take the expanded
           (MHA) form instead (kernels/mla_expand: kv_b_proj up-projects their context to
           per-head K/V, then flash attention): 3.4x fewer attention FLOPs per (query, key).

Routing follows DeepSeek's reference code: V2 softmax scores with greedy or group-limited greedy
top-k; V3 sigmoid scores, expert choice biased by `e_score_correction_bias` (weights are not),
group-limited by the sum of each group's top-2. The MoE layer is models/moe.py's SparseMoE (fused
Triton kernels on CUDA, grouped GEMMs elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stage_worker.attention import AttnMetadata, num_sms
from stage_worker.kernels import mla_decode, mla_expand, mla_prefill, mla_rope, tuning
from stage_worker.mla_cache import MLAKVCache
from stage_worker.models.base import PipelineStage
from stage_worker.models import quant
from stage_worker.models.layers import GatedMLP, RMSNorm, make_linear
from stage_worker.models.moe import MoESpec, Router, RouterSpec, SparseMoE
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig


@dataclass(frozen=True)
class DeepseekDims:
    """DeepSeek-specific fields of config.json (read from `ModelConfig.raw`)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    scoring_func: str  # "softmax" (V2) | "sigmoid" (V3)
    topk_method: str  # "greedy" | "group_limited_greedy" (V2) | "noaux_tc" (V3)
    norm_topk_prob: bool
    routed_scaling_factor: float
    rope_interleave: bool

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "DeepseekDims":
        raw, v3 = cfg.raw, cfg.architecture == "DeepseekV3ForCausalLM"
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (silu)")
        try:
            dims = cls(
                q_lora_rank=int(raw["q_lora_rank"]) if raw.get("q_lora_rank") else None,
                kv_lora_rank=int(raw["kv_lora_rank"]),
                qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
                qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
                v_head_dim=int(raw["v_head_dim"]),
                n_routed_experts=int(raw.get("n_routed_experts") or 0),
                n_shared_experts=int(raw.get("n_shared_experts") or 0),
                num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
                moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
                first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
                moe_layer_freq=int(raw.get("moe_layer_freq") or 1),
                n_group=int(raw.get("n_group") or 1),
                topk_group=int(raw.get("topk_group") or 1),
                scoring_func=raw.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
                topk_method=raw.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
                norm_topk_prob=bool(raw.get("norm_topk_prob", v3)),
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 2.5 if v3 else 1.0)),
                # Released V2/V3 weights rotate interleaved pairs (x0, x1), (x2, x3), ...
                rope_interleave=bool(raw.get("rope_interleave", True)),
            )
        except KeyError as exc:
            raise CheckpointError(f"config.json: missing required key {exc.args[0]!r}") from exc
        if dims.scoring_func not in ("softmax", "sigmoid"):
            raise CheckpointError(f"config.json: scoring_func {dims.scoring_func!r} is not supported")
        if dims.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise CheckpointError(f"config.json: topk_method {dims.topk_method!r} is not supported")
        if dims.n_routed_experts and dims.n_routed_experts % dims.n_group:
            raise CheckpointError(f"config.json: n_routed_experts={dims.n_routed_experts} is not a "
                                  f"multiple of n_group={dims.n_group}")
        return dims

    def is_moe(self, layer_idx: int) -> bool:
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)


# -- rotary (YaRN as DeepSeek configures it) ----------------------------------------------------
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def deepseek_rope(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float, float]:
    """(inv_freq [dim/2] float32, cos/sin scaling, softmax-scale multiplier).

    YaRN as transformers' `_compute_yarn_parameters` and DeepSeek's reference code: frequencies
    blended between interpolation and extrapolation over a linear ramp, cos/sin scaled by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim), and the softmax scale by
    mscale(factor, mscale_all_dim)^2.
    """
    rope = cfg.rope
    kind, base = rope.get("rope_type", "default"), float(rope["rope_theta"])
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim/2]
    if kind == "default":
        return 1.0 / pos_freqs, 1.0, 1.0
    if kind != "yarn":
        raise CheckpointError(f"config.json: rope_type {kind!r} is not supported for DeepSeek "
                              f"(supported: default, yarn)")
    try:
        old_ctx = rope["original_max_position_embeddings"]
    except KeyError as exc:
        raise CheckpointError("config.json: yarn rope scaling lacks 'original_max_position_embeddings'") from exc
    factor = rope.get("factor") or cfg.max_position_embeddings / old_ctx
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    attn_factor = rope.get("attention_factor")
    if attn_factor is None:
        attn_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
                       if mscale and mscale_all else _yarn_mscale(factor))
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # [dim/2]: 1 = keep the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    softmax_mult = _yarn_mscale(factor, mscale_all) ** 2 if mscale_all else 1.0
    return inv_freq, float(attn_factor), softmax_mult


# -- attention ----------------------------------------------------------------------------------
class MLAttention(nn.Module):
    """Multi-head Latent Attention over the latent pool (stage_worker/mla_cache.py).

    `_expanded` (per-head K/V, the MHA form) and `_absorbed` (latent, one gathered context) are
    the two textbook forms over a gathered context, kept as references: the tests check that
    they agree, and the GPU benchmark times them as the old per-sequence path.
    """

    def __init__(self, cfg: ModelConfig, d: DeepseekDims, softmax_mult: float):
        super().__init__()
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.n_heads, self.d = cfg.num_attention_heads, d
        self.qk_head_dim = d.qk_nope_head_dim + d.qk_rope_head_dim
        fp8 = quant.is_fp8(cfg)  # FP8 block-scaled GEMMs (kv_b_proj stays dense: absorbed into attention)
        if d.q_lora_rank is None:
            self.q_proj = make_linear(h, self.n_heads * self.qk_head_dim, False, fp8)
        else:
            self.q_a_proj = make_linear(h, d.q_lora_rank, bias, fp8)
            self.q_a_layernorm = RMSNorm(d.q_lora_rank, 1e-6)
            self.q_b_proj = make_linear(d.q_lora_rank, self.n_heads * self.qk_head_dim, False, fp8)
        self.kv_a_proj_with_mqa = make_linear(h, d.kv_lora_rank + d.qk_rope_head_dim, bias, fp8)
        self.kv_a_layernorm = RMSNorm(d.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(d.kv_lora_rank, self.n_heads * (d.qk_nope_head_dim + d.v_head_dim),
                                   bias=False)
        self.o_proj = make_linear(self.n_heads * d.v_head_dim, h, bias, fp8)
        self.scale = self.qk_head_dim ** -0.5 * softmax_mult
        self.tile_q = mla_prefill.tile_q(self.n_heads)  # query tokens per tile of the mixed kernel

    def input_quant(self, m: int) -> str | None:
        """The quantized form both projections of x take (one written for the two), or None."""
        first = self.q_proj if self.d.q_lora_rank is None else self.q_a_proj
        kind = quant.input_quant(first, m)
        return kind if kind == quant.input_quant(self.kv_a_proj_with_mqa, m) else None

    def forward(self, x, cos, sin, meta: AttnMetadata, pool: torch.Tensor) -> torch.Tensor:
        d, t, nh = self.d, cos.shape[0], self.n_heads  # x: [T, H], or quantized (input_quant)
        if d.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x), quant.input_quant(self.q_b_proj, t)))
        q = q.view(t, nh, self.qk_head_dim)  # [T, Hq, Dn + Dr]
        kv = self.kv_a_proj_with_mqa(x)  # [T, R + Dr]: c_kv | k_pe
        w_uk, w_uv = self._w_uk_uv()
        ln = self.kv_a_layernorm
        e = meta.expand  # long prefill chunks in the expanded form (every row, some or none)
        q_cat = mla_rope.latent_query_and_cache(q, kv, w_uk, cos, sin, ln.weight, ln.eps, pool, meta.slot_mapping,
                                                d.rope_interleave, absorb=e is None or not e.all_rows)
        if e is not None and e.all_rows:
            out = self._expanded_chunks(q, q_cat, pool, e)  # [T, Hq, Dv]
        else:
            o_lat = latent_attention(q_cat, pool, meta, self.scale, d.kv_lora_rank, self.tile_q)  # [T, Hq, R]
            out = torch.einsum("thr,hvr->thv", o_lat.to(q.dtype), w_uv)  # [T, Hq, Dv]
            if e is not None:
                out[e.rows] = self._expanded_chunks(q, q_cat, pool, e)
        return self.o_proj(out.reshape(t, nh * d.v_head_dim))  # [T, H]

    def _expanded_chunks(self, q, q_cat, pool, e: mla_expand.ExpandPlan) -> torch.Tensor:
        """The plan's chunks in the MHA form, their rows e.rows of q [T, Hq, Dn + Dr] (q_nope
        unrotated) and q_cat [T, Hq, R + Dr] (its rope part rotated), over their up-projected
        contexts -> [Tp, Hq, Dv]."""
        d = self.d
        q_nope, q_pe = q[..., : d.qk_nope_head_dim], q_cat[..., d.kv_lora_rank:]
        if not e.all_rows:
            q_nope, q_pe = q_nope[e.rows], q_pe[e.rows]
        k_nope, k_pe, v = mla_expand.expand_context(pool, e.ctx_slots, self.kv_b_proj.weight, self.n_heads,
                                                    d.kv_lora_rank, d.qk_nope_head_dim)
        return mla_expand.attention(q_nope, q_pe, k_nope, k_pe, v, e.cu_q, e.cu_k, e.tile_seq, e.tile_row,
                                    self.scale)

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [Hq, Dn, R] and W_UV [Hq, Dv, R]: views of kv_b_proj's weight, per head."""
        d = self.d
        w = self.kv_b_proj.weight.view(self.n_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        return w[:, : d.qk_nope_head_dim], w[:, d.qk_nope_head_dim:]

    def _expanded(self, q_nope, q_pe, ctx, mask) -> torch.Tensor:
        """Reference (MHA form): expand the context latents to per-head K/V. -> [n, Hq, Dv]."""
        d, nh = self.d, self.n_heads
        c_kv, k_pe = ctx.split([d.kv_lora_rank, d.qk_rope_head_dim], dim=-1)  # [L, R], [L, Dr]
        kv = self.kv_b_proj(c_kv).view(-1, nh, d.qk_nope_head_dim + d.v_head_dim)  # [L, Hq, Dn + Dv]
        k_nope, v = kv.split([d.qk_nope_head_dim, d.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, nh, -1)], dim=-1)  # [L, Hq, Dn + Dr]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [n, Hq, Dn + Dr]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask,
                                           is_causal=mask is None, scale=self.scale)  # [1, Hq, n, Dv]
        return o[0].transpose(0, 1)

    def _absorbed(self, q_nope, q_pe, ctx, mask) -> torch.Tensor:
        """Reference (absorbed form, gathered context): W_UK / W_UV absorbed. -> [B, Hq, Dv].

        q_nope: [B, Hq, Dn]; q_pe: [B, Hq, Dr]; ctx: [B, L, R + Dr]; mask: [B, 1, 1, L] bool.
        One shared latent "head" (MQA) keyed by c_kv | k_pe, valued by c_kv.
        """
        d = self.d
        w_uk, w_uv = self._w_uk_uv()  # [Hq, Dn, R], [Hq, Dv, R]
        q_lat = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)  # [B, Hq, R]
        q_full = torch.cat([q_lat, q_pe], dim=-1)[:, :, None, :]  # [B, Hq, 1, R + Dr]
        keys = ctx[:, None]  # [B, 1, L, R + Dr]
        values = ctx[:, None, :, : d.kv_lora_rank]  # [B, 1, L, R]
        o_lat = F.scaled_dot_product_attention(q_full, keys, values, attn_mask=mask, scale=self.scale,
                                               enable_gqa=True)  # [B, Hq, 1, R]
        return torch.einsum("bhr,hvr->bhv", o_lat[:, :, 0], w_uv)  # [B, Hq, Dv]


def latent_attention(q: torch.Tensor, pool: torch.Tensor, meta: AttnMetadata, scale: float, kv_rank: int,
                     tile_q: int) -> torch.Tensor:
    """q: [T, Hq, R + Dr] latent queries over each sequence's latent context -> [T, Hq, R].

    GPU layouts (no host sync, graph-capturable): a mixed micro-batch is one mla_prefill launch
    (the unified tile plan, built with `tile_q` tokens per tile); a decode-only one is
    mla_decode (split context, LSE merge). The CPU reference layout runs the same latent math
    in torch, every sequence in one padded SDPA call; the paged layout without a tile plan
    (a layer profiled at registration) takes the torch path for its prefill chunks.
    """
    if meta.unified:
        return mla_prefill.mla_attention(q, pool, meta.seq_tables, meta.seq_lens, meta.qsl, meta.tile_seq,
                                         meta.tile_row, scale, meta.block_size, kv_rank, tile_q)
    if meta.paged and meta.decode_all:
        return _decode(q, pool, meta, scale, kv_rank)
    ids = meta.prefill_ids if meta.paged else range(len(meta.context_lens))
    out = _padded_attention(q, pool, meta, list(ids), scale, kv_rank)
    if meta.paged and meta.decode_ids:
        out[meta.decode_rows] = _decode(q[meta.decode_rows], pool, meta, scale, kv_rank)
    return out


def _decode(q, pool, meta: AttnMetadata, scale: float, kv_rank: int) -> torch.Tensor:
    """Decode rows q [B, Hq, R + Dr] through the block tables -> [B, Hq, R].

    The split count depends on the shapes only, never on the contexts, so a decode row gives the
    same bits on the eager route and replayed from a CUDA graph (where the contexts are unknown).
    """
    splits = mla_decode.num_splits(q.shape[0], q.shape[1], num_sms(q.device))
    return mla_decode.mla_decode(q, pool, meta.block_tables, meta.decode_ctx, scale, meta.block_size, kv_rank,
                                 splits, max_ctx=meta.decode_max_ctx)


def _padded_attention(q, pool, meta: AttnMetadata, ids: list[int], scale: float, kv_rank: int) -> torch.Tensor:
    """Sequences `ids` (their context_slots in meta) in one padded torch call -> [T, Hq, R]
    (rows of other sequences zero)."""
    if not ids:
        return q.new_zeros(q.shape[0], q.shape[1], kv_rank)
    slots = nn.utils.rnn.pad_sequence([meta.context_slots[i] for i in ids], batch_first=True)  # [S, L]
    qsl = meta.query_start_loc
    dev = q.device
    start = torch.tensor([qsl[i] for i in ids], device=dev)
    count = torch.tensor([qsl[i + 1] - qsl[i] for i in ids], device=dev)
    lens = torch.tensor([meta.context_lens[i] for i in ids], device=dev)
    return mla_prefill.mla_attention_torch(q, pool, slots, lens, start, count, scale, kv_rank)


# -- feed-forward -------------------------------------------------------------------------------
def router_spec(d: DeepseekDims) -> RouterSpec:
    """DeepSeek's routing (models/moe.py `route`) from its config fields."""
    try:
        return RouterSpec(n_experts=d.n_routed_experts, top_k=d.num_experts_per_tok, scoring=d.scoring_func,
                          topk_method=d.topk_method, n_group=d.n_group, topk_group=d.topk_group,
                          norm_topk_prob=d.norm_topk_prob, scaling=d.routed_scaling_factor)
    except ValueError as exc:  # e.g. num_experts_per_tok missing or above n_routed_experts
        raise CheckpointError(f"config.json: {exc}") from exc


class MoEGate(Router):
    """Router: per token, the top-k routed experts and their weights (float32)."""

    def __init__(self, hidden: int, d: DeepseekDims):
        super().__init__(hidden, router_spec(d))


class DeepseekMoE(SparseMoE):
    """Shared experts (every token) + routed top-k experts: models/moe.py's SparseMoE with
    DeepSeek's routing, the stacked experts in the stage's layout (FP8 when the stage is), and
    the shared experts as one dense MLP of width n_shared * moe_intermediate_size."""

    def __init__(self, cfg: ModelConfig, d: DeepseekDims):
        h, i, fp8 = cfg.hidden_size, d.moe_intermediate_size, quant.is_fp8(cfg)
        shared = GatedMLP(h, i * d.n_shared_experts, cfg.mlp_bias, fp8) if d.n_shared_experts else None
        super().__init__(MoESpec(h, i, router_spec(d), bias=cfg.mlp_bias), shared, fp8)


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, d: DeepseekDims, layer_idx: int, softmax_mult: float):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, d, softmax_mult)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (DeepseekMoE(cfg, d) if d.is_moe(layer_idx)
                    else GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, quant.is_fp8(cfg)))

    def forward(self, x, residual, cos, sin, meta, pool):
        """One layer with the residual stream carried separately, as LlamaDecoderLayer: each
        residual add runs inside the next RMSNorm's kernel (transformers adds residual + output;
        float addition commutes, so the bits are the same).

        x: [T, H], the previous layer's MLP output, or the stage input when residual is None.
        Returns (this layer's MLP output, residual); their sum is the layer's output.
        """
        ln1, ln2, t = self.input_layernorm, self.post_attention_layernorm, x.shape[0]
        h, residual = ln1.add_and_norm(x, residual, quant.input_quant(self.self_attn, t))
        h = self.self_attn(h, cos, sin, meta, pool)
        h, residual = ln2.add_and_norm(h, residual, quant.input_quant(self.mlp, t))
        return self.mlp(h), residual


# -- stage --------------------------------------------------------------------------------------
class DeepseekStage(PipelineStage):
    """Layers [layer_start, layer_end) of a DeepSeek V2/V3 model; one per stage worker.

    Stateless between calls except through the MLAKVCache it is handed (forward writes the new
    tokens' latents there). Not thread-safe: run one micro-batch at a time.
    """

    kv_cache_cls = MLAKVCache  # a scratch block on CUDA: decode and mixed CUDA graphs (cuda_graphs.py)
    rotary_duplicate = False  # cos, sin: [T, Dr/2] (mla_rope pairs the halves itself)

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self.dims = d = DeepseekDims.from_config(cfg)
        inv_freq, self.attention_scaling, softmax_mult = deepseek_rope(cfg, d.qk_rope_head_dim)
        self._build_range(cfg, layer_start, layer_end,
                          lambda i: DeepseekDecoderLayer(cfg, d, i, softmax_mult), dtype, device)
        for m in self.modules():  # the router's weight and bias stay float32 whatever the stage dtype
            if isinstance(m, Router):
                m.fix_dtypes(dtype)
        self.inv_freq = inv_freq.to(device)  # [Dr/2] float32, not a parameter
        # Mixed micro-batches on a GPU: one mla_prefill launch over tiles of this many tokens.
        self.attention_tile_q = mla_prefill.tile_q(cfg.num_attention_heads)
        if cfg.num_attention_heads >= mla_expand.MIN_HEADS:
            self.attention_expand_min_tokens = tuning.active().mla_expand_min_tokens
            self.attention_expand_graph_min_tokens = mla_expand.GRAPH_MIN_TOKENS

    def kv_dims(self) -> tuple[int, int]:
        return self.dims.kv_lora_rank, self.dims.qk_rope_head_dim


def layer_profile(cfg: ModelConfig, layer_idx: int, dtype_bytes: int = 2) -> dict[str, float]:
    """Static cost of one layer for the planner: weight bytes, FLOPs per token, KV bytes per token.

    A MoE layer holds all its experts (memory) but each token runs only the top-k routed plus the
    shared experts (compute): so MoE layers are heavy in memory and light in FLOPs relative to a
    dense layer of the same size, and a memory-balanced partition is not a time-balanced one.
    """
    d, h = DeepseekDims.from_config(cfg), cfg.hidden_size
    nh, qk = cfg.num_attention_heads, d.qk_nope_head_dim + d.qk_rope_head_dim
    q = h * nh * qk if d.q_lora_rank is None else h * d.q_lora_rank + d.q_lora_rank * nh * qk
    attn = (q + h * (d.kv_lora_rank + d.qk_rope_head_dim)
            + d.kv_lora_rank * nh * (d.qk_nope_head_dim + d.v_head_dim) + nh * d.v_head_dim * h)
    if d.is_moe(layer_idx):
        expert = 3 * h * d.moe_intermediate_size
        held = d.n_routed_experts * expert + d.n_shared_experts * expert + h * d.n_routed_experts
        active = (d.num_experts_per_tok + d.n_shared_experts) * expert + h * d.n_routed_experts
    else:
        held = active = 3 * h * cfg.intermediate_size
    return {"weight_bytes": (attn + held) * dtype_bytes, "flops_per_token": 2.0 * (attn + active),
            "kv_bytes_per_token": (d.kv_lora_rank + d.qk_rope_head_dim) * dtype_bytes,
            "moe": d.is_moe(layer_idx)}
