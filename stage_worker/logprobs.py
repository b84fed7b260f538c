"""Prompt log-probabilities on the last stage, and the wire form of what sampling returns.

A sequence that asks for `prompt_logprobs` (echo with logprobs) gets, for each prompt token from
the second on, its log-probability under the model's raw distribution at the position before it,
and the top k there. A prefill chunk covering positions [start, start + n) has, in its rows, the
logits predicting the tokens at start + 1 .. start + n; those that are prompt tokens (the
sequence's history, sent with it) are scored here. The gateway computes such a prompt in full
(no cached prefix), so every position passes through a chunk once.

`plan` runs at launch (the hidden states of a graph route are a view valid until the next
run): the logits of those rows are computed and reduced on the device, in slices so that a long
prompt never holds [T, V] logits at once; `collect` turns them into plain data in finish.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagemesh.v1 import stagemesh_pb2 as pb

from stage_worker.sampler import TokenLogprobs

SLICE_ROWS = 256  # rows of logits computed at once ([SLICE_ROWS, V] float32)


@dataclass
class PromptScores:
    """The reduced logits of one chunk's prompt rows, on the device until `collect`."""

    seq_id: int
    start_pos: int  # position of the token the first entry is about
    targets: list[int]
    chosen: torch.Tensor  # [R]
    top_v: torch.Tensor  # [R, k]
    top_i: torch.Tensor  # [R, k]


def plan(model, out: torch.Tensor, step, states: dict, one_row_per_chunk: bool) -> list[PromptScores]:
    """Score the prompt tokens that the rows of `out` ([T, H], or [B, H] with one row per chunk)
    predict, for chunks whose sequence (states: seq_id -> SeqState) asks for prompt logprobs."""
    scores = []
    for i, c in enumerate(step.chunks):
        st = states.get(c.seq_id)
        if st is None or st.sampling.prompt_logprobs is None:
            continue
        last = min(c.start_pos + c.num_tokens - 1, st.num_prompt - 2)  # a row at p predicts p + 1 < P
        if last < c.start_pos:
            continue
        base = i if one_row_per_chunk else c.row
        count = last - c.start_pos + 1
        targets = st.history[c.start_pos + 1 : last + 2]
        scores.append(_score(model, out, base, count, targets, st.sampling.prompt_logprobs, c))
    return scores


def _score(model, out, base: int, count: int, targets: list[int], k: int, c) -> PromptScores:
    chosen, top_v, top_i = [], [], []
    target = torch.tensor(targets, device=out.device)
    for lo in range(0, count, SLICE_ROWS):
        hi = min(count, lo + SLICE_ROWS)
        logits = model.compute_logits(out[base + lo : base + hi])  # [r, V] float32
        lp = torch.log_softmax(logits, dim=-1)
        chosen.append(lp.gather(1, target[lo:hi, None])[:, 0])
        v, ix = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_v.append(v)
        top_i.append(ix)
    return PromptScores(c.seq_id, c.start_pos + 1, targets, torch.cat(chosen), torch.cat(top_v), torch.cat(top_i))


def collect(scores: list[PromptScores]) -> list[tuple[int, int, list[TokenLogprobs]]]:
    """(seq_id, start_pos, one entry per token) of each scored chunk, on the host."""
    out = []
    for s in scores:
        chosen, top_v, top_i = s.chosen.tolist(), s.top_v.tolist(), s.top_i.tolist()
        out.append((s.seq_id, s.start_pos, [TokenLogprobs(t, c, i, v)
                                            for t, c, i, v in zip(s.targets, chosen, top_i, top_v)]))
    return out


def to_pb(lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_token_ids=lp.top_ids,
                           top_logprobs=lp.top_logprobs)


def forward_response(out) -> pb.ForwardResponse:
    """The last stage's answer to a step (out: the executor's StepOutput)."""
    resp = pb.ForwardResponse(stage_compute_us=[out.compute_us])
    for (seq_id, token), lp in zip(out.samples, out.logprobs or [None] * len(out.samples)):
        s = resp.samples.add(seq_id=seq_id, token_id=token)
        if lp is not None:
            s.logprob.CopyFrom(to_pb(lp))
    for seq_id, start_pos, entries in out.prompt_logprobs:
        resp.prompt_logprobs.add(seq_id=seq_id, start_pos=start_pos, logprobs=[to_pb(e) for e in entries])
    return resp
