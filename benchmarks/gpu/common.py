"""What every GPU benchmark part shares: a timestamped log, the model's token space, workloads."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


@dataclass(frozen=True)
class Vocab:
    """Token ids prompts are drawn from, and the longest prompt the model takes."""

    size: int = 128256  # Llama-3.1
    max_positions: int = 131072

    @classmethod
    def of(cls, model_dir: Path) -> "Vocab":
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return cls(cfg["vocab_size"], cfg["max_position_embeddings"])


def rand_prompt(n: int, seed: int, vocab: Vocab = Vocab()) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab.size) for _ in range(n)]


def mixed_workload(n: int = 256, seed: int = 0, vocab: Vocab = Vocab()) -> list[tuple[list[int], int]]:
    """BENCHMARKS.md "mixed": prompts uniform [64, 1024), outputs uniform [32, 256), fixed seed
    (mixed_workload(64) is the first 64 requests of mixed_workload(256))."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plen, olen = rng.randrange(64, 1024), rng.randrange(32, 256)
        out.append(([rng.randrange(3, vocab.size) for _ in range(plen)], olen))
    return out
