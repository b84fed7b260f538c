"""Gemma 2: the Llama-family layer with Gemma's departures, each where transformers has it.

- Norms around both sublayers ("sandwich"): input_layernorm -> attention -> post_attention_layernorm
  -> residual add -> pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm -> residual add
  (`LayerTraits.sandwich_norms`, models/llama.py).
- RMSNorm scales by (1 + w): the checkpoint stores w, the stage holds 1 + w (`after_load`), so the
  shared norm kernels run unchanged; a GGUF file stores 1 + w already, so nothing is added then.
  (In bf16 the sum is rounded once at load, where transformers
  adds in float32 at every call: equal in float32, within a bf16 ulp otherwise.)
- Token embeddings times sqrt(hidden_size), rounded to the activation dtype (`embed_scale`).
- Attention: scale query_pre_attn_scalar ** -0.5; scores capped as 50 * tanh(s / 50)
  (`attn_logit_softcapping`); even layers see a sliding window of `sliding_window` keys, odd layers
  everything (`layer_types`). Both hold on every attention path (attention.py, kernels/).
- MLP: gelu_pytorch_tanh(gate) * up. Final logits capped as 30 * tanh(l / 30)
  (`final_logit_softcapping`). The LM head is tied to the embeddings.
"""

from __future__ import annotations

import torch

from stage_worker.models.layers import RMSNorm
from stage_worker.models.llama import LayerTraits, LlamaStage
from stagemesh.gguf_file import NORMS_HOLD_ONE_PLUS_W
from stagemesh.model_config import ModelConfig


class Gemma2Stage(LlamaStage):
    """Layers [layer_start, layer_end) of a Gemma 2 model (same contract as LlamaStage)."""

    traits = LayerTraits(sandwich_norms=True)

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(cfg, layer_start, layer_end, dtype=dtype, device=device)
        self.embed_scale = cfg.hidden_size ** 0.5
        self.final_logit_softcap = cfg.raw.get("final_logit_softcapping") or None
        # a GGUF file already holds 1 + w (llama.cpp's converter adds it; stagemesh/gguf_file.py)
        self.norm_offset = 0.0 if cfg.raw.get(NORMS_HOLD_ONE_PLUS_W) else 1.0

    @torch.no_grad()
    def after_load(self) -> None:
        """Gemma's RMSNorm multiplies by (1 + w): hold 1 + w (every norm of the stage)."""
        for module in self.modules():
            if isinstance(module, RMSNorm) and self.norm_offset:
                module.weight.add_(self.norm_offset)
