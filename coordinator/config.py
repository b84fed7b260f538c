"""Coordinator settings, built once in main."""

from __future__ import annotations

from dataclasses import dataclass

from stagemesh.security import TlsConfig


@dataclass(frozen=True)
class CoordinatorConfig:
    num_layers: int
    stages: int = 1
    replicas: int = 1
    block_size: int = 16
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_interval_ms: int = 500
    metrics_port: int = 0  # Prometheus /metrics; 0: off
    # A worker silent this long is dead (3 missed heartbeats at the default interval).
    dead_after_s: float = 1.5
    state_file: str = ""  # where the plan is persisted; empty: not persisted
    # A restored plan's slot whose worker has not re-registered this long after the restart is
    # probed (a live worker re-registers at its next heartbeat); unreachable: failed over. One that
    # answers but never re-registers is failed over after restore_wait_s.
    restore_grace_s: float = 3.0
    restore_wait_s: float = 30.0
    plan: str = "measured"  # "measured" (workers' profiles, min-max) or "uniform"
    split: tuple[int, ...] = ()  # explicit layer counts per stage (overrides plan)
    # Live rebalancing: act when max/mean stage time stays above the threshold for the window,
    # at most once per min interval, and only for a predicted gain above min_gain (hysteresis).
    rebalance: bool = True
    rebalance_threshold: float = 1.25
    rebalance_window_s: float = 5.0
    rebalance_min_interval_s: float = 60.0
    rebalance_min_gain: float = 0.15
    # A move whose new layers are not loaded everywhere by then is undone (a worker that cannot
    # load them, e.g. out of memory, keeps serving its old layers and the old plan comes back).
    rebalance_load_timeout_s: float = 120.0
    tls: TlsConfig | None = None  # mutual TLS on the coordinator's port and its health probes

    def __post_init__(self):
        if self.stages < 1 or self.replicas < 1:
            raise ValueError("stages and replicas must be >= 1")
        if self.num_layers < self.stages:
            raise ValueError(f"the model has {self.num_layers} layers, fewer than --stages {self.stages}")
        if self.dead_after_s * 1000 <= self.heartbeat_interval_ms:
            raise ValueError("dead_after_s must exceed the heartbeat interval")
        if self.plan not in ("measured", "uniform"):
            raise ValueError(f"plan must be measured or uniform, not {self.plan!r}")
        if self.split and (len(self.split) != self.stages or sum(self.split) != self.num_layers):
            raise ValueError(f"--split needs {self.stages} counts summing to {self.num_layers}")
        if not 0 < self.restore_grace_s <= self.restore_wait_s:
            raise ValueError("restore_grace_s must be > 0 and <= restore_wait_s")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
