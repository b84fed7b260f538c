"""`stagemesh up`: the whole mesh on this host as separate processes on loopback.

Starts the coordinator, then stages x replicas stage workers, then the gateway; prints one line
containing `ready` when the gateway serves; on SIGINT/SIGTERM stops every child (children also
get SIGTERM from the kernel if this process dies, so none is orphaned).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from stagemesh.net import free_port
from stagemesh.proc import die_with_parent


@dataclass
class MeshConfig:
    model_dir: str
    stages: int = 1
    replicas: int = 1
    spares: int = 0
    port: int = 50051
    host: str = "127.0.0.1"
    redis: str = ""
    device: str = "auto"
    block_size: int = 16
    kv_cache_bytes: int = 0
    kv_blocks: int = 0
    max_batched_tokens: int = 512
    threads: int = 0
    log_level: str = "warning"
    routing: str = "cache_aware"
    routing_weight: float = 2.0
    http_port: int = 0
    max_running: int = 256
    # Prometheus /metrics ports, 0: off. Else gateway BASE, coordinator BASE+1, cache_service BASE+2,
    # worker i BASE+10+i (the layout of compose/prometheus.yml, shifted to BASE).
    metrics_port: int = 0
    extra_gateway_args: list[str] = field(default_factory=list)
    inflight: int = 0  # micro-batches in flight per replica; 0: the gateway's default (engine.inflight_for)
    plan: str = "measured"  # coordinator --plan: measured (profiles, min-max) or uniform
    rebalance: bool = True  # coordinator moves layer boundaries while serving
    # Certificates written by `stagemesh certs DIR`: mutual TLS on every internal link, TLS on the
    # gateway's public port (client certificate optional). The coordinator link stays plaintext
    # until coordinator/server.py binds its port through stagemesh.security.add_port.
    tls_dir: str = ""

    def __post_init__(self):
        if self.stages < 1 or self.replicas < 1 or self.spares < 0:
            raise ValueError("--stages and --replicas must be >= 1, --spares >= 0")


class Mesh:
    def __init__(self, config: MeshConfig):
        self.config = config
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.coordinator_address = ""

    def start(self, timeout_s: float = 300.0) -> str:
        """Start every process; returns the gateway address once it serves."""
        cfg = self.config
        py = sys.executable
        coord_port = free_port()
        coord = f"{cfg.host}:{coord_port}"
        self.coordinator_address = coord
        tls = self._tls_args()
        self._spawn("coordinator", [py, "-m", "coordinator", "--model", cfg.model_dir, "--stages", str(cfg.stages),
                                    "--replicas", str(cfg.replicas), "--block-size", str(cfg.block_size),
                                    "--port", str(coord_port), "--log-level", cfg.log_level, "--plan", cfg.plan,
                                    *([] if cfg.rebalance else ["--no-rebalance"]),
                                    *self._metrics_args(1), *tls], timeout_s)
        cache_args: list[str] = []
        if cfg.redis:
            cache_port = free_port()
            self._spawn("cache_service", [py, "-m", "cache_service", "--host", cfg.host, "--port", str(cache_port),
                                          "--redis", cfg.redis, "--log-level", cfg.log_level,
                                          *self._metrics_args(2), *tls], timeout_s)
            cache_args = ["--cache-service", f"{cfg.host}:{cache_port}"]
        n_workers = cfg.stages * cfg.replicas + cfg.spares
        threads = cfg.threads or _default_threads(cfg.device, n_workers)
        worker_cmd = [py, "-m", "stage_worker", "--model", cfg.model_dir, "--coordinator", coord,
                      "--device", cfg.device, "--block-size", str(cfg.block_size), "--threads", str(threads),
                      "--kv-cache-bytes", str(cfg.kv_cache_bytes), "--kv-blocks", str(cfg.kv_blocks),
                      "--log-level", cfg.log_level, *tls]
        for i in range(n_workers):
            self._spawn(f"worker{i}", [*worker_cmd, *self._metrics_args(10 + i)], timeout_s, wait=False)
        gw_cmd = [py, "-m", "gateway", "--model", cfg.model_dir, "--coordinator", coord, "--host", cfg.host,
                  "--port", str(cfg.port), "--inflight", str(cfg.inflight),
                  "--max-batched-tokens", str(cfg.max_batched_tokens), "--max-running", str(cfg.max_running),
                  "--routing", cfg.routing, "--routing-weight", str(cfg.routing_weight), "--http-port", str(cfg.http_port), "--log-level", cfg.log_level,
                  *cache_args, *self._metrics_args(0), *tls,
                  *cfg.extra_gateway_args]
        self._spawn("gateway", gw_cmd, timeout_s)
        return f"{cfg.host}:{cfg.port}"

    def _tls_args(self) -> list[str]:
        d = self.config.tls_dir
        if not d:
            return []
        return ["--tls-cert", os.path.join(d, "server.pem"), "--tls-key", os.path.join(d, "server.key"),
                "--tls-ca", os.path.join(d, "ca.pem")]

    def _metrics_args(self, offset: int) -> list[str]:
        base = self.config.metrics_port
        return ["--metrics-port", str(base + offset)] if base else []

    def stop(self, timeout_s: float = 10.0) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def dead_child(self) -> str | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def _spawn(self, name: str, cmd: list[str], timeout_s: float, wait: bool = True) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
        self.children.append((name, proc))
        ready = threading.Event()
        threading.Thread(target=_pump, args=(proc, ready), daemon=True).start()
        if not wait:
            return
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            dead = self.dead_child()
            if dead:
                raise RuntimeError(dead)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready within {timeout_s:.0f}s")


def _pump(proc: subprocess.Popen, ready: threading.Event) -> None:
    """Watch a child's stdout for its ready line; pass everything else through to stderr."""
    for line in proc.stdout:
        if "ready" in line:
            ready.set()
        else:
            sys.stderr.write(line)


def _default_threads(device: str, n_workers: int) -> int:
    """torch CPU threads per worker: the cores split between the workers on the CPU; one on a GPU.

    A GPU worker's host side is small ops and kernel launches from one Python thread; a pool of
    intra-op threads there only competes with it (on the H100 host, 16 threads per worker made the
    mixed benchmark about twice as slow: benchmarks/README_gpu.md).
    """
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return 1
    return max(1, (os.cpu_count() or 1) // n_workers)
