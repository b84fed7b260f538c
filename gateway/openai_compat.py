"""OpenAI's request fields beyond the basics, and the gateway's deltas as OpenAI's answers.

Request side (`extra_fields`, `apply_extra_fields`): vLLM's sampling extras (min_p,
repetition/presence/frequency penalties, min_tokens, logit_bias, stop_token_ids), `n` and
`best_of`, `logprobs` (completions: an int k; chat: `logprobs` + `top_logprobs`) and `echo`
(completions: the prompt before the completion; with logprobs, its log-probabilities too).

Answer side: a request is one `Job` per prompt (completions take a list of prompts), each a
GenerateRequest with `n` samples. Choice i*n + j is sample j of prompt i (vLLM's numbering).
`best_of` draws best_of samples and keeps the n with the highest cumulative log-probability
(vLLM's V0 semantics); it cannot be streamed. Streams interleave the choices' deltas as they
come, each chunk naming its choice; `usage` sums over prompts and samples, prompt tokens once per
prompt.

Everything here runs on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from stagemesh.errors import StagemeshError
from stagemesh.finish import finish_text
from stagemesh.v1 import stagemesh_pb2 as pb

from gateway import validation


class Refused(Exception):
    """A request the OpenAI shape cannot express (http_api turns it into a 400 naming `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# --- request -----------------------------------------------------------------------------------


def extra_fields(req, kind: str) -> dict:
    """validation.Fields keyword arguments of the extras of an OpenAI body (pydantic model)."""
    if kind == "chat":
        if req.top_logprobs is not None and not req.logprobs:
            raise Refused("top_logprobs", "top_logprobs needs logprobs: true")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prompt_logprobs = None
    else:
        logprobs = req.logprobs
        prompt_logprobs = logprobs if req.echo and logprobs is not None else None
    n = 1 if req.n is None else req.n
    best_of = None if kind == "chat" else req.best_of  # a completions field (http_api refuses it on chat)
    if best_of is not None:
        if best_of < n:
            raise Refused("best_of", f"best_of ({best_of}) must be >= n ({n})")
        if req.stream and best_of > n:
            raise Refused("best_of", "best_of > n cannot be streamed (the best are known at the end)")
        n = best_of
        if logprobs is None and best_of > (req.n or 1):
            logprobs = 0  # ranking needs the chosen tokens' log-probabilities
    return dict(min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                min_tokens=req.min_tokens or 0, logit_bias=validation.parse_logit_bias(req.logit_bias),
                stop_token_ids=tuple(req.stop_token_ids or ()), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                n=n)


def apply_extra_fields(grpc_req: pb.GenerateRequest, f: validation.Fields) -> None:
    """The checked extras onto a GenerateRequest (validation.check_fields ran on them)."""
    sp = grpc_req.sampling
    sp.min_p, sp.presence_penalty, sp.frequency_penalty = f.min_p, f.presence_penalty, f.frequency_penalty
    sp.min_tokens = f.min_tokens
    sp.logit_bias.update(dict(f.logit_bias))
    sp.stop_token_ids.extend(f.stop_token_ids)
    if f.repetition_penalty is not None:
        sp.repetition_penalty = f.repetition_penalty
    if f.logprobs is not None:
        sp.logprobs = f.logprobs
    if f.prompt_logprobs is not None:
        sp.prompt_logprobs = f.prompt_logprobs
    if f.n != 1:
        grpc_req.n = f.n


@dataclass
class Job:
    """One prompt of a request: its GenerateRequest and, for echo, its text (None: decode its ids)."""

    request: pb.GenerateRequest
    prompt_text: str | None = None
    tools: object = None  # chat: gateway/tool_calls.ToolPlan (how the answer becomes tool_calls)


@dataclass(frozen=True)
class Shape:
    """How the choices are answered."""

    kind: str  # "text" | "chat"
    n: int  # choices per prompt returned
    samples: int  # samples drawn per prompt (best_of, else n)
    echo: bool = False
    logprobs: int | None = None  # what the user asked for (None: no logprobs in the answer)

    @classmethod
    def of(cls, req, kind: str) -> Shape:
        n = req.n or 1
        if kind == "chat":
            return cls(kind, n, n, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        return cls(kind, n, max(n, req.best_of or 1), bool(req.echo), req.logprobs)


# --- answers -----------------------------------------------------------------------------------


class TokenText:
    """Token id -> its text, as OpenAI's logprobs show tokens (memoised)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = (self.tokenizer.decode([token_id], skip_special_tokens=False)
                                            if self.tokenizer is not None else f"<{token_id}>")
        return text

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""


@dataclass
class Choice:
    """One sample's deltas, gathered."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)  # pb.TokenLogprob per token
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    finish: str = ""
    usage: pb.Usage | None = None

    def add(self, msg: pb.GenerateResponse) -> None:
        self.token_ids.extend(msg.token_ids)
        self.text += msg.text
        self.logprobs.extend(msg.logprobs)
        if msg.prompt_token_ids:
            self.prompt_ids, self.prompt_logprobs = list(msg.prompt_token_ids), list(msg.prompt_logprobs)
        if msg.finish_reason:
            self.finish = finish_text(msg)
            self.usage = msg.usage

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


def _share_prompt_logprobs(samples: list[Choice], first: pb.GenerateResponse | None = None) -> None:
    """echo + logprobs with several samples: only sample 0 computes the prompt (the others fork
    its KV blocks), so only its answer carries the prompt's log-probabilities; they are the same
    for every sample, so each choice gets them (into `first`, a later sample's first delta, when
    streaming: sample 0's first delta comes before the others', from the step that forks them)."""
    source = next((c for c in samples if c.prompt_ids), None)
    if source is None:
        return
    if first is not None:
        first.prompt_token_ids.extend(source.prompt_ids)
        first.prompt_logprobs.extend(source.prompt_logprobs)
    for c in samples:
        if not c.prompt_ids:
            c.prompt_ids, c.prompt_logprobs = list(source.prompt_ids), list(source.prompt_logprobs)


def finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def pipeline_failed(msg) -> StagemeshError | None:
    if finish_text(msg).startswith("error:"):
        from stagemesh.errors import Unavailable

        return Unavailable(f"request {msg.request_id} failed in the pipeline ({finish_text(msg)})")
    return None


def completion_logprobs(tokens: TokenText, ids: list[int], entries: list, offset: int = 0,
                        first_is_none: bool = False) -> dict:
    """OpenAI's completions `logprobs` object for tokens `ids` (entries: pb.TokenLogprob each; with
    first_is_none, ids[0] is a prompt's first token, which has none)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    entries = ([None] if first_is_none else []) + list(entries)
    for token_id, e in zip(ids, entries):
        text = tokens(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(e.logprob)
        top = {tokens(t): lp for t, lp in zip(e.top_token_ids, e.top_logprobs)}
        top.setdefault(text, e.logprob)  # the chosen token is always there (OpenAI)
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokens: TokenText, ids: list[int], entries: list) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id: int, logprob: float) -> dict:
        text = tokens(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, e.logprob), "top_logprobs": [item(i, lp) for i, lp in
                                                                zip(e.top_token_ids, e.top_logprobs)]}
                        for t, e in zip(ids, entries)]}


def usage(per_prompt: list[list[Choice]]) -> dict:
    """Prompt tokens once per prompt, completion tokens of every sample drawn, cached tokens of
    each prompt's first sample (the one that may have found it cold)."""
    prompt = sum(c[0].usage.prompt_tokens for c in per_prompt if c and c[0].usage)
    completion = sum(ch.usage.completion_tokens for c in per_prompt for ch in c if ch.usage)
    cached = sum(c[0].usage.cached_tokens for c in per_prompt if c and c[0].usage)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Answer:
    """Builds the bodies of one request: final (collect) or streamed (events)."""

    def __init__(self, shape: Shape, model: str, tokens: TokenText, jobs: list[Job], include_usage: bool = False):
        self.shape, self.model, self.tokens, self.jobs = shape, model, tokens, jobs
        self.chat = shape.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if self.chat else "text_completion"
        self.created = int(time.time())
        self.include_usage = include_usage

    # -- final ---------------------------------------------------------------------------------
    def final(self, per_prompt: list[list[Choice]]) -> dict:
        choices = []
        for p, samples in enumerate(per_prompt):
            _share_prompt_logprobs(samples)
            kept = samples
            if self.shape.samples > self.shape.n:  # best_of: the n most likely
                kept = sorted(samples, key=lambda c: c.cumulative_logprob, reverse=True)[: self.shape.n]
            for j, c in enumerate(kept):
                choices.append(self._choice(p * self.shape.n + j, c, self.jobs[p]))
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(per_prompt)}

    def _choice(self, index: int, c: Choice, job: Job) -> dict:
        finish = finish_reason(c.finish)
        if self.chat:
            lp = chat_logprobs(self.tokens, c.token_ids, c.logprobs) if self.shape.logprobs is not None else None
            return {"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                    "finish_reason": finish}
        text, lp = c.text, None
        if self.shape.echo:
            text = self._prompt_text(job, c) + text
        if self.shape.logprobs is not None:
            if self.shape.echo and c.prompt_ids:
                prompt_lp = completion_logprobs(self.tokens, c.prompt_ids, c.prompt_logprobs, first_is_none=True)
                offset = sum(len(t) for t in prompt_lp["tokens"])
                rest = completion_logprobs(self.tokens, c.token_ids, c.logprobs, offset)
                lp = {k: prompt_lp[k] + rest[k] for k in prompt_lp}
            else:
                lp = completion_logprobs(self.tokens, c.token_ids, c.logprobs)
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    def _prompt_text(self, job: Job, c: Choice) -> str:
        if job.prompt_text is not None:
            return job.prompt_text
        return self.tokens.text(list(job.request.prompt_ids) or c.prompt_ids)

    # -- streamed ------------------------------------------------------------------------------
    def chunk(self, choices: list, usage_: dict | None = None) -> str:
        body = {"id": self.id, "object": self.object + ("" if not self.chat else ".chunk"), "created": self.created,
                "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage_
        return _json(body)

    def delta_choice(self, index: int, msg: pb.GenerateResponse, job: Job, first: bool) -> dict | None:
        """The chunk choice of one delta (None when it carries nothing to send)."""
        finish = finish_reason(finish_text(msg)) if msg.finish_reason else None
        has_lp = self.shape.logprobs is not None and msg.token_ids
        if not (msg.text or finish or has_lp or first):
            return None
        if self.chat:
            delta = {"content": msg.text} if msg.text else {}
            if first:
                delta = {"role": "assistant", "content": msg.text}
            lp = chat_logprobs(self.tokens, list(msg.token_ids), list(msg.logprobs)) if has_lp else None
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        text, lp = msg.text, None
        if first and self.shape.echo:
            text = self._prompt_text(job, Choice(prompt_ids=list(msg.prompt_token_ids))) + text
        if self.shape.logprobs is not None and (msg.token_ids or (first and self.shape.echo)):
            lp = completion_logprobs(self.tokens, list(msg.token_ids), list(msg.logprobs))
            if first and self.shape.echo and msg.prompt_token_ids:
                prompt_lp = completion_logprobs(self.tokens, list(msg.prompt_token_ids), list(msg.prompt_logprobs),
                                                first_is_none=True)
                lp = {k: prompt_lp[k] + lp[k] for k in lp}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

    async def events(self, streams: list):
        """SSE data of every choice of every prompt (streams: (deltas, first message) per job)."""
        per_prompt = [[Choice() for _ in range(self.shape.n)] for _ in self.jobs]
        started: set[int] = set()
        merged = merge([deltas for deltas, _ in streams], [first for _, first in streams])
        try:
            async for p, msg in merged:
                if (err := pipeline_failed(msg)) is not None:
                    yield _json({"error": {"message": str(err), "type": "server_error", "param": None,
                                           "code": "unavailable"}})
                    return
                index = p * self.shape.n + msg.index
                per_prompt[p][msg.index].add(msg)
                if index not in started and not msg.prompt_token_ids:  # a sample after the first
                    _share_prompt_logprobs(per_prompt[p], msg)
                choice = self.delta_choice(index, msg, self.jobs[p], index not in started)
                started.add(index)
                if choice is not None:
                    yield self.chunk([choice])
            if self.include_usage:
                yield self.chunk([], usage(per_prompt))
            yield "[DONE]"
        finally:
            await merged.aclose()


async def merge(gens: list, firsts: list):
    """(job index, message) from several delta streams as they come, each stream's first message
    (already read) first; ends when every stream has ended. Closing it closes them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen) -> None:
        try:
            async for msg in gen:
                await queue.put((i, msg))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    for i, first in enumerate(firsts):
        queue.put_nowait((i, first))
    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    live = len(tasks)
    try:
        while live:
            i, item = await queue.get()
            if item is done:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()


async def collect(streams: list, samples: int) -> list[list[Choice]]:
    """Every choice of every job, gathered (streams: (deltas, first) per job)."""
    per_prompt = [[Choice() for _ in range(samples)] for _ in streams]
    merged = merge([d for d, _ in streams], [f for _, f in streams])
    try:
        async for p, msg in merged:
            if (err := pipeline_failed(msg)) is not None:
                raise err
            per_prompt[p][msg.index].add(msg)
    finally:
        await merged.aclose()
    return per_prompt


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
