"""Random weights for a stage, drawn on its device from config.json alone (`--load-format dummy`).

For benchmarking a real-size stage without its files (a DeepSeek-V3 stage's share is ~60 GB):
the tokens it produces are meaningless. Every tensor is drawn in place on the device, in chunks
of at most CHUNK elements, so nothing the size of a weight is ever built on the host and no
transient copy larger than a chunk exists.

- RMSNorm weights are 1, biases 0 (router correction bias included);
- other float weights ~ N(0, initializer_range) (0.02 when config.json has none);
- FP8 weights (an FP8 config, or `--quantization fp8`): e4m3 values ~ N(0, 64) clamped to +-448,
  and each scale_inv entry (a 128x128 block's, or a row's per channel) = initializer_range / 64 *
  U(0.75, 1.25), so the dequantized weights have about the same spread as the float ones.
Each tensor's generator is seeded from its name (global layer indices), so a layer's weights do
not depend on how the model is split into stages.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from stage_worker.models.layers import RMSNorm
from stage_worker.models.quant import FP8_DTYPES
from stagemesh.model_config import ModelConfig

CHUNK = 1 << 26  # elements drawn at once (128 MiB in bf16)
FP8_SPREAD = 64.0  # std of the e4m3 values before clamping


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Fill every parameter of `model` in place (see the module docstring); returns it."""
    std = float(cfg.raw.get("initializer_range") or 0.02)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    params = dict(model.named_parameters())
    scales = {name + "_scale_inv" for name, p in params.items() if p.dtype in FP8_DTYPES}
    for name, p in params.items():
        gen = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
        if name in scales:
            continue  # drawn with its weight
        if p.dtype in FP8_DTYPES:
            _fp8(p, params[name + "_scale_inv"], std, gen)
        elif id(p) in norms:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            for chunk in _chunks(p):
                chunk.normal_(0.0, std, generator=gen)
    return model


def _chunks(p: torch.Tensor) -> list[torch.Tensor]:
    """Views of p along its first dim, each at most CHUNK elements (one row at least)."""
    flat = p.view(-1, p.shape[-1]) if p.dim() > 1 else p.view(1, -1)
    rows = max(1, CHUNK // max(flat.shape[1], 1))
    return list(flat.split(rows))


def _fp8(w: torch.Tensor, scale: torch.Tensor, std: float, gen: torch.Generator) -> None:
    for chunk in _chunks(w):
        values = torch.randn(chunk.shape, generator=gen, device=w.device, dtype=torch.bfloat16)
        chunk.copy_((values * FP8_SPREAD).clamp(-448.0, 448.0).to(w.dtype))
    scale.uniform_(0.75, 1.25, generator=gen).mul_(std / FP8_SPREAD)
