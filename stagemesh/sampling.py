"""Per-request sampling parameters, shared by the gateway (which validates and sends them) and the
last stage (which samples with them). Pure Python: the gateway imports no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSpec:
    """Per-request sampling; temperature 0 = greedy, top_p 0 or 1 = off, top_k 0 = off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0 or not 0 <= self.top_p <= 1 or self.top_k < 0:  # NaN fails too
            raise ValueError(f"invalid sampling parameters {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
