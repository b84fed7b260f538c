"""Layer partitioning: which contiguous layer range each stage serves. Pure functions.

Uniform for now; the measured, memory-aware planner replaces `partition_uniform` as the default
once workers report profiles.
"""

from __future__ import annotations


def partition_uniform(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges whose sizes differ by at most one (earlier stages larger).

    The last stage also runs the LM head, so when the split is uneven the extra layers go first.
    """
    if num_stages <= 0 or num_layers < num_stages:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        size = base + (1 if i < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges
