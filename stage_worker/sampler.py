"""Token sampling on the last stage, batched over the rows of a micro-batch.

`sample_rows(logits, rows, bias)` turns the logits of the rows to sample ([S, V]) into one token
each, with vLLM's sampling parameters applied as tensor ops over all rows at once, in vLLM's
order: an additive `bias` ([S, V], e.g. a grammar's token mask with -inf for forbidden tokens,
applied first), min_tokens (stop tokens masked), logit_bias, the repetition, frequency and
presence penalties, then temperature, top-k, top-p and min-p, each as the transformers logits
processor of that name does it (RepetitionPenaltyLogitsProcessor, MinNewTokensLengthLogitsProcessor,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper). Greedy rows take the arg-max of the
processed logits; the others draw from their softmax.

Log-probabilities (`logprobs`) come from the raw logits, before any processing (vLLM's default):
the chosen token's and the top k.

Reproducibility is the point of the seed: a seeded draw depends only on (seed, output_index) and
the row's logits, never on the row's position in the micro-batch or on other requests, so a
sequence replayed after a fault (or scheduled with different neighbours) gets the same tokens.
The draws are the one per-row loop: each seeded row has its own generator.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import torch

from stagemesh.sampling import SamplingSpec

_PROCESS_GEN = torch.Generator().manual_seed(secrets.randbits(63))


def draw_seed(seed: int, output_index: int) -> int:
    """A stable 63-bit generator seed from (request seed, index of the token in the output)."""
    data = int(seed).to_bytes(16, "little", signed=True) + int(output_index).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@dataclass
class Row:
    """One row to sample: its sequence's spec, the index of the token it draws in the output, and
    (penalties only) the sequence's tokens so far, the first `num_prompt` of them the prompt."""

    spec: SamplingSpec
    output_index: int = 0
    history: list[int] | None = None
    num_prompt: int = 0


@dataclass
class TokenLogprobs:
    """A token's log-probability and the top alternatives at its position (plain data)."""

    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class Drawn:
    tokens: list[int]
    logprobs: list[TokenLogprobs | None]  # per row; None where the spec asks for none


def sample(logits: torch.Tensor, params: list[SamplingSpec], output_indices: list[int]) -> list[int]:
    """logits: [S, V] -> one token id per row (no penalties' history, no bias)."""
    if not (logits.shape[0] == len(params) == len(output_indices)):
        raise ValueError(f"{logits.shape[0]} logits rows, {len(params)} specs, "
                         f"{len(output_indices)} output indices")
    return sample_rows(logits, [Row(p, i) for p, i in zip(params, output_indices)]).tokens


def sample_rows(logits: torch.Tensor, rows: list[Row], bias: torch.Tensor | None = None) -> Drawn:
    """logits: [S, V] float32 (raw), rows: S; bias: [S, V] added first, or None."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} rows")
    x = process_logits(logits, rows, bias)  # [S, V]
    tokens = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.spec.greedy]
    if greedy:
        ids = torch.argmax(x[greedy], dim=-1).tolist()  # ties -> first, as HF
        for i, tok in zip(greedy, ids):
            tokens[i] = tok
    drawn = [i for i, r in enumerate(rows) if not r.spec.greedy]
    if drawn:
        # On the CPU so a seeded draw is the same whichever device computed the logits.
        probs = x[drawn].cpu().softmax(-1)  # [D, V]
        for j, i in enumerate(drawn):
            tokens[i] = _draw(probs[j], rows[i])
    return Drawn(tokens, logprobs_of(logits, tokens, [r.spec.logprobs for r in rows]))


def _draw(probs: torch.Tensor, row: Row) -> int:
    seed = row.spec.seed
    gen = _PROCESS_GEN if seed is None else torch.Generator().manual_seed(draw_seed(seed, row.output_index))
    return int(torch.multinomial(probs, 1, generator=gen).item())


def logprobs_of(logits: torch.Tensor, token_ids: list[int], ks: list[int | None]) -> list[TokenLogprobs | None]:
    """logits: [S, V] raw; the log-probability of token_ids[i] under row i and its top ks[i]
    (None: no entry for that row)."""
    want = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprobs | None] = [None] * len(ks)
    if not want:
        return out
    lp = torch.log_softmax(logits[want].float(), dim=-1)  # [W, V]
    chosen = lp.gather(1, torch.tensor([[token_ids[i]] for i in want], device=lp.device))[:, 0].tolist()
    kmax = max(ks[i] for i in want)
    top_v, top_i = (lp.topk(kmax, dim=-1) if kmax else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(want):
        k = ks[i]
        out[i] = TokenLogprobs(token_ids[i], chosen[j], top_i[j][:k], top_v[j][:k])
    return out


# -- logits processing, batched ------------------------------------------------------------------
# Each step is a few tensor ops over the rows it concerns (in place when that is every row), and
# the penalties touch only the histories' positions ([rows, history], gathered and scattered), not
# [rows, vocab] count tables.


def process_logits(logits: torch.Tensor, rows: list[Row], bias: torch.Tensor | None = None) -> torch.Tensor:
    """[S, V] raw -> [S, V] processed (a new tensor): bias, min_tokens, logit_bias, penalties;
    then, for the rows that draw, temperature, top-k, top-p and min-p."""
    x = logits.float().clone()
    if bias is not None:
        x += bias.to(x.device, x.dtype)
    _mask_stop_tokens(x, rows)
    _add_logit_bias(x, rows)
    _penalize(x, rows)
    drawn = [i for i, r in enumerate(rows) if not r.spec.greedy]
    if drawn:
        _in_rows(x, drawn, lambda y: _warp(y, [rows[i].spec for i in drawn]))
    return x


def _in_rows(x: torch.Tensor, which: list[int], fn) -> None:
    """x[which] = fn(x[which]): in place on x itself when `which` is every row."""
    if len(which) == x.shape[0]:
        y = fn(x)
        if y is not x:
            x.copy_(y)
        return
    index = torch.tensor(which, device=x.device)
    x.index_copy_(0, index, fn(x.index_select(0, index)))


def _column(values, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([[v] for v in values], dtype=x.dtype, device=x.device)  # [R, 1]


def _scatter_rows(x: torch.Tensor, pairs: list[tuple[int, int]], values, accumulate: bool) -> None:
    if not pairs:
        return
    r, t = torch.tensor(pairs, device=x.device).T
    vals = torch.as_tensor(values, dtype=x.dtype, device=x.device).expand(len(pairs))
    x.index_put_((r, t), vals, accumulate=accumulate)


def _mask_stop_tokens(x: torch.Tensor, rows: list[Row]) -> None:
    """min_tokens: the stop tokens (EOS included, sent by the gateway) cannot come yet.

    Except where a grammar allows nothing else (its answer is complete): masking them would leave
    no token at all, so that row keeps them and the sequence ends short of min_tokens, as vLLM
    lets a terminal grammar stop under min_tokens (its PR #54218)."""
    pairs = [(i, t) for i, r in enumerate(rows) if r.output_index < r.spec.min_tokens
             for t in r.spec.stop_token_ids if t < x.shape[1]]
    constrained = sorted({i for i, _ in pairs if rows[i].spec.grammar is not None})
    kept = x[constrained] if constrained else None  # [C, V] (a copy), before the mask
    _scatter_rows(x, pairs, float("-inf"), accumulate=False)
    if constrained:
        index = torch.tensor(constrained, device=x.device)
        masked = x.index_select(0, index)
        empty = torch.isneginf(masked).all(dim=1, keepdim=True)  # no sync: chosen per row on the device
        x.index_copy_(0, index, torch.where(empty, kept, masked))


def _add_logit_bias(x: torch.Tensor, rows: list[Row]) -> None:
    pairs, values = [], []
    for i, r in enumerate(rows):
        for t, b in r.spec.logit_bias:
            if t < x.shape[1]:
                pairs.append((i, t))
                values.append(b)
    _scatter_rows(x, pairs, values, accumulate=True)


def _padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, L] ids (padding repeats each row's first id: gathering and scattering it twice is
    harmless) and [R, L] True where real."""
    width = max(len(h) for h in seqs)
    ids = torch.tensor([h + [h[0]] * (width - len(h)) for h in seqs], dtype=torch.long)
    real = torch.arange(width)[None, :] < torch.tensor([[len(h)] for h in seqs])
    return ids.to(device), real.to(device)


def _penalize(x: torch.Tensor, rows: list[Row]) -> None:
    """Repetition over the tokens of prompt and output (transformers: gather, scale, scatter back),
    then frequency (once per occurrence) and presence (once per distinct token) over the output."""
    hist = {i: (r.history or [])[: r.num_prompt + r.output_index] for i, r in enumerate(rows)
            if r.spec.needs_history}
    rep = [i for i, h in hist.items() if h and rows[i].spec.repetition_penalty != 1.0]
    if rep:
        ids, _ = _padded([hist[i] for i in rep], x.device)
        index = torch.tensor(rep, device=x.device)
        y = x.index_select(0, index)
        score = y.gather(1, ids)
        p = _column([rows[i].spec.repetition_penalty for i in rep], x)
        x.index_copy_(0, index, y.scatter(1, ids, torch.where(score < 0, score * p, score / p)))
    outs = {i: h[rows[i].num_prompt :] for i, h in hist.items()}
    pen = [i for i, o in outs.items() if o and (rows[i].spec.frequency_penalty or rows[i].spec.presence_penalty)]
    if not pen:
        return
    ids, real = _padded([outs[i] for i in pen], x.device)
    # Sorted per row, equal ids sit in runs; each run holds at least one real entry (padding only
    # repeats a real id), so its first entry stands for the distinct token (presence).
    ids, order = ids.sort(dim=1)
    real = real.gather(1, order)
    first = torch.ones_like(real)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    freq = _column([rows[i].spec.frequency_penalty for i in pen], x)
    pres = _column([rows[i].spec.presence_penalty for i in pen], x)
    delta = -freq * real - pres * first  # [R, L]
    rows_index = torch.tensor(pen, device=x.device)[:, None].expand_as(ids)
    x.index_put_((rows_index.reshape(-1), ids.reshape(-1)), delta.reshape(-1), accumulate=True)


def _warp(y: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """Rows that draw: temperature, then top-k, top-p, min-p (transformers' warper order), in place."""
    V = y.shape[1]
    y.div_(_column([s.temperature for s in specs], y))
    ks = [s.top_k if 0 < s.top_k < V else V for s in specs]
    limited = [i for i, k in enumerate(ks) if k < V]
    if limited:
        def top_k(sub):
            top = sub.topk(max(ks[i] for i in limited), dim=-1).values  # not a full sort: k is small
            kth = top.gather(1, torch.tensor([[ks[i] - 1] for i in limited], device=y.device))  # [L, 1]
            return sub.masked_fill_(sub < kth, float("-inf"))
        _in_rows(y, limited, top_k)
    ps = [s.top_p if 0 < s.top_p < 1 else 1.0 for s in specs]
    nucleus = [i for i, p in enumerate(ps) if p < 1]
    if nucleus:
        def top_p(sub):
            sorted_logits, sorted_idx = torch.sort(sub, dim=-1, descending=False)
            remove = sorted_logits.softmax(-1).cumsum_(-1) <= (1 - _column([ps[i] for i in nucleus], sub))
            remove[:, -1] = False  # always keep the most likely token
            return sub.masked_fill_(remove.scatter(1, sorted_idx, remove), float("-inf"))
        _in_rows(y, nucleus, top_p)
    floor = [i for i, s in enumerate(specs) if s.min_p > 0]
    if floor:
        def min_p(sub):
            probs = sub.softmax(-1)
            threshold = _column([specs[i].min_p for i in floor], sub) * probs.amax(-1, keepdim=True)
            return sub.masked_fill_(probs < threshold, float("-inf"))
        _in_rows(y, floor, min_p)
    return y
