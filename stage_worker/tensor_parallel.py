"""Tensor parallelism inside one stage, over DeepSpeed's communication layer (`deepspeed.comm`).

A TP stage is a group of `world` processes on one host, one per device (or, on the CPU, two
processes over gloo/loopback). Every rank loads the same layer range, then `shard_stage` slices it
in place (gpt-fast `tp.py: apply_tp` style):

- column-parallel q/k/v and gate/up (merged matmuls: each part is split, then re-merged,
  `MergedLinear.shard_rows`): rank r keeps its rows, i.e. query heads
  [r*Hq/k, (r+1)*Hq/k) and KV heads [r*Hkv/k, (r+1)*Hkv/k) (GQA groups stay whole on one rank),
  and intermediate columns [r*I/k, (r+1)*I/k);
- row-parallel o_proj and down_proj: rank r keeps the matching input columns, and the partial
  products are summed with `deepspeed.comm.all_reduce` (bias added once, after the sum);
- embeddings, final norm and LM head stay replicated (simplest: their cost is small next to the
  layers, and every rank then holds the same hidden states and logits);
- the KV pool is sharded by heads: `model.cfg` becomes the *local* shape (Hq/k, Hkv/k, I/k), so
  `make_kv_cache` sizes each rank's pool for its own KV heads. `model.tp_full_cfg` keeps the
  checkpoint's shape.

With world 1 the same code runs and the stage is numerically identical to the unsharded one.
The rank-0 worker / follower plumbing is in `tp_group.py` and `tp_follower.py`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from stagemesh.errors import CheckpointError


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: the input features are split across ranks."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, world: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in/k]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.world, self.group = world, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:  # exactly nn.Linear: one addmm, nothing to reduce
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        all_reduce(y, self.group)
        return y + self.bias if self.bias is not None else y


def all_reduce(t: torch.Tensor, group=None) -> None:
    import deepspeed.comm as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _cols(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[1] // world
    return t[:, rank * n:(rank + 1) * n].contiguous().clone()


def _row_parallel(lin: nn.Linear, rank: int, world: int, group) -> RowParallelLinear:
    bias = lin.bias.data if lin.bias is not None else None
    return RowParallelLinear(_cols(lin.weight.data, rank, world), bias, world, group)


def check_divisible(cfg, world: int) -> None:
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(cfg, name) % world:
            raise CheckpointError(f"tensor parallel size {world} does not divide {name}={getattr(cfg, name)}")


@torch.no_grad()
def shard_stage(model, rank: int, world: int, group=None):
    """Shard a loaded Llama-family stage in place for rank `rank` of `world`; returns it."""
    from stage_worker.models.llama import LlamaStage

    if not isinstance(model, LlamaStage) or model.traits.mlp is not None:  # Mixtral's MoE: no TP split
        raise CheckpointError(f"tensor parallelism supports dense Llama-family stages, not {type(model).__name__}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    cfg = model.cfg
    check_divisible(cfg, world)
    from stage_worker.models import quant

    if quant.is_fp8(cfg):
        raise CheckpointError("tensor parallelism does not shard FP8 weights yet: serve FP8 stages without --tp-size")
    for layer in model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        for merged in (attn.qkv_proj, mlp.gate_up_proj):  # each part's rows, then re-merged
            merged.shard_rows(rank, world)
        attn.o_proj = _row_parallel(attn.o_proj, rank, world, group)
        mlp.down_proj = _row_parallel(mlp.down_proj, rank, world, group)
        attn.n_heads //= world
        attn.n_kv //= world
    model.tp_full_cfg = cfg
    model.tp_rank, model.tp_world = rank, world
    model.cfg = dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // world,
                                    num_key_value_heads=cfg.num_key_value_heads // world,
                                    intermediate_size=cfg.intermediate_size // world)
    return model
