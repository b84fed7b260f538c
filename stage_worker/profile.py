"""A short benchmark of one decoder layer, reported at registration so the coordinator can
plan by measured cost (Petals measures its blocks the same way before announcing them).

Builds one middle layer of the served model with random weights on the worker's device and
times a decode micro-batch (8 sequences x 1 token over a 64-token context) and a 128-token
prefill. Takes well under a second for small models.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from stagemesh.model_config import ModelConfig
from stagemesh.v1 import stagemesh_pb2 as pb

from stage_worker.attention import AttnMetadata
from stage_worker.dummy_weights import init_weights
from stage_worker.loader import build_model_on_device
from stage_worker.models import quant


def profile_layer(cfg: ModelConfig, device: str, block_size: int, slowdown: float = 1.0,
                  dtype: torch.dtype | None = None, kv_cache_dtype: str = "auto") -> pb.LayerProfile:
    small = dataclasses.replace(cfg, num_hidden_layers=3)
    layer = build_model_on_device(small, 1, 2, device=device, dtype=dtype)  # a middle layer only
    init_weights(layer, small)  # random, drawn on the device (FP8 layers included)
    quant.prepare(layer)  # the compute path the served stage will take
    blocks_per_seq = -(-65 // block_size)
    kv = layer.make_kv_cache(8 * blocks_per_seq + 8, block_size, dtype=layer.kv_cache_dtype(kv_cache_dtype))
    hidden_size = cfg.hidden_size
    wdtype = layer.dtype

    def timed(chunks, tokens) -> float:
        meta = AttnMetadata.build(chunks, block_size, device)
        x = torch.randn(tokens, hidden_size, dtype=wdtype, device=device)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            layer(None, x, meta, kv)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:]) * 1e3 * slowdown  # min: robust to other processes on the machine

    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(8)]
    decode = timed([(64, 1, t) for t in tables], 8)
    prefill_blocks = list(range(-(-128 // block_size)))
    prefill = timed([(0, 128, prefill_blocks)], 128)
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    return pb.LayerProfile(decode_ms_per_layer=decode, prefill_ms_per_layer=prefill, bytes_per_layer=layer_bytes,
                           kv_bytes_per_block_per_layer=kv.bytes_per_block // getattr(kv, "num_layers", 1))
