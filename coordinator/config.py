"""Coordinator settings, built once in main."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoordinatorConfig:
    num_layers: int
    stages: int = 1
    replicas: int = 1
    block_size: int = 16
    host: str = "127.0.0.1"
    port: int = 0
    heartbeat_interval_ms: int = 500

    def __post_init__(self):
        if self.stages < 1 or self.replicas < 1:
            raise ValueError("stages and replicas must be >= 1")
        if self.num_layers < self.stages:
            raise ValueError(f"the model has {self.num_layers} layers, fewer than --stages {self.stages}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
