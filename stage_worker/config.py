"""Stage worker settings, built once in main: plain data (the device is resolved in main, not probed here)."""

from __future__ import annotations

from dataclasses import dataclass

from stagemesh.config_cli import knob
from stagemesh.model_config import KV_BLOCK_SIZE
from stagemesh.tls import TlsConfig


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: str = knob(help="checkpoint directory or .gguf file (the worker loads only its layers from it)",
                          flag="--model")
    coordinator: str = knob("", "HOST:PORT of the coordinator; with --consul and without it: the leader in Consul")
    host: str = knob("127.0.0.1", "address to bind")
    port: int = knob(0, "gRPC port; 0 picks a free one (printed on the ready line)")
    advertise: str = knob("", "HOST:PORT others reach this worker at (default: --host:port)")
    device: str = knob("auto", "auto (cuda:0 when a GPU is present, else cpu), cpu or cuda:N")
    block_size: int = knob(KV_BLOCK_SIZE, "tokens per KV block (the coordinator's plan must use the same)")
    kv_cache_bytes: int = knob(0, "KV cache size (0: measured free memory on a GPU, 128 MiB on the CPU)")
    kv_blocks: int = knob(0, "explicit KV block count (overrides --kv-cache-bytes; tests)")
    gpu_memory_fraction: float = 0.85
    threads: int = knob(0, "torch intra-op threads (0: the host's cores / --cpu-share on the CPU, 1 on a GPU)")
    cpu_share: int = knob(1, "workers sharing this host's cores (`stagemesh up` passes its worker count)")
    slowdown: float = knob(1.0, "test/demo: compute this many times slower")
    test_controls: bool = knob(False, "serve Stage.SetSlowdown (tests and benchmarks; off in production)",
                               flag="--enable-test-controls")
    tp_size: int = knob(0, "tensor parallel inside this stage over N processes/GPUs (deepspeed.comm); 0: off")
    lease_ttl_s: float = knob(60.0, "drop the KV of a gateway silent this long")
    quantization: str = knob("none", "fp8: quantize a bf16/fp32 checkpoint's linear and expert weights at load "
                             "into FP8 128x128 blocks (block-scaled FP8 GEMMs on CUDA SM89+); fp8-channel: the "
                             "Llama family's projections with one scale per output row instead (faster at batch "
                             "1, less accurate: README); none: as the checkpoint is (an FP8 checkpoint stays FP8)",
                             choices=("none", "fp8", "fp8-channel"))
    kv_cache_dtype: str = knob("auto", "fp8: keep K/V in FP8 e4m3 (scale 1.0, values past +-448 saturate; half "
                               "the bytes of bf16, so twice the tokens and half the attention reads); auto: the "
                               "model's dtype. Llama-family K/V pools, CPU or CUDA SM89+", choices=("auto", "fp8"))
    load_format: str = knob("auto", "dummy: random weights drawn on the device from config.json alone (benchmarks; "
                            "tokens are meaningless); auto: read the checkpoint's weights", choices=("auto", "dummy"))
    kernel_tuning: str = knob("", "JSON file of kernel tiles and dispatch thresholds for this GPU "
                              "(stage_worker/kernels/tuning.py; the benchmarks/gpu sweeps write one with "
                              "--tuning-out); empty: the file shipped for this GPU's name, else the defaults")
    metrics_port: int = knob(0, "serve Prometheus /metrics here (0: off)")
    tls: TlsConfig | None = None  # mutual TLS on our port and on links to the next stage/coordinator
    coordinator_plaintext: bool = knob(False, "reach the coordinator without TLS even when --tls-* is set")

    def __post_init__(self):
        if self.block_size < 1 or self.kv_cache_bytes < 0 or self.kv_blocks < 0:
            raise ValueError("block_size must be >= 1 and KV sizes >= 0")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        if self.tp_size < 0:
            raise ValueError("tp_size must be >= 0")
        if self.tp_size and (self.quantization != "none" or self.load_format != "auto"):
            # the shards load as the checkpoint is (tp_group.load_sharded), and FP8 does not shard yet
            raise ValueError("--tp-size takes neither --quantization nor --load-format dummy yet")
        if self.lease_ttl_s <= 0:
            raise ValueError("--lease-ttl-s must be > 0")
