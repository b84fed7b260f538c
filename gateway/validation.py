"""Checks a request against the served model before any heavy work; raises typed errors with actionable text.

Both front ends go through here: the gRPC API with a `GenerateRequest`, the HTTP API with the
plain values of its JSON body (`check_fields`, `check_prompt_ids`) before it builds one, so that a
number beyond its protobuf field (2**31 tokens, a top_k of 1e20) is a 400 naming the field and not
a ValueError inside protobuf. Every range lives in this file, once.

Order matters for cost: the cheap limits (prompt bytes, prompt id count) come before anything that
scales with the input (scanning ids, tokenizing text), and tokenizing stops early once the text
has more tokens than the context holds (gateway/text.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stagemesh.errors import InvalidArgument, OutOfRange, ResourceExhausted
from stagemesh.grammar import GrammarSpec
from stagemesh.sampling import MAX_LOGPROBS, SamplingSpec
from stagemesh.v1 import stagemesh_pb2 as pb

from gateway import structured_output

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
FLOAT32_MAX = 3.4028234663852886e38
PRIORITIES = frozenset(pb.Priority.values())
MAX_STOP_CHARS = 512  # a stop string holds back that much streamed text; longer ones are a mistake
MAX_REQUEST_ID_CHARS = 256  # it goes into every log line of the request
MAX_N = 16  # samples of one prompt (n, best_of)
MAX_PROMPTS = 64  # prompts in one completions request
MAX_SEQUENCES = 64  # prompts x samples (n, best_of) of one request
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI: at most 300)
MAX_STOP_TOKEN_IDS = 64
DEFAULT_MAX_STOP_STRINGS = 16  # stop strings of one request: the gateway's max_stop_strings
DEFAULT_MAX_PROMPT_BYTES = 4 << 20


class FieldError(InvalidArgument):
    """A bad value of one request field; `field` names it (HTTP puts it in `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class PromptTooLarge(ResourceExhausted):
    """The prompt text is over the gateway's byte limit (HTTP 413): refused before tokenizing."""


@dataclass(frozen=True)
class ModelLimits:
    model_id: str
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int  # tokens one sequence may hold on the smallest replica
    default_max_tokens: int = 16
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES


@dataclass(frozen=True)
class Fields:
    """The numbers and strings of one request as plain Python values (protobuf or JSON)."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    priority: int = 0
    request_id: str = ""
    # vLLM's extras (stagemesh/sampling.py); None or the default: off.
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    grammar: GrammarSpec | None = None  # structured output (gateway/structured_output.py checks it)

    @classmethod
    def of(cls, req: pb.GenerateRequest) -> Fields:
        sp = req.sampling
        opt = lambda msg, name: getattr(msg, name) if msg.HasField(name) else None  # noqa: E731
        return cls(max_tokens=opt(req, "max_tokens"), temperature=sp.temperature, top_p=opt(sp, "top_p"),
                   top_k=sp.top_k, seed=opt(sp, "seed"), stop=tuple(req.stop),
                   priority=int(req.priority), request_id=req.request_id, min_p=sp.min_p,
                   repetition_penalty=opt(sp, "repetition_penalty"), presence_penalty=sp.presence_penalty,
                   frequency_penalty=sp.frequency_penalty, min_tokens=sp.min_tokens,
                   logit_bias=tuple(sorted(sp.logit_bias.items())), stop_token_ids=tuple(sp.stop_token_ids),
                   logprobs=opt(sp, "logprobs"), prompt_logprobs=opt(sp, "prompt_logprobs"),
                   n=1 if opt(req, "n") is None else req.n,
                   grammar=GrammarSpec.from_wire(sp.grammar) if sp.HasField("grammar") else None)


def grpc_message_limit(max_prompt_bytes: int, max_model_len: int) -> int:
    """The largest GenerateRequest worth reading: prompt text at its limit, or ids for a whole
    context (5 bytes each at most), plus stop strings and the small fields."""
    return max_prompt_bytes + 5 * max_model_len + (1 << 20)


def http_body_limit(max_prompt_bytes: int, max_model_len: int) -> int:
    """The same for a JSON body: escapes (`\\u00e9`) up to double the text, ids in decimal."""
    return 2 * max_prompt_bytes + 12 * max_model_len + (1 << 20)


def check_prompt_bytes(prompt: str, limits: ModelLimits) -> None:
    limit = limits.max_prompt_bytes
    # len() counts characters, each at least one UTF-8 byte: only near the limit is encoding needed.
    if len(prompt) > limit or (4 * len(prompt) > limit and len(prompt.encode("utf-8", "surrogatepass")) > limit):
        raise PromptTooLarge(f"the prompt text is over this gateway's limit of {limit} bytes "
                             f"(--max-prompt-bytes); shorten it")


def check_prompt_ids(ids, limits: ModelLimits) -> list[int]:
    """Length first (cheap), then every id in the vocabulary (also catches ids >= 2**31 from JSON)."""
    if len(ids) >= limits.max_model_len:
        raise OutOfRange(f"the prompt has {len(ids)} tokens; the served context (max_model_len) is {limits.max_model_len} tokens")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise FieldError("prompt", f"prompt_ids contains {len(bad)} id(s) outside the vocabulary "
                                   f"[0, {limits.vocab_size}), e.g. {bad[0]}")
    return list(ids)


def check_fields(f: Fields, limits: ModelLimits) -> tuple[int, SamplingSpec]:
    """Every number and string beside the prompt; returns (max_tokens, sampling)."""
    max_tokens = limits.default_max_tokens if f.max_tokens is None else f.max_tokens
    if not 1 <= max_tokens <= INT32_MAX:
        raise FieldError("max_tokens", f"max_tokens must be in [1, {INT32_MAX}], got {max_tokens}")
    _check_stop(f.stop, limits)
    if f.priority not in PRIORITIES:
        raise FieldError("priority", f"priority must be one of {sorted(PRIORITIES)} (Priority enum), got {f.priority}")
    if len(f.request_id) > MAX_REQUEST_ID_CHARS:
        raise FieldError("request_id", f"request_id is at most {MAX_REQUEST_ID_CHARS} characters, "
                                       f"got {len(f.request_id)}")
    if not 1 <= f.n <= MAX_N:
        raise FieldError("n", f"n must be in [1, {MAX_N}], got {f.n}")
    if not 0 <= f.min_tokens <= max_tokens:
        raise FieldError("min_tokens", f"min_tokens must be in [0, max_tokens = {max_tokens}], got {f.min_tokens}")
    _check_token_lists(f, limits)
    return max_tokens, _sampling(f)


def _check_token_lists(f: Fields, limits: ModelLimits) -> None:
    if len(f.logit_bias) > MAX_LOGIT_BIAS:
        raise FieldError("logit_bias", f"logit_bias has at most {MAX_LOGIT_BIAS} entries, got {len(f.logit_bias)}")
    for token, bias in f.logit_bias:
        if not 0 <= token < limits.vocab_size:
            raise FieldError("logit_bias", f"logit_bias: token id {token} outside the vocabulary [0, {limits.vocab_size})")
        if not (_finite(bias) and -100 <= bias <= 100):
            raise FieldError("logit_bias", f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias}")
    if len(f.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise FieldError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(f.stop_token_ids)}")
    bad = [t for t in f.stop_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise FieldError("stop_token_ids", f"stop_token_ids: {bad[0]} outside the vocabulary [0, {limits.vocab_size})")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(f, name)
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise FieldError(name, f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")


def check_sequences(prompts: int, samples: int) -> None:
    """A request's prompts times its samples per prompt (n, or best_of) stay within MAX_SEQUENCES."""
    if prompts * samples > MAX_SEQUENCES:
        raise FieldError("n", f"{prompts} prompt(s) x {samples} sample(s) = {prompts * samples} sequences; "
                              f"one request runs at most {MAX_SEQUENCES} (send several requests)")


def parse_logit_bias(raw) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({"token id as a string": bias}) as sorted (id, bias) pairs; a key that
    is not an integer is a FieldError (ranges are check_fields')."""
    pairs = []
    for key, value in (raw or {}).items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise FieldError("logit_bias", f"logit_bias keys are token ids, got {key!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError("logit_bias", f"logit_bias: the bias of token {key} must be a number, got {value!r}")
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def _check_stop(stop, limits: ModelLimits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise FieldError("stop", f"at most {limits.max_stop_strings} stop strings, got {len(stop)}")
    for s in stop:
        if not s:
            raise FieldError("stop", "stop strings must not be empty (an empty one would end every request at once)")
        if len(s) > MAX_STOP_CHARS:
            raise FieldError("stop", f"a stop string is at most {MAX_STOP_CHARS} characters, got {len(s)}")


def _finite(x: float) -> bool:
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX  # a float field on the wire is 32-bit


def _sampling(f: Fields) -> SamplingSpec:
    if not (_finite(f.temperature) and f.temperature >= 0):
        raise FieldError("temperature", f"temperature must be a finite number >= 0 (0 = greedy), got {f.temperature}")
    top_p = 1.0 if f.top_p is None else f.top_p
    if not (_finite(top_p) and 0.0 < top_p <= 1.0):
        raise FieldError("top_p", f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= f.top_k <= INT32_MAX:
        raise FieldError("top_k", f"top_k must be in [0, {INT32_MAX}] (0 = no limit), got {f.top_k}")
    if f.seed is not None and not 0 <= f.seed <= UINT64_MAX:
        raise FieldError("seed", f"seed must be in [0, 2**64), got {f.seed}")
    if not (_finite(f.min_p) and 0.0 <= f.min_p <= 1.0):
        raise FieldError("min_p", f"min_p must be in [0, 1], got {f.min_p}")
    rep = 1.0 if f.repetition_penalty is None else f.repetition_penalty
    if not (_finite(rep) and 0.0 < rep <= 100.0):
        raise FieldError("repetition_penalty", f"repetition_penalty must be in (0, 100] (1 = off), got {rep}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(f, name)
        if not (_finite(value) and -2.0 <= value <= 2.0):
            raise FieldError(name, f"{name} must be in [-2, 2], got {value}")
    return SamplingSpec(temperature=float(f.temperature), top_p=float(top_p), top_k=int(f.top_k), seed=f.seed,
                        min_p=float(f.min_p), repetition_penalty=float(rep), presence_penalty=float(f.presence_penalty),
                        frequency_penalty=float(f.frequency_penalty), min_tokens=int(f.min_tokens),
                        logit_bias=tuple((int(t), float(b)) for t, b in f.logit_bias),
                        stop_token_ids=tuple(int(t) for t in f.stop_token_ids), logprobs=f.logprobs,
                        prompt_logprobs=f.prompt_logprobs, grammar=_grammar(f))


def _grammar(f: Fields) -> GrammarSpec | None:
    if f.grammar is not None:
        # With min_tokens, the last stage lets a complete answer end early (stage_worker/sampler.py).
        structured_output.check(f.grammar, "sampling.grammar")
    return f.grammar


def check_max_tokens_fit(prompt_len: int, max_tokens: int, limits: ModelLimits) -> None:
    if prompt_len >= limits.max_model_len:
        raise OutOfRange(f"the prompt has {prompt_len} tokens; the served context (max_model_len) is {limits.max_model_len} tokens")
    total = prompt_len + max_tokens
    if total > limits.max_model_len:
        raise OutOfRange(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the served context (max_model_len) of "
            f"{limits.max_model_len} tokens; lower max_tokens to at most {limits.max_model_len - prompt_len}"
        )
    if total > limits.kv_capacity_tokens:
        raise OutOfRange(f"prompt + max_tokens = {total} tokens exceeds the KV cache of a replica "
                         f"({limits.kv_capacity_tokens} tokens); shorten the request")


async def validate_request(req: pb.GenerateRequest, limits: ModelLimits, tokenize) -> tuple[list[int], int, SamplingSpec]:
    """Returns (prompt ids, max_tokens, sampling) or raises a StagemeshError.

    `tokenize(text, max_tokens=...)` is awaited (it runs off the event loop) and raises OutOfRange
    once the text is certainly longer than the context; None when the checkpoint has no tokenizer.
    """
    if req.model and req.model != limits.model_id:
        raise FieldError("model", f"unknown model {req.model!r}: this gateway serves {limits.model_id!r}")
    if req.prompt and req.prompt_ids:
        raise FieldError("prompt", "set either prompt or prompt_ids, not both")
    if req.prompt:
        check_prompt_bytes(req.prompt, limits)
    else:
        prompt_ids = check_prompt_ids(req.prompt_ids, limits)
    max_tokens, sampling = check_fields(Fields.of(req), limits)
    if sampling.grammar is not None and tokenize is None:  # the last stage builds its masks from it
        raise FieldError("sampling.grammar", "structured output needs the checkpoint's tokenizer (tokenizer.json)")
    if req.prompt:
        prompt_ids = await _tokenized(req.prompt, limits, tokenize)
    elif not prompt_ids:
        raise FieldError("prompt", "the prompt is empty: set prompt (text) or prompt_ids")
    check_max_tokens_fit(len(prompt_ids), max_tokens, limits)
    return prompt_ids, max_tokens, sampling


async def _tokenized(prompt: str, limits: ModelLimits, tokenize) -> list[int]:
    if tokenize is None:
        raise FieldError("prompt", "this checkpoint ships no tokenizer.json: send prompt_ids instead of prompt")
    ids = await tokenize(prompt, max_tokens=limits.max_model_len)
    if not ids:
        raise FieldError("prompt", "the prompt tokenizes to zero tokens")
    return ids
