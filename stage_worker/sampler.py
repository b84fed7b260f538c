"""Token sampling on the last stage: greedy, or temperature + top-k + top-p with per-request seeds.

Reproducibility is the point of the seed: a seeded draw depends only on (seed, output_index) and
the row's logits, never on the row's position in the micro-batch or on other requests, so a
sequence replayed after a fault (or scheduled with different neighbours) gets the same tokens.
Filtering follows transformers' TopKLogitsWarper / TopPLogitsWarper, in that order after scaling.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

from stagemesh.sampling import SamplingSpec

_PROCESS_GEN = torch.Generator().manual_seed(secrets.randbits(63))


def draw_seed(seed: int, output_index: int) -> int:
    """A stable 63-bit generator seed from (request seed, index of the token in the output)."""
    data = int(seed).to_bytes(16, "little", signed=True) + int(output_index).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def sample(logits: torch.Tensor, params: list[SamplingSpec], output_indices: list[int]) -> list[int]:
    """logits: [S, V] float32 -> one token id per row.

    output_indices[i] is how many tokens row i's sequence has generated so far (0 for the
    first), which with its seed determines the draw.
    """
    if not (logits.shape[0] == len(params) == len(output_indices)):
        raise ValueError(f"{logits.shape[0]} logits rows, {len(params)} specs, "
                         f"{len(output_indices)} output indices")
    out = [0] * len(params)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        ids = torch.argmax(logits[greedy_rows], dim=-1).tolist()  # ties -> first, as HF
        for row, tok in zip(greedy_rows, ids):
            out[row] = tok
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = _sample_row(logits[i], p, output_indices[i])
    return out


def filter_logits(row: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """row: [V] -> [V] scaled by temperature, with filtered-out tokens at -inf."""
    row = row.float() / spec.temperature
    if 0 < spec.top_k < row.shape[-1]:
        kth = torch.topk(row, spec.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if 0 < spec.top_p < 1:
        sorted_logits, sorted_idx = torch.sort(row, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - spec.top_p)
        remove[-1] = False  # always keep the most likely token
        row = row.masked_fill(remove.scatter(0, sorted_idx, remove), float("-inf"))
    return row


def _sample_row(row: torch.Tensor, spec: SamplingSpec, output_index: int) -> int:
    # On the CPU so a seeded draw is the same whichever device computed the logits.
    probs = filter_logits(row.detach().cpu(), spec).softmax(-1)  # [V]
    if spec.seed is None:
        gen = _PROCESS_GEN
    else:
        gen = torch.Generator().manual_seed(draw_seed(spec.seed, output_index))
    return int(torch.multinomial(probs, 1, generator=gen).item())
