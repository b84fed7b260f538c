"""The online-softmax step over one block of keys, shared by paged_decode and unified_attention.

Flash attention's running form: for query rows q [M, D] and keys t [N] of one sequence, read the
keys' K/V through the block table, score them, and fold them into the running max m [M], sum
l [M] and unnormalised output acc [M, D] (all float32). `see` [M, N] or [1, N] masks the keys a
row may not attend to (causality, a sliding window); a row that sees no key of a block leaves
its state unchanged (its max stays -inf until it sees one, and nothing is divided by it), so a
window may start mid-block. With SOFTCAP the scaled scores are capped as Gemma 2's
`softcap * tanh(score / softcap)` before the mask. Inlined by Triton into each caller.

`attention_torch` is the torch reference of the whole attention these steps compute (masked,
optionally soft-capped), which the kernels' references and the CPU path call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:

    @triton.jit
    def online_softmax_block(q, K, V, BT_row, t, in_ctx, see, kv_head_off, s_kn, d, m_i, l_i, acc, scale,
                             softcap, BLOCK_SIZE: tl.constexpr, SOFTCAP: tl.constexpr):
        """q: [M, D]; t: [N] key positions; in_ctx: [N] keys that exist; BT_row: the sequence's
        block-table row; kv_head_off: the KV head's offset in a slot; softcap: the cap when
        SOFTCAP -> (m_i, l_i, acc) updated."""
        blk = tl.load(BT_row + t // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + (t % BLOCK_SIZE)
        kv_off = slot[:, None] * s_kn + kv_head_off + d[None, :]
        k = tl.load(K + kv_off, mask=in_ctx[:, None], other=0.0).to(q.dtype)  # [N, D] (FP8 pools: upcast)
        v = tl.load(V + kv_off, mask=in_ctx[:, None], other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k)) * scale  # [M, N] fp32
        if SOFTCAP:  # softcap * tanh(qk / softcap); tanh(x) = 1 - 2 / (exp(2x) + 1) (Triton has no tanh)
            qk = softcap * (1.0 - 2.0 / (tl.exp(tl.minimum(tl.maximum(2.0 * qk / softcap, -40.0), 40.0)) + 1.0))
        qk = tl.where(see, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: exp(-inf) = 0, no NaN
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc
else:  # pragma: no cover - depends on the install
    online_softmax_block = None  # the kernels that call it are not defined either


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, softcap: float | None = None) -> torch.Tensor:
    """q: [B, Hq, n, D]; k, v: [B, Hkv, L, D]; mask: [B or 1, 1, n, L] bool (True: visible) or None
    (causal, the n queries being the last n of the L keys) -> [B, Hq, n, D].

    Without softcap, SDPA (grouped KV heads). With it, transformers' eager formula (Gemma 2):
    scores * scale, capped as softcap * tanh(scores / softcap), masked, softmax in float32.
    """
    gqa = q.shape[1] != k.shape[1]
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, n, L]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        n, length = q.shape[2], k.shape[2]
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
