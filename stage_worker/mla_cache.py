"""The physical KV pool of a Multi-head Latent Attention (DeepSeek V2/V3) stage.

MLA caches, per token and layer, one compressed latent instead of per-head K and V: the
normalised `c_kv` [kv_lora_rank] (after kv_a_layernorm) and the shared rotary key `k_pe`
[qk_rope_head_dim] (after rope). Both live side by side in one tensor per layer,
`[num_slots, kv_lora_rank + qk_rope_head_dim]`, so writing a step's new tokens is one
`index_copy_` and reading a context is one `index_select` (the flat slot layout of
kv_cache.PagedKVCache: `slot = block_id * block_size + offset`; the gateway's block tables index
both pools the same way). Attention reads the latent rows in place, through the block tables
(kernels/mla_decode.py, kernels/mla_prefill.py: absorbed weights, multi-query over the latent),
never expanding per-head K/V, which is why the pool is ~57x smaller than full K/V for DeepSeek-V3.

Not thread-safe: one micro-batch executes at a time on a stage, and the attention writes here.
"""

from __future__ import annotations

import torch

from stage_worker.kv_cache import SlotPool, slot_pool_bytes


class MLAKVCache(SlotPool):
    """Latent tensors for local layers [0, num_layers) of this stage (indices are local)."""

    num_kv_heads = 1  # attention is multi-query over the latent: one shared "head" per slot

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int,
                 rope_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 scratch_blocks: int | None = None):
        if min(num_layers, num_blocks, block_size, kv_lora_rank, rope_dim) <= 0:
            raise ValueError("MLAKVCache dimensions must be positive")
        # One scratch block past the gateway's range (block id `num_blocks`, never handed out):
        # padded rows of a CUDA-graph step write and read their latent there. Default: CUDA only.
        if scratch_blocks is None:
            scratch_blocks = 1 if torch.device(device).type == "cuda" else 0
        self._init_slots(num_layers, num_blocks, block_size, dtype, device, scratch_blocks)
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        self.slot_width = kv_lora_rank + rope_dim  # c_kv | k_pe
        shape = ((num_blocks + scratch_blocks) * block_size, self.slot_width)
        # latents[i]: [num_slots, kv_lora_rank + rope_dim] = c_kv | k_pe
        self.latents = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def layer(self, local_idx: int) -> torch.Tensor:
        """Latent pool of local layer `local_idx` (0 = this stage's first layer)."""
        return self.latents[local_idx]

    def tensors(self) -> list[torch.Tensor]:
        return list(self.latents)

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                    dtype: torch.dtype) -> int:
        return slot_pool_bytes(num_layers, block_size, kv_lora_rank + rope_dim, dtype)

    @classmethod
    def blocks_for_budget(cls, budget_bytes: int, num_layers: int, block_size: int,
                          kv_lora_rank: int, rope_dim: int, dtype: torch.dtype) -> int:
        """How many whole blocks fit in `budget_bytes` (0 when not even one does)."""
        per_block = cls.block_bytes(num_layers, block_size, kv_lora_rank, rope_dim, dtype)
        return max(0, int(budget_bytes) // per_block)


def kv_bytes_per_token(num_layers: int, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                       qk_rope_head_dim: int, v_head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """KV bytes one token costs over `num_layers` layers: the MLA latent vs full per-head K/V.

    Full K/V is what a standard paged cache would hold if MLA were expanded (K of
    qk_nope + qk_rope and V of v_head_dim per head), as a non-MLA serving stack does.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    latent = num_layers * (kv_lora_rank + qk_rope_head_dim) * itemsize
    full = num_layers * num_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) * itemsize
    return {"latent": latent, "full_kv": full}
