"""What every model family's stage shares: the embed -> layers -> (norm, head) walk.

A family's stage class calls `_build_range` with its decoder layer, then sets `inv_freq`,
`attention_scaling`, `kv_cache_cls` and `kv_dims()`; the walk, the rotary tables, the KV pool and
the checkpoint names (`checkpoint_tensors`) are the same code for every family.
"""

from __future__ import annotations

import torch
from torch import nn

from stage_worker.attention import AttnMetadata
from stage_worker.kv_cache import cache_dtype, check_kv_cache_dtype
from stage_worker.models import quant
from stage_worker.models.layers import RMSNorm, checkpoint_tensors
from stagemesh.model_config import ModelConfig


class PipelineStage(nn.Module):
    """Layers [layer_start, layer_end) of a decoder-only model; one per stage worker.

    Stateless between calls except through the KV pool it is handed (forward writes the new
    tokens' K/V there). Not thread-safe: run one micro-batch at a time.
    """

    layer_start: int
    layer_end: int
    is_first: bool
    is_last: bool

    # Query tokens per tile of unified_attention for mixed micro-batches on a GPU; None: this
    # family's attention has no unified kernel (mixed micro-batches use its own paged path).
    attention_tile_q: int | None = None
    # With unified attention: prefill chunks of at least this many tokens in eager micro-batches take
    # another form of attention (DeepSeek's expanded MLA, kernels/mla_expand.py); 0: never.
    attention_expand_min_tokens: int = 0
    # ... and a step the mixed CUDA graphs could take leaves them for it only when its expanded
    # chunks hold at least this many tokens (below, the graph's absorbed form is faster).
    attention_expand_graph_min_tokens: int = 0
    # Rotary tables: [T, D] as cat(freqs, freqs) (rotate_half layout, Llama), or [T, D/2] (DeepSeek).
    rotary_duplicate: bool = True
    kv_cache_cls: type  # PagedKVCache or MLAKVCache: block_bytes(layers, block_size, *kv_dims(), dtype)
    inv_freq: torch.Tensor  # [D/2] float32 on the stage's device, not a parameter
    attention_scaling: float = 1.0
    # Gemma 2: token embeddings times sqrt(hidden) (in the activation dtype, as transformers), and
    # the final logits capped as cap * tanh(logits / cap). None: off.
    embed_scale: float | None = None
    final_logit_softcap: float | None = None

    def _build_range(self, cfg: ModelConfig, layer_start: int, layer_end: int, make_layer,
                     dtype: torch.dtype, device) -> None:
        """embed_tokens (first stage), layers[str(global index)], norm and lm_head (last stage).

        Built on the meta device and materialised empty: weights come from the checkpoint, so
        random init of a multi-GB range would be wasted time.
        """
        if not 0 <= layer_start < layer_end <= cfg.num_hidden_layers:
            raise ValueError(f"bad layer range [{layer_start}, {layer_end}) for "
                             f"{cfg.num_hidden_layers} layers")
        self.cfg, self.layer_start, self.layer_end = cfg, layer_start, layer_end
        self.is_first, self.is_last = layer_start == 0, layer_end == cfg.num_hidden_layers
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.is_first else None
            self.layers = nn.ModuleDict({str(i): make_layer(i) for i in range(layer_start, layer_end)})
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.is_last else None
            self.lm_head = (nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                            if self.is_last else None)
        # The dtype is set on the meta device (free), FP8 weights and scales kept as they are,
        # then materialised once: never a transient stage-dtype copy of FP8 weights.
        self.to(dtype)
        quant.fix_dtypes(self, dtype)
        self.to_empty(device=device)
        if self.is_first and self.is_last and cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def num_local_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def _first_norm(self) -> torch.Tensor:
        """A weight in the stage's dtype on its device (some parameters stay float32)."""
        return self.layers[str(self.layer_start)].input_layernorm.weight

    @property
    def dtype(self) -> torch.dtype:
        return self._first_norm.dtype

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint name (minus `model.`) -> the tensor (or view) the loader copies it into."""
        return checkpoint_tensors(self)

    def after_load(self) -> None:
        """Called once by the loader when every checkpoint tensor is in: a family whose checkpoint
        stores a weight in another convention converts it here (Gemma 2's norms: 1 + w)."""

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin: [T, D] or [T, D/2] (rotary_duplicate), in float32 then cast, as transformers."""
        freqs = positions.float()[:, None] * self.inv_freq_at(positions)  # [T, D/2]
        if self.rotary_duplicate:
            freqs = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def inv_freq_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotary frequencies [1, D/2] for all tokens, or [T, D/2] per token (Phi-3's LongRoPE
        switches to its long factors past the original context)."""
        return self.inv_freq[None, :]

    def kv_dims(self) -> tuple[int, int]:
        """The pool's per-slot shape arguments after (num_layers, num_blocks, block_size)."""
        raise NotImplementedError

    def kv_block_bytes(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        """Bytes one KV block costs on this stage (sizes the pool without allocating one)."""
        return self.kv_cache_cls.block_bytes(self.num_local_layers, block_size, *self.kv_dims(), dtype or self.dtype)

    def kv_cache_dtype(self, name: str) -> torch.dtype:
        """The pool's dtype for `--kv-cache-dtype` (auto: the model's). FP8 (e4m3, scale 1) serves
        the paged K/V pools (Llama family) on the CPU and on CUDA SM89+; the MLA latent pool keeps
        the model's dtype."""
        check_kv_cache_dtype(name, self.kv_cache_cls, self._first_norm.device)
        return cache_dtype(name, self.dtype)

    def make_kv_cache(self, num_blocks: int, block_size: int, dtype=None, device=None,
                      scratch_blocks: int | None = None):
        """A pool shaped for this stage's layers; scratch_blocks None: the pool's default."""
        p = self._first_norm
        extra = {} if scratch_blocks is None else {"scratch_blocks": scratch_blocks}
        return self.kv_cache_cls(self.num_local_layers, num_blocks, block_size, *self.kv_dims(),
                                 dtype or p.dtype, device or p.device, **extra)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None, hidden: torch.Tensor | None,
                meta: AttnMetadata, kv) -> torch.Tensor:
        """input_ids: [T] (first stage) or hidden: [T, H] -> hidden [T, H] before final norm."""
        if self.is_first:
            if input_ids is None:
                raise ValueError("the first stage takes input_ids")
            x = self.embed_tokens(input_ids)  # [T, H]
            if self.embed_scale is not None:
                x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        else:
            if hidden is None:
                raise ValueError("a non-first stage takes hidden states")
            x = hidden.to(self.dtype)  # [T, H]
        cos, sin = self.rotary(meta.positions, x.dtype)
        return self.run_layers(x, cos, sin, meta, kv)

    def run_layers(self, x: torch.Tensor, cos, sin, meta: AttnMetadata, kv) -> torch.Tensor:
        """x: [T, H] -> [T, H] through every local layer, the residual stream carried beside the
        hidden states: a layer takes (x, residual) and returns (its output, residual), their sum
        being its output, so each residual add runs inside the next RMSNorm (RMSNorm.add_and_norm)."""
        residual = None
        for local, layer in enumerate(self.layers.values()):
            x, residual = layer(x, residual, cos, sin, meta, kv.layer(local))
        return x + residual

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, H] (rows to sample, pre-norm) -> logits [S, V] float32. Last stage only."""
        if not self.is_last:
            raise ValueError("compute_logits is only available on the last stage")
        logits = self.lm_head(self.norm(hidden.to(self.dtype)))
        if self.final_logit_softcap:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
