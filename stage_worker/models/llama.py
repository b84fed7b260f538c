"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) as plain modules, built for a layer range.

A stage is the same model code restricted to layers [layer_start, layer_end): the first stage
also owns the token embedding, the last owns the final norm and LM head. Parameter names match
the Hugging Face checkpoint minus its `model.` prefix, with *global* layer indices
(`layers.7.mlp.up_proj.weight`, a row slice of `layers.7.mlp.gate_up_proj.weight`), so the
loader reads exactly the tensors a stage holds.

Data flow of one micro-batch: tokens or hidden [T, H] -> each layer (RMSNorm, rotary attention
over the paged KV pool, RMSNorm, SwiGLU MLP, residuals) -> hidden [T, H] (before the final norm).
One layout on every device: q/k/v and gate/up are merged matmuls (filled from the checkpoint's
separate tensors by the loader, models/layers.py), and the elementwise groups go through
kernels/fused_ops (Triton on CUDA, the same formulas in torch elsewhere), so the CPU tests run
the code the GPU runs.
`compute_logits` applies the final norm and head only to the rows that will be sampled.
Numerics follow transformers (float32 rotary tables and RMSNorm statistics).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stage_worker.attention import AttnMetadata, attend
from stage_worker.kernels import fused_ops
from stage_worker.kv_cache import PagedKVCache
from stage_worker.models.base import PipelineStage
from stage_worker.models.layers import MergedLinear, RMSNorm
from stage_worker.kernels.unified_attention import block_q
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig


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


class LlamaAttention(nn.Module):
    """q/k/v as one matmul (qkv_proj), rotary of q and k plus the K/V write in one op, then
    attention over the pool (fused_ops and attention.attend: Triton on CUDA, torch elsewhere)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        # Qwen2 has q/k/v biases but none on o_proj; Llama's attention_bias covers all four.
        o_bias = cfg.attention_bias and cfg.architecture != "Qwen2ForCausalLM"
        self.qkv_proj = MergedLinear(h, {"q_proj": self.n_heads * d, "k_proj": self.n_kv * d,
                                         "v_proj": self.n_kv * d}, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=o_bias)
        self.scale = d ** -0.5

    def forward(self, x, cos, sin, meta: AttnMetadata, layer_kv) -> torch.Tensor:
        t = x.shape[0]  # x: [T, H]
        qkv = self.qkv_proj(x).view(t, self.n_heads + 2 * self.n_kv, self.head_dim)
        q = fused_ops.rotary_and_cache(qkv, cos, sin, self.n_heads, self.n_kv, *layer_kv, meta.slot_mapping)
        o = attend(q, layer_kv, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))  # [T, H]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_up_proj = MergedLinear(h, {"gate_proj": i, "up_proj": i}, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H]
        return self.down_proj(fused_ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, residual, cos, sin, meta, layer_kv):
        """One layer with the residual stream carried separately (vLLM's layout), so that each
        residual add runs inside the next RMSNorm's kernel.

        x: the previous layer's MLP output, or the stage input when residual is None.
        Returns (this layer's MLP output, residual); their sum is the layer's output.
        """
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            h, residual = fused_ops.rms_norm(x, ln1.weight, ln1.eps), x
        else:
            h, residual = fused_ops.fused_add_rms_norm(x, residual, ln1.weight, ln1.eps)
        h = self.self_attn(h, cos, sin, meta, layer_kv)
        h, residual = fused_ops.fused_add_rms_norm(h, residual, ln2.weight, ln2.eps)
        return self.mlp(h), residual


class LlamaStage(PipelineStage):
    """Layers [layer_start, layer_end) of a Llama-family model; one per stage worker.

    Stateless between calls except through the PagedKVCache it is handed (forward writes the new
    tokens' K/V there). Not thread-safe: run one micro-batch at a time.
    """

    kv_cache_cls = PagedKVCache

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self._build_range(cfg, layer_start, layer_end, lambda i: LlamaDecoderLayer(cfg), dtype, device)
        self.attention_tile_q = block_q(cfg.num_attention_heads, cfg.num_key_value_heads)
        inv_freq, self.attention_scaling = rope_inv_freq(cfg)
        self.inv_freq = inv_freq.to(device)  # float32 always, not a parameter or buffer

    def run_layers(self, x, cos, sin, meta, kv) -> torch.Tensor:
        residual = None
        for local, layer in enumerate(self.layers.values()):
            x, residual = layer(x, residual, cos, sin, meta, kv.layer(local))
        return x + residual

    def kv_dims(self) -> tuple[int, int]:
        return self.cfg.num_key_value_heads, self.cfg.head_dim
