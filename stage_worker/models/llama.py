"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, and with small hooks Qwen3, Gemma 2, Phi-3,
Mixtral) as plain modules, built for a layer range.

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

One decoder layer serves every Llama-shaped family. Where a family departs from Llama it says so
in its `LayerTraits` (Qwen3's per-head q/k norms, Gemma 2's norms of the attention and MLP
outputs, Mixtral's MoE block), or config.json does, read here alike for all: the MLP activation,
a sliding window per layer (`sliding_window`), Gemma 2's attention scale (`query_pre_attn_scalar`)
and logit soft cap. Stage-level hooks (embedding scale, final soft cap, checkpoint names, rotary
scaling) live in each family's file (models/qwen3.py, gemma2.py, phi3.py, mixtral.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stage_worker.attention import AttnMetadata, attend
from stage_worker.kernels import fused_ops
from stage_worker.kv_cache import PagedKVCache
from stage_worker.models.base import PipelineStage
from stage_worker.models.layers import GatedMLP, RMSNorm, make_linear, make_merged_linear
from stage_worker.models.quant import fp8_scheme, input_quant
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


@dataclass(frozen=True)
class LayerTraits:
    """Where a family's decoder layer departs from Llama's (the rest comes from config.json)."""

    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of every q and k head, before rotary
    sandwich_norms: bool = False  # Gemma 2: RMSNorm of the attention output and of the MLP output too
    # Builds layer i's MLP as mlp(cfg, i) (None: LlamaMLP); Mixtral, Qwen3-MoE: a sparse MoE block.
    mlp: Callable[[ModelConfig, int], nn.Module] | None = None


def sliding_window(cfg: ModelConfig, layer: int) -> int | None:
    """Keys a query of `layer` sees (itself included), or None for full causal attention.

    As transformers reads config.json: `layer_types` where written (5.x: Gemma 2, Qwen2/3), else
    Qwen's `use_sliding_window` + `max_window_layers`, Gemma 2's even layers, and every layer of
    Mistral / Mixtral / Phi-3 when `sliding_window` is set.
    """
    raw = cfg.raw
    window = raw.get("sliding_window")
    if not window or raw.get("use_sliding_window") is False:
        return None
    types = raw.get("layer_types")
    if types:
        return int(window) if types[layer] == "sliding_attention" else None
    if "max_window_layers" in raw:  # Qwen2 / Qwen3 written by transformers 4.x
        return int(window) if layer >= int(raw["max_window_layers"]) else None
    if cfg.architecture == "Gemma2ForCausalLM":
        return int(window) if layer % 2 == 0 else None
    return int(window)


def mlp_activation(cfg: ModelConfig):
    """The MLP's act(gate) * up (one fused kernel each): SiLU, or Gemma's tanh GELU, as config.json names it."""
    name = cfg.raw.get("hidden_activation") or cfg.raw.get("hidden_act") or "silu"
    if name == "silu":
        return fused_ops.silu_and_mul
    if name == "gelu_pytorch_tanh":
        return fused_ops.gelu_tanh_and_mul
    raise CheckpointError(f"config.json: hidden activation {name!r} is not supported "
                          f"(supported: silu, gelu_pytorch_tanh)")


class LlamaAttention(nn.Module):
    """q/k/v as one matmul (qkv_proj), rotary of q and k plus the K/V write in one op, then
    attention over the pool (fused_ops and attention.attend: Triton on CUDA, torch elsewhere).

    Per layer: its sliding window (or None), Gemma 2's logit soft cap and query_pre_attn_scalar,
    Qwen3's q/k norms (`traits.qk_norm`)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0, traits: LayerTraits = LayerTraits()):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        # Qwen2 has q/k/v biases but none on o_proj; Llama's attention_bias covers all four.
        o_bias = cfg.attention_bias and cfg.architecture != "Qwen2ForCausalLM"
        fp8 = fp8_scheme(cfg)
        self.qkv_proj = make_merged_linear(h, {"q_proj": self.n_heads * d, "k_proj": self.n_kv * d,
                                               "v_proj": self.n_kv * d}, cfg.attention_bias, fp8)
        self.o_proj = make_linear(self.n_heads * d, h, o_bias, fp8)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if traits.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if traits.qk_norm else None
        self.scale = float(cfg.raw.get("query_pre_attn_scalar") or d) ** -0.5
        self.window = sliding_window(cfg, layer)
        self.softcap = cfg.raw.get("attn_logit_softcapping") or None

    def input_quant(self, m: int) -> str | None:
        return input_quant(self.qkv_proj, m)

    def forward(self, x, cos, sin, meta: AttnMetadata, layer_kv) -> torch.Tensor:
        t = cos.shape[0]  # x: [T, H], or quantized as input_quant(T) asked (kernels/fp8.py Fp8Act)
        qkv = self.qkv_proj(x).view(t, self.n_heads + 2 * self.n_kv, self.head_dim)
        if self.q_norm is not None:
            qkv = self._norm_qk(qkv)
        q = fused_ops.rotary_and_cache(qkv, cos, sin, self.n_heads, self.n_kv, *layer_kv, meta.slot_mapping)
        o = attend(q, layer_kv, meta, self.scale, self.window, self.softcap)  # [T, Hq, D]
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))  # [T, H]

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [T, Hq + 2 Hkv, D] -> the same with every q and k head RMS-normalised over D (Qwen3)."""
        t, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        q = self.q_norm(q.reshape(-1, d)).view(t, self.n_heads, d)
        k = self.k_norm(k.reshape(-1, d)).view(t, self.n_kv, d)
        return torch.cat([q, k, v], dim=1)


class LlamaMLP(GatedMLP):
    """SwiGLU (or Gemma's GELU) MLP with config.json's sizes, bias and activation (layers.GatedMLP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, fp8_scheme(cfg), mlp_activation(cfg))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0, traits: LayerTraits = LayerTraits()):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = LlamaAttention(cfg, layer, traits)
        # Llama's post_attention_layernorm is the MLP's input norm. Gemma 2's (same name, as in its
        # checkpoint) normalises the attention output, and pre_feedforward_layernorm is the MLP's.
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.sandwich = traits.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(h, eps)
            self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.mlp = traits.mlp(cfg, layer) if traits.mlp else LlamaMLP(cfg)

    def forward(self, x, residual, cos, sin, meta, layer_kv):
        """One layer with the residual stream carried separately (vLLM's layout), so that each
        residual add runs inside the next RMSNorm's kernel.

        x: the previous layer's MLP output, or the stage input when residual is None.
        Returns (this layer's MLP output, residual); their sum is the layer's output.
        """
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        t = x.shape[0]
        # With FP8 projections each norm writes its output quantized for the GEMM after it.
        h, residual = ln1.add_and_norm(x, residual, input_quant(self.self_attn, t))
        h = self.self_attn(h, cos, sin, meta, layer_kv)
        if self.sandwich:  # Gemma 2: the attention output is normalised before the residual add
            h = ln2(h)
            ln2 = self.pre_feedforward_layernorm
        h, residual = ln2.add_and_norm(h, residual, input_quant(self.mlp, t))
        h = self.mlp(h)
        if self.sandwich:
            h = self.post_feedforward_layernorm(h)
        return h, residual


class LlamaStage(PipelineStage):
    """Layers [layer_start, layer_end) of a Llama-family model; one per stage worker.

    Stateless between calls except through the PagedKVCache it is handed (forward writes the new
    tokens' K/V there). Not thread-safe: run one micro-batch at a time.
    """

    kv_cache_cls = PagedKVCache
    traits = LayerTraits()  # a family's departures from Llama's layer (models/qwen3.py, gemma2.py, ...)

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        self._build_range(cfg, layer_start, layer_end, lambda i: LlamaDecoderLayer(cfg, i, self.traits),
                          dtype, device)
        self.attention_tile_q = block_q(cfg.num_attention_heads, cfg.num_key_value_heads)
        inv_freq, self.attention_scaling = self.rope_init(cfg)
        self.inv_freq = inv_freq.to(device)  # float32 always, not a parameter or buffer

    def rope_init(self, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
        """(inv_freq [D/2] float32, cos/sin scaling); a family with its own rope scaling overrides it."""
        return rope_inv_freq(cfg)

    def kv_dims(self) -> tuple[int, int]:
        return self.cfg.num_key_value_heads, self.cfg.head_dim
