"""MoE routing in one launch: router logits [T, E] -> (weights [T, k] float32, ids [T, k] int64).

The CUDA path of models/moe.py `Router`: `route` there is the reference and the CPU path, about
fifteen small torch kernels per layer (scores, bias, group scores, group top-k, mask, top-k,
gather, normalisation, scaling), which bound a small decode batch replayed from a CUDA graph by
launches. Here one program per token holds its E (<= a few hundred) scores in registers:

  logits row --sigmoid | softmax--> scores [E]
             --(noaux_tc: + correction bias)--> choice [E]
             --(grouped: group score = max, or top-2 sum for noaux_tc; keep the top `topk_group`
                groups; other experts' choice -> 0.0, or -inf for noaux_tc)-->
             --k times: arg-max of choice over experts not yet taken--> ids, weights = scores[ids]
             --(norm_topk_prob and k > 1: / (sum + norm_eps)), * routed scaling--> weights

It picks the experts `route` picks and returns its weights up to float32 rounding (the sum for
the normalisation adds in a tree, not torch's order; the GPU's exp is not the CPU's). The ids come
in descending order of choice (torch.topk's order for `sorted_topk`; with sorted=False torch's
order is unspecified, and the pairs (weight, id) are the same). Ties (equal choice values, e.g.
the 0.0 / -inf of masked experts when k exceeds the experts of the kept groups) go to the lowest
expert (or group) index; torch.topk does not specify its tie order either.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU-only installs never import it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

METHOD_CODES = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}


def fused_route(logits: torch.Tensor, spec, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype, read as float32); spec: models/moe.py's RouterSpec; bias:
    the noaux_tc correction bias [E] -> (weights [T, k] float32, ids [T, k] int64). One launch,
    no host sync (CUDA-graph capturable); T == 0 launches nothing."""
    t, e = logits.shape
    k = spec.top_k
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    if t == 0:
        return weights, ids
    method = METHOD_CODES[spec.topk_method]
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    _route_kernel[(t,)](
        logits, bias if method == 2 else logits, weights, ids, logits.stride(0), spec.norm_eps, spec.scaling,
        E=e, TOP_K=k, SIGMOID=spec.scoring == "sigmoid", METHOD=method, N_GROUP=spec.n_group,
        TOPK_GROUP=spec.topk_group, RENORM=spec.norm_topk_prob and k > 1,
        # blocks of at least two lanes: one-element blocks are an edge case of Triton's layouts
        E_PAD=max(2, triton.next_power_of_2(e)), K_PAD=max(2, triton.next_power_of_2(k)),
        G_PAD=max(2, triton.next_power_of_2(spec.n_group)), num_warps=1)
    return weights, ids


if triton is not None:
    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_t, norm_eps, scaling,
                      E: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr, METHOD: tl.constexpr,
                      N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr,
                      E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, E_PAD)
        valid = experts < E
        logits = tl.load(logits_ptr + t * stride_t + experts, mask=valid, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            scores = tl.math.div_rn(1.0, 1.0 + tl.exp(-logits))
        else:
            p = tl.exp(logits - tl.max(logits, axis=0))  # padding lanes -> 0
            scores = tl.math.div_rn(p, tl.sum(p, axis=0))
        choice = scores
        if METHOD == 2:  # the bias picks experts, never weighs them
            choice = scores + tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32)
        # A NaN row (overflowed activations) equals no `best`: every pick below would be the
        # E_PAD sentinel, an expert id out of range that the expert GEMMs then read. As -inf it
        # picks open experts in order instead: valid ids, NaN weights, only that token's output lost.
        choice = tl.where(choice == choice, choice, float("-inf"))
        if METHOD != 0:
            groups = tl.arange(0, G_PAD)
            member = ((experts // (E // N_GROUP))[None, :] == groups[:, None]) & valid[None, :]  # [G_PAD, E_PAD]
            in_group = tl.where(member, choice[None, :], float("-inf"))
            group_score = tl.max(in_group, axis=1)  # [G_PAD]
            if METHOD == 2:  # + the group's second largest (topk(2).sum: a repeated maximum counts twice)
                first = tl.min(tl.where(in_group == group_score[:, None], experts[None, :], E_PAD), axis=1)
                group_score += tl.max(tl.where(experts[None, :] == first[:, None], float("-inf"), in_group), axis=1)
            open_groups = groups < N_GROUP
            kept = groups < 0
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.max(tl.where(open_groups, group_score, float("-inf")), axis=0)
                pick = tl.min(tl.where(open_groups & (group_score == best), groups, G_PAD), axis=0)
                kept = kept | (groups == pick)
                open_groups = open_groups & (groups != pick)
            kept_expert = tl.max((member & kept[:, None]).to(tl.int32), axis=0) > 0  # [E_PAD]
            if METHOD == 2:
                choice = tl.where(kept_expert, choice, float("-inf"))
            else:
                choice = tl.where(kept_expert, choice, 0.0)
        slots = tl.arange(0, K_PAD)
        top_w = tl.zeros((K_PAD,), dtype=tl.float32)
        top_id = tl.zeros((K_PAD,), dtype=tl.int64)
        open_experts = valid
        for j in tl.static_range(TOP_K):
            best = tl.max(tl.where(open_experts, choice, float("-inf")), axis=0)
            pick = tl.min(tl.where(open_experts & (choice == best), experts, E_PAD), axis=0)
            top_w = tl.where(slots == j, tl.sum(tl.where(experts == pick, scores, 0.0), axis=0), top_w)
            top_id = tl.where(slots == j, pick.to(tl.int64), top_id)
            open_experts = open_experts & (experts != pick)
        if RENORM:  # padding slots hold 0
            top_w = tl.math.div_rn(top_w, tl.sum(top_w, axis=0) + norm_eps)
        top_w = top_w * scaling  # route skips a scaling of 1.0: the same values
        out = t * TOP_K + slots
        tl.store(weights_ptr + out, top_w, mask=slots < TOP_K)
        tl.store(ids_ptr + out, top_id, mask=slots < TOP_K)
