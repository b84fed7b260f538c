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
        specs = [rows[i].spec for i in drawn]
        index = torch.tensor(drawn, device=x.device)
        y = x.index_select(0, index)
        y = _warp(y, specs)
        x.index_copy_(0, index, y)
    return x


def _scatter_rows(x: torch.Tensor, pairs: list[tuple[int, int]], values, accumulate: bool) -> None:
    if not pairs:
        return
    r, t = torch.tensor(pairs, device=x.device).T
    vals = torch.as_tensor(values, dtype=x.dtype, device=x.device).expand(len(pairs))
    x.index_put_((r, t), vals, accumulate=accumulate)


def _mask_stop_tokens(x: torch.Tensor, rows: list[Row]) -> None:
    """min_tokens: the stop tokens (EOS included, sent by the gateway) cannot come yet."""
    pairs = [(i, t) for i, r in enumerate(rows) if r.output_index < r.spec.min_tokens
             for t in r.spec.stop_token_ids if t < x.shape[1]]
    _scatter_rows(x, pairs, float("-inf"), accumulate=False)


def _add_logit_bias(x: torch.Tensor, rows: list[Row]) -> None:
    pairs, values = [], []
    for i, r in enumerate(rows):
        for t, b in r.spec.logit_bias:
            if t < x.shape[1]:
                pairs.append((i, t))
                values.append(b)
    _scatter_rows(x, pairs, values, accumulate=True)


def _penalize(x: torch.Tensor, rows: list[Row]) -> None:
    """Repetition (tokens of prompt or output), then frequency and presence (output only)."""
    which = [i for i, r in enumerate(rows) if r.spec.needs_history]
    if not which:
        return
    V = x.shape[1]
    hists = [(rows[i].history or [])[: rows[i].num_prompt + rows[i].output_index] for i in which]
    width = max(1, max(len(h) for h in hists))
    ids = torch.full((len(which), width), V, dtype=torch.long)  # padding: the spare column V
    is_out = torch.zeros((len(which), width), dtype=torch.bool)
    for j, (i, h) in enumerate(zip(which, hists)):
        ids[j, : len(h)] = torch.tensor(h, dtype=torch.long)
        is_out[j, rows[i].num_prompt : len(h)] = True
    ids, is_out = ids.to(x.device), is_out.to(x.device)
    counts = torch.zeros((len(which), V + 1), dtype=x.dtype, device=x.device)
    counts.scatter_add_(1, ids.masked_fill(~is_out, V), torch.ones_like(ids, dtype=x.dtype))
    seen = torch.zeros((len(which), V + 1), dtype=torch.bool, device=x.device)
    seen.scatter_(1, ids, True)
    counts, seen = counts[:, :V], seen[:, :V]
    specs = [rows[i].spec for i in which]
    rep = torch.tensor([[s.repetition_penalty] for s in specs], dtype=x.dtype, device=x.device)
    freq = torch.tensor([[s.frequency_penalty] for s in specs], dtype=x.dtype, device=x.device)
    pres = torch.tensor([[s.presence_penalty] for s in specs], dtype=x.dtype, device=x.device)
    index = torch.tensor(which, device=x.device)
    y = x.index_select(0, index)
    y = torch.where(seen, torch.where(y < 0, y * rep, y / rep), y)
    y = y - freq * counts - pres * (counts > 0).to(x.dtype)
    x.index_copy_(0, index, y)


def _warp(y: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """Rows that draw: temperature, then top-k, top-p, min-p (transformers' warper order)."""
    V = y.shape[1]
    y = y / torch.tensor([[s.temperature] for s in specs], dtype=y.dtype, device=y.device)
    ks = [s.top_k if 0 < s.top_k < V else V for s in specs]
    if any(k < V for k in ks):
        kth = torch.sort(y, dim=-1, descending=True).values.gather(
            1, torch.tensor([[k - 1] for k in ks], device=y.device))  # [D, 1]
        y = y.masked_fill(y < kth, float("-inf"))
    ps = [s.top_p if 0 < s.top_p < 1 else 1.0 for s in specs]
    if any(p < 1 for p in ps):
        sorted_logits, sorted_idx = torch.sort(y, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - torch.tensor([[p] for p in ps], dtype=y.dtype, device=y.device))
        remove[:, -1] = False  # always keep the most likely token
        y = y.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    mps = [s.min_p for s in specs]
    if any(m > 0 for m in mps):
        probs = y.softmax(-1)
        threshold = torch.tensor([[m] for m in mps], dtype=y.dtype, device=y.device) * probs.amax(-1, keepdim=True)
        y = y.masked_fill(probs < threshold, float("-inf"))
    return y


def filter_logits(row: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """row: [V] -> [V] scaled by temperature, with filtered-out tokens at -inf (one drawing row)."""
    return _warp(row.float()[None], [spec])[0]
