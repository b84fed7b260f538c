"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) as plain modules, built for a layer range.

A stage is the same model code restricted to layers [layer_start, layer_end): the first stage
also owns the token embedding, the last owns the final norm and LM head. Parameter names match
the Hugging Face checkpoint minus its `model.` prefix, with *global* layer indices
(`layers.7.mlp.up_proj.weight`), so the loader maps names 1:1 and a stage's state dict shows
exactly which tensors it holds.

Data flow of one micro-batch: tokens or hidden [T, H] -> each layer (RMSNorm, rotary attention
over the paged KV pool, RMSNorm, SwiGLU MLP, residuals) -> hidden [T, H] (before the final norm).
`compute_logits` applies the final norm and head only to the rows that will be sampled.
Numerics follow transformers (float32 rotary tables and RMSNorm statistics).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stage_worker.kernels import fused_ops
from stage_worker.attention import AttnMetadata, attend, paged_attention
from stage_worker.kv_cache import PagedKVCache
from stage_worker.models.base import PipelineStage
from stage_worker.kernels.unified_attention import block_q
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H]
        dtype = x.dtype
        if x.is_cuda:  # one fused kernel for the float32 statistics, same formula
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2] float32, attention_scaling), as transformers' ROPE_INIT_FUNCTIONS."""
    rope = cfg.rope
    kind = rope.get("rope_type", "default")
    dim = cfg.head_dim
    base = float(rope["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, rope), 1.0
    raise CheckpointError(f"config.json: rope_type {kind!r} is not supported "
                          f"(supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling (transformers `_compute_llama3_parameters`)."""
    try:
        factor = rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old_ctx = rope["original_max_position_embeddings"]
    except KeyError as exc:
        raise CheckpointError(f"config.json: llama3 rope scaling lacks {exc.args[0]!r}") from exc
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, Hx, D]; cos, sin: [T, D]."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        qkv_bias = cfg.attention_bias
        # Qwen2 has q/k/v biases but none on o_proj; Llama's attention_bias covers all four.
        o_bias = cfg.attention_bias and cfg.architecture != "Qwen2ForCausalLM"
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=o_bias)
        self.scale = d ** -0.5
        self.qkv_proj: nn.Linear | None = None  # set by fuse(): q, k, v in one matmul

    def fuse(self) -> None:
        """Replace q/k/v_proj by one [Hq+2Hkv)*D, H] projection (fewer launches, one weight read)."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        w = torch.cat([p.weight.data for p in parts])
        b = torch.cat([p.bias.data for p in parts]) if self.q_proj.bias is not None else None
        fused = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            fused.bias = nn.Parameter(b, requires_grad=False)
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, meta: AttnMetadata, layer_kv) -> torch.Tensor:
        t = x.shape[0]  # x: [T, H]
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(t, self.n_heads + 2 * self.n_kv, self.head_dim)
            qk = apply_rotary(qkv[:, : self.n_heads + self.n_kv], cos, sin)  # q and k in one pass
            q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv:]
        else:
            q = self.q_proj(x).view(t, self.n_heads, self.head_dim)  # [T, Hq, D]
            k = self.k_proj(x).view(t, self.n_kv, self.head_dim)  # [T, Hkv, D]
            v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = paged_attention(q, k, v, layer_kv, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))  # [T, H]

    def forward_fused(self, x, cos, sin, meta: AttnMetadata, layer_kv) -> torch.Tensor:
        """Fused layout: rotary of q and k plus the K/V write in one kernel, then attention."""
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.n_heads + 2 * self.n_kv, self.head_dim)
        q = fused_ops.rotary_and_cache(qkv, cos, sin, self.n_heads, self.n_kv, *layer_kv, meta.slot_mapping)
        o = attend(q, layer_kv, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        """Replace gate/up_proj by one [2I, H] projection."""
        w = torch.cat([self.gate_proj.weight.data, self.up_proj.weight.data])
        b = (torch.cat([self.gate_proj.bias.data, self.up_proj.bias.data])
             if self.gate_proj.bias is not None else None)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            fused.bias = nn.Parameter(b, requires_grad=False)
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H]
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused_ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, meta, layer_kv) -> torch.Tensor:  # x: [T, H]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, layer_kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x, residual, cos, sin, meta, layer_kv):
        """The same layer with the residual stream carried separately (vLLM's layout), so that
        each residual add runs inside the next RMSNorm's kernel.

        x: the previous layer's MLP output, or the stage input when residual is None.
        Returns (this layer's MLP output, residual); their sum is forward()'s result.
        """
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            h, residual = fused_ops.rms_norm(x, ln1.weight, ln1.eps), x
        else:
            h, residual = fused_ops.fused_add_rms_norm(x, residual, ln1.weight, ln1.eps)
        h = self.self_attn.forward_fused(h, cos, sin, meta, layer_kv)
        h, residual = fused_ops.fused_add_rms_norm(h, residual, ln2.weight, ln2.eps)
        return self.mlp.forward_fused(h), residual


class LlamaStage(PipelineStage):
    """Layers [layer_start, layer_end) of a Llama-family model; one per stage worker.

    Stateless between calls except through the PagedKVCache it is handed (forward writes the new
    tokens' K/V there). Not thread-safe: run one micro-batch at a time.
    """

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if not 0 <= layer_start < layer_end <= cfg.num_hidden_layers:
            raise ValueError(f"bad layer range [{layer_start}, {layer_end}) for "
                             f"{cfg.num_hidden_layers} layers")
        self.cfg, self.layer_start, self.layer_end = cfg, layer_start, layer_end
        self.is_first, self.is_last = layer_start == 0, layer_end == cfg.num_hidden_layers
        # Built on the meta device and materialised empty: weights come from the checkpoint,
        # so random init of a multi-GB range would be wasted time.
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.is_first else None
            self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(cfg)
                                         for i in range(layer_start, layer_end)})
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.is_last else None
            self.lm_head = (nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                            if self.is_last else None)
        self.to_empty(device=device).to(dtype)
        self.fused = False  # fuse_projections(): fused matmuls and fused_ops kernels
        self.attention_tile_q = block_q(cfg.num_attention_heads, cfg.num_key_value_heads)
        inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self.inv_freq = inv_freq.to(device)  # float32 always, not a parameter or buffer
        if self.is_first and self.is_last and cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """GPU serving layout: q/k/v and gate/up as single matmuls (after the weights are loaded),
        and the layer walk through fused_ops (residual add inside RMSNorm, rotary + K/V write,
        SiLU * up: one kernel each on CUDA, their torch formulas elsewhere).

        Parameter names change (qkv_proj, gate_up_proj), so load first; the CPU reference path
        keeps the checkpoint's layout.
        """
        for layer in self.layers.values():
            if layer.self_attn.qkv_proj is None:
                layer.self_attn.fuse()
                layer.mlp.fuse()
        self.fused = True

    def run_layers(self, x, cos, sin, meta, kv) -> torch.Tensor:
        if not self.fused:
            return super().run_layers(x, cos, sin, meta, kv)
        residual = None
        for local, layer in enumerate(self.layers.values()):
            x, residual = layer.forward_fused(x, residual, cos, sin, meta, kv.layer(local))
        return x + residual

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin: [T, D] computed in float32 then cast, as transformers does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one KV block costs on this stage (sizes the pool without allocating one)."""
        return PagedKVCache.block_bytes(self.num_local_layers, block_size, self.cfg.num_key_value_heads,
                                        self.cfg.head_dim, self.dtype)

    def make_kv_cache(self, num_blocks: int, block_size: int, dtype=None, device=None,
                      scratch_blocks: int | None = None) -> PagedKVCache:
        """A KV pool shaped for this stage's layers (plus a scratch block on CUDA)."""
        p = next(self.parameters())
        return PagedKVCache(self.num_local_layers, num_blocks, block_size,
                            self.cfg.num_key_value_heads, self.cfg.head_dim,
                            dtype or p.dtype, device or p.device, scratch_blocks)
