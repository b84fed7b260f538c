"""Stage worker settings, built once in main."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagemesh.security import TlsConfig


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: str
    coordinator: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str = ""  # address registered with the coordinator; default host:port
    device: str = "auto"  # "auto": cuda:0 when a GPU is present, else cpu
    block_size: int = 16
    kv_cache_bytes: int = 0  # 0: measured free memory on a GPU, 128 MiB on the CPU
    kv_blocks: int = 0  # explicit block count (tests); overrides kv_cache_bytes
    gpu_memory_fraction: float = 0.85
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    slowdown: float = 1.0  # test/demo knob: compute this many times slower
    test_controls: bool = False  # serve Stage.SetSlowdown (tests and benchmarks only)
    lease_ttl_s: float = 60.0  # a gateway silent this long is gone: its sequences' KV is dropped
    metrics_port: int = 0  # Prometheus /metrics; 0: off
    tls: TlsConfig | None = None  # mutual TLS on our port and on links to the next stage/coordinator
    coordinator_plaintext: bool = False  # reach a coordinator that does not serve TLS yet
    tp_size: int = 0  # >= 1: tensor-parallel stage of this many processes (tp_group.py); 0: off

    def __post_init__(self):
        if self.device == "auto":
            object.__setattr__(self, "device", "cuda:0" if torch.cuda.is_available() else "cpu")
        if self.block_size < 1 or self.kv_cache_bytes < 0 or self.kv_blocks < 0:
            raise ValueError("block_size must be >= 1 and KV sizes >= 0")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        if self.tp_size < 0:
            raise ValueError("tp_size must be >= 0")

    def memory_bytes(self) -> int:
        device = torch.device(self.device)
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
