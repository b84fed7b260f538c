"""A small client over the public Generation API (sync and asyncio), used by `stagemesh generate`."""

from __future__ import annotations

from dataclasses import dataclass, field

from stagemesh.finish import finish_text
from stagemesh.net import GRPC_OPTIONS
from stagemesh.security import TlsConfig, channel, sync_channel
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc


@dataclass
class Completion:
    """What one Generate call returned, collected from its deltas.

    The fields are sample 0's (with n = 1, the only sample). With n > 1 every sample is also in
    `choices`, in index order, each a Completion of its own, and `usage` counts the whole request
    as OpenAI does: the prompt once (its cached tokens from sample 0), the completion tokens of
    every sample summed.
    """

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    choices: list[Completion] = field(default_factory=list)  # n > 1 only; choices[0] is this sample

    def add(self, msg: pb.GenerateResponse) -> None:
        if msg.index or self.choices:
            self._sample(msg.index)._take(msg)
            self._mirror()
        else:
            self._take(msg)

    def _take(self, msg: pb.GenerateResponse) -> None:
        self.token_ids.extend(msg.token_ids)
        self.text += msg.text
        if finish := finish_text(msg):
            self.finish_reason = finish
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = msg.usage.completion_tokens
            self.cached_tokens = msg.usage.cached_tokens

    def _sample(self, index: int) -> Completion:
        if not self.choices:  # the first delta of another sample: what came so far was sample 0's
            self.choices.append(Completion(list(self.token_ids), self.text, self.finish_reason, self.prompt_tokens,
                                           self.completion_tokens, self.cached_tokens))
        while len(self.choices) <= index:
            self.choices.append(Completion())
        return self.choices[index]

    def _mirror(self) -> None:
        first = self.choices[0]
        self.token_ids, self.text, self.finish_reason = list(first.token_ids), first.text, first.finish_reason
        self.prompt_tokens, self.cached_tokens = first.prompt_tokens, first.cached_tokens
        self.completion_tokens = sum(c.completion_tokens for c in self.choices)

    def to_json(self) -> dict:
        out = {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens,
            },
        }
        if self.choices:  # n > 1: every sample, added beside the fields above (which stay sample 0's)
            out["choices"] = [{"index": i, **c.to_json()}
                              for i, c in enumerate(self.choices)]
        return out


INT32 = (-2**31, 2**31 - 1)
UINT64 = (0, 2**64 - 1)


class FieldRangeError(ValueError):
    """A value that its GenerateRequest field cannot hold (protobuf would raise a bare ValueError);
    `field` names it. The gateway checks what the values mean; this only checks that they fit."""

    def __init__(self, field: str, value: int, bounds: tuple[int, int]):
        super().__init__(f"{field} {value} does not fit the request field (range [{bounds[0]}, {bounds[1]}])")
        self.field = field


def _fits(field: str, values, bounds: tuple[int, int]) -> None:
    for v in values:
        if v is not None and not bounds[0] <= v <= bounds[1]:
            raise FieldRangeError(field, v, bounds)


def build_request(prompt: str | None = None, prompt_ids: list[int] | None = None, max_tokens: int | None = None,
                  temperature: float = 0.0, top_p: float | None = None, top_k: int = 0, seed: int | None = None,
                  stop: list[str] | None = None, ignore_eos: bool = False, model: str = "",
                  priority: int = 0, request_id: str = "", n: int | None = None, logprobs: int | None = None,
                  prompt_logprobs: int | None = None, repetition_penalty: float | None = None,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0, min_p: float = 0.0,
                  min_tokens: int = 0, logit_bias: dict[int, float] | None = None,
                  stop_token_ids: list[int] | None = None) -> pb.GenerateRequest:
    """One GenerateRequest; FieldRangeError when an integer does not fit its field. The sampling
    extras are vLLM's (see SamplingParams in protos/stagemesh/v1/stagemesh.proto); the gateway
    checks what they mean."""
    for field, values, bounds in (("prompt_ids", prompt_ids or (), INT32), ("max_tokens", (max_tokens,), INT32),
                                  ("top_k", (top_k,), INT32), ("seed", (seed,), UINT64),
                                  ("priority", (priority,), INT32), ("n", (n,), INT32),
                                  ("logprobs", (logprobs, prompt_logprobs), INT32),
                                  ("min_tokens", (min_tokens,), INT32),
                                  ("logit_bias", (logit_bias or {}).keys(), INT32),
                                  ("stop_token_ids", stop_token_ids or (), INT32)):
        _fits(field, values, bounds)
    req = pb.GenerateRequest(prompt=prompt or "", prompt_ids=prompt_ids or [], stop=stop or [],
                             ignore_eos=ignore_eos, model=model, priority=priority, request_id=request_id)
    if max_tokens is not None:
        req.max_tokens = max_tokens
    req.sampling.temperature = temperature
    req.sampling.top_k = top_k
    if top_p is not None:
        req.sampling.top_p = top_p
    if seed is not None:
        req.sampling.seed = seed
    _sampling_extras(req, n=n, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                     repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                     frequency_penalty=frequency_penalty, min_p=min_p, min_tokens=min_tokens, logit_bias=logit_bias,
                     stop_token_ids=stop_token_ids)
    return req


def _sampling_extras(req: pb.GenerateRequest, n, logprobs, prompt_logprobs, repetition_penalty, presence_penalty,
                     frequency_penalty, min_p, min_tokens, logit_bias, stop_token_ids) -> None:
    sp = req.sampling
    sp.presence_penalty, sp.frequency_penalty, sp.min_p, sp.min_tokens = (
        presence_penalty, frequency_penalty, min_p, min_tokens)
    sp.logit_bias.update(logit_bias or {})
    sp.stop_token_ids.extend(stop_token_ids or ())
    for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs),
                        ("repetition_penalty", repetition_penalty)):
        if value is not None:
            setattr(sp, name, value)
    if n is not None:
        req.n = n


class Client:
    """Blocking client. `stream()` yields deltas (tagged with their sample's `index` when n > 1);
    `generate()` collects them into a Completion (every sample in `choices` when n > 1)."""

    def __init__(self, target: str = "127.0.0.1:50051", tls: TlsConfig | None = None, api_key: str = ""):
        self._channel = sync_channel(target, tls, options=GRPC_OPTIONS, member=False)  # no cluster token
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = _auth_metadata(api_key)

    def stream(self, timeout: float | None = None, **kwargs):
        return self._stub.Generate(build_request(**kwargs), timeout=timeout, metadata=self._metadata)

    def generate(self, timeout: float | None = None, **kwargs) -> Completion:
        out = Completion()
        for msg in self.stream(timeout=timeout, **kwargs):
            out.add(msg)
        return out

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio client; one channel shared by many concurrent calls."""

    def __init__(self, target: str = "127.0.0.1:50051", tls: TlsConfig | None = None, api_key: str = ""):
        self._channel = channel(target, tls, options=GRPC_OPTIONS, member=False)  # no cluster token
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._metadata = _auth_metadata(api_key)

    def stream(self, timeout: float | None = None, **kwargs):
        return self._stub.Generate(build_request(**kwargs), timeout=timeout, metadata=self._metadata)

    async def generate(self, timeout: float | None = None, **kwargs) -> Completion:
        out = Completion()
        async for msg in self.stream(timeout=timeout, **kwargs):
            out.add(msg)
        return out

    async def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        resp = await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self._metadata)
        return list(resp.models)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def _auth_metadata(api_key: str):
    """gRPC metadata carrying an API key (`authorization: Bearer KEY`), or None."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None
