"""The physical KV pool of one stage: tensors only, no bookkeeping.

The gateway's block manager owns block ids and tables (logical KV); this module owns the tensors
they index (physical KV), as nano-vllm's `ModelRunner.allocate_kv_cache`. Each local layer has a k
and a v tensor laid out as flat *slots*, `slot = block_id * block_size + offset`, so that writing
new tokens is one `index_copy_` and reading a sequence's context is one `index_select`.

Not thread-safe: one micro-batch executes at a time on a stage, and its layers write here.
"""

from __future__ import annotations

import torch


FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # e4m3fn's largest finite value: K/V beyond it saturate (scale 1.0, vLLM's default)


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's element type for `--kv-cache-dtype`: auto (the model's dtype) or fp8 (e4m3)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "fp8":
        return FP8_KV
    raise ValueError(f"unknown kv cache dtype {kv_cache_dtype!r} (auto or fp8)")


def check_kv_cache_dtype(kv_cache_dtype: str, pool_cls: type, device: torch.device) -> None:
    """ValueError naming the flag when `--kv-cache-dtype` cannot serve this pool on this device:
    FP8 is for K/V pools (PagedKVCache), on the CPU or CUDA SM89+ (e4m3 conversion)."""
    if kv_cache_dtype == "auto":
        return
    if pool_cls is not PagedKVCache:
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} is for K/V pools; a latent (MLA) pool keeps the "
                         "model's dtype (use --kv-cache-dtype auto)")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} needs a CUDA GPU of compute capability 8.9 or "
                         "newer (FP8 conversion), or the CPU")


def write_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slots] = values, cast to the cache's dtype (FP8: saturated at +-448, written through
    a byte view: torch has no FP8 index_copy_ on the CPU)."""
    if cache.dtype == FP8_KV:
        _bytes(cache).index_copy_(0, slots, _bytes(values.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)))
    else:
        cache.index_copy_(0, slots, values.to(cache.dtype))


def read_slots(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[slots] in `dtype` (slots of any shape)."""
    return _bytes(cache)[slots].view(cache.dtype).to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """t's storage as bytes, dim 0 unchanged (the last dim times the item size)."""
    return t.view(torch.uint8)


def slot_pool_bytes(num_layers: int, block_size: int, slot_width: int, dtype: torch.dtype) -> int:
    """Bytes of one block of a pool whose slots hold `slot_width` elements per layer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_layers * block_size * slot_width * itemsize


class SlotPool:
    """Bookkeeping shared by every pool layout: blocks of `block_size` flat slots per local layer,
    plus optional scratch blocks past the gateway's range (block id `num_blocks` on)."""

    slot_width: int  # elements one token costs in one layer

    def _init_slots(self, num_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype,
                    device: torch.device | str, scratch_blocks: int) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.scratch_blocks = scratch_blocks

    @property
    def scratch_block(self) -> int | None:
        """Block id reserved for padding rows, or None when the pool has none."""
        return self.num_blocks if self.scratch_blocks else None

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block costs across all local layers."""
        return slot_pool_bytes(self.num_layers, self.block_size, self.slot_width, self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Every pool tensor, each indexed by slot on its first dimension."""
        raise NotImplementedError

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block src's slots onto block dst's, in every local layer, for every (src, dst) at
        once: one gather and one scatter per tensor (copy-on-write of a block that samples of one
        prompt shared; ForwardRequest.block_copies, whose destinations are never sources)."""
        if not pairs:
            return
        blocks = torch.tensor(pairs, dtype=torch.long).T.contiguous()  # [2, P]: sources, destinations
        slots = (blocks[:, :, None] * self.block_size + torch.arange(self.block_size)).reshape(2, -1)
        src_slots, dst_slots = slots.to(self.device, non_blocking=True)
        for t in map(_bytes, self.tensors()):
            t.index_copy_(0, dst_slots, t.index_select(0, src_slots))


class PagedKVCache(SlotPool):
    """k/v tensors for layers [0, num_layers) of this stage (indices are local, not global)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 scratch_blocks: int | None = None):
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) <= 0:
            raise ValueError("PagedKVCache dimensions must be positive")
        # One scratch block past the gateway's range (block id `num_blocks`, never handed out):
        # padded rows of a CUDA-graph decode write and read there. Default: on CUDA only.
        if scratch_blocks is None:
            scratch_blocks = 1 if torch.device(device).type == "cuda" else 0
        self._init_slots(num_layers, num_blocks, block_size, dtype, device, scratch_blocks)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.slot_width = 2 * num_kv_heads * head_dim  # k and v
        shape = ((num_blocks + scratch_blocks) * block_size, num_kv_heads, head_dim)
        # k_caches[i], v_caches[i]: [(num_blocks + scratch_blocks) * block_size, Hkv, D]
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def layer(self, local_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of local layer `local_idx` (0 = this stage's first layer)."""
        return self.k_caches[local_idx], self.v_caches[local_idx]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k_caches, *self.v_caches]

    @staticmethod
    def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
        return slot_pool_bytes(num_layers, block_size, 2 * num_kv_heads * head_dim, dtype)

    @classmethod
    def blocks_for_budget(cls, budget_bytes: int, num_layers: int, block_size: int,
                          num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """How many whole blocks fit in `budget_bytes` (0 when not even one does)."""
        per_block = cls.block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)
        return max(0, int(budget_bytes) // per_block)
