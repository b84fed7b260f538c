"""Coordinator settings, built once in main."""

from __future__ import annotations

from dataclasses import dataclass

from stagemesh.config_cli import knob
from stagemesh.model_config import KV_BLOCK_SIZE
from stagemesh.tls import TlsConfig


def _split(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@dataclass(frozen=True)
class CoordinatorConfig:
    num_layers: int  # from the checkpoint (--model)
    stages: int = knob(1, "pipeline stages per replica")
    replicas: int = knob(1, "replicas of the whole model")
    block_size: int = knob(KV_BLOCK_SIZE, "tokens per KV block (the workers must use the same)")
    host: str = knob("127.0.0.1", "address to bind")
    port: int = knob(0, "gRPC port; 0 picks a free one (printed on the ready line)")
    heartbeat_interval_ms: int = 500
    metrics_port: int = knob(0, "serve Prometheus /metrics here (0: off)")
    # 3 missed heartbeats at the default interval.
    dead_after_s: float = knob(1.5, "a worker silent this long is dead and its layers move")
    state_file: str = knob("", "persist the plan here (survives a coordinator restart); empty: not persisted")
    # A live worker re-registers at its next heartbeat after the restart.
    restore_grace_s: float = knob(3.0, "after a restart from the state file, probe the slots whose worker has not "
                                       "re-registered by then; an unreachable one fails over")
    restore_wait_s: float = knob(30.0, "a restored slot whose worker answers but never re-registers fails over "
                                       "after this")
    plan: str = knob("measured", "layer split: from the workers' measured profiles (min-max), or even",
                     choices=("measured", "uniform"))
    split: tuple[int, ...] = knob((), "explicit layer counts per stage, e.g. 10,12,10 (overrides --plan)",
                                  parse=_split, unparse=lambda v: ",".join(map(str, v)))
    # Live rebalancing: act when max/mean stage time stays above the threshold for the window,
    # at most once per min interval, and only for a predicted gain above min_gain (hysteresis).
    rebalance: bool = knob(True, "never move layer boundaries while serving (e.g. several stages sharing one GPU, "
                                 "where a move changes no stage's speed)", flag="--no-rebalance")
    rebalance_threshold: float = knob(1.25, "max/mean stage time that triggers a move")
    rebalance_window_s: float = knob(5.0, "how long a replica stays imbalanced before a move")
    rebalance_min_interval_s: float = knob(60.0, "at most one move per this many seconds")
    rebalance_min_gain: float = 0.15
    # A worker that cannot load its new layers (e.g. out of memory) keeps serving its old ones.
    rebalance_load_timeout_s: float = knob(120.0, "undo a move whose new layers are not loaded on every stage "
                                                  "within this time")
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
