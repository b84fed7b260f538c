"""The online-softmax step over one block of keys, shared by paged_decode and unified_attention.

Flash attention's running form: for query rows q [M, D] and keys t [N] of one sequence, read the
keys' K/V through the block table, score them, and fold them into the running max m [M], sum
l [M] and unnormalised output acc [M, D] (all float32). `see` [M, N] or [1, N] masks the keys a
row may not attend to; at least one key per row must be visible in every call (both callers
guarantee it), so m stays finite. Inlined by Triton into each caller: the code the GPU runs is
what each kernel had inline before.
"""

from __future__ import annotations

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:

    @triton.jit
    def online_softmax_block(q, K, V, BT_row, t, in_ctx, see, kv_head_off, s_kn, d, m_i, l_i, acc, scale,
                             BLOCK_SIZE: tl.constexpr):
        """q: [M, D]; t: [N] key positions; in_ctx: [N] keys that exist; BT_row: the sequence's
        block-table row; kv_head_off: the KV head's offset in a slot -> (m_i, l_i, acc) updated."""
        blk = tl.load(BT_row + t // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + (t % BLOCK_SIZE)
        kv_off = slot[:, None] * s_kn + kv_head_off + d[None, :]
        k = tl.load(K + kv_off, mask=in_ctx[:, None], other=0.0)  # [N, D]
        v = tl.load(V + kv_off, mask=in_ctx[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale  # [M, N] fp32
        qk = tl.where(see, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc
else:  # pragma: no cover - depends on the install
    online_softmax_block = None  # the kernels that call it are not defined either
