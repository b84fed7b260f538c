"""One micro-batch as the stage runs it: the wire's ForwardRequest decoded once, at the edge.

`decode` checks everything a request can be checked for without the stage's state (chunk sizes,
block ids inside the pool, token ids inside the vocabulary, the hidden states' shape, sampling
parameters, the size of the batch) and resolves where each chunk's tokens sit, so the executor
and the model never see a protobuf. What needs the stage's state (a sequence known to its lease,
a table big enough, the lease not superseded, a sample to follow) is checked by the LeaseTable
and the SampleBook when the step launches, still before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stagemesh import wire
from stagemesh.errors import InvalidArgument
from stagemesh.grammar import GrammarSpec
from stagemesh.sampling import SamplingSpec
from stagemesh.v1 import stagemesh_pb2 as pb

MAX_BATCH_TOKENS = 1 << 16


@dataclass(frozen=True)
class StageShape:
    """What decoding needs to know about this stage."""

    is_first: bool
    is_last: bool
    vocab_size: int
    hidden_size: int
    num_blocks: int
    block_size: int
    device_type: str  # "cpu" | "cuda": CPU kernels want the hidden states' bytes aligned


@dataclass
class Chunk:
    """One sequence's slice of the micro-batch; its tokens are rows row .. row+num_tokens-1."""

    seq_id: int
    start_pos: int
    num_tokens: int
    row: int
    new_block_ids: list[int] = field(default_factory=list)
    sample: bool = False
    output_index: int = 0
    follows_sample: bool = False  # its one token is an earlier step's sample (samples.py)


@dataclass
class NewSequence:
    seq_id: int
    block_ids: list[int]
    sampling: SamplingSpec
    history: list[int] = field(default_factory=list)  # token history (penalties, prompt logprobs)
    num_prompt: int = 0  # how many of `history` are the prompt


@dataclass
class StepInput:
    """A validated micro-batch. Plain data (it pickles: a TP stage hands it to its followers)."""

    lease_id: str
    lease_owner: str
    lease_order: int
    step_id: int
    new: dict[int, NewSequence]
    chunks: list[Chunk]
    finished: frozenset[int]
    num_tokens: int
    token_ids: list[int] | None = None  # first stage
    hidden: torch.Tensor | None = None  # later stages: [num_tokens, hidden] on the host
    # Chunks whose token is an earlier step's sample not in token_ids yet (first stage only).
    follows: list[Chunk] = field(default_factory=list)
    # (src, dst) KV blocks to copy before the forward (ForwardRequest.block_copies).
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def outputs(self) -> list[tuple[int, int]]:
        """(seq_id, output_index) of each sample this step draws."""
        return [(c.seq_id, c.output_index) for c in self.chunks if c.sample]


def outputs(request: pb.ForwardRequest) -> list[tuple[int, int]]:
    """(seq_id, output_index) of each sample a request would draw, also one decode refused."""
    return [(c.seq_id, c.output_index) for c in request.chunks if c.sample]


def decode(request: pb.ForwardRequest, shape: StageShape, hidden=None) -> StepInput:
    """The request as a StepInput, or InvalidArgument saying what is wrong with it.
    hidden: the hidden states as received (wire.parse_forward); None: `request.hidden`."""
    chunks, num_tokens = _chunks(request, shape)
    step = StepInput(
        lease_id=request.lease_id, lease_owner=request.lease_owner, lease_order=request.lease_order,
        step_id=request.step_id, new=_new_sequences(request, shape), chunks=chunks,
        finished=frozenset(request.finished_seq_ids), num_tokens=num_tokens,
        block_copies=_block_copies(request, shape),
    )
    if shape.is_first:
        step.token_ids = _token_ids(request, num_tokens, shape)
        step.follows = [c for c in chunks if c.follows_sample]
    elif num_tokens:
        step.hidden = _hidden(request, hidden, num_tokens, shape)
    return step


def _chunks(request: pb.ForwardRequest, shape: StageShape) -> tuple[list[Chunk], int]:
    chunks, seen, row = [], set(), 0
    for c in request.chunks:
        if c.num_tokens <= 0 or c.start_pos < 0:
            raise InvalidArgument(f"sequence {c.seq_id}: num_tokens must be >= 1 and start_pos >= 0")
        if c.seq_id in seen:
            raise InvalidArgument(f"sequence {c.seq_id} appears twice in one micro-batch")
        seen.add(c.seq_id)
        _check_blocks(c.new_block_ids, f"sequence {c.seq_id}", shape)
        # A single stage and a chain's first stage put the followed sample in place (samples.py).
        follows = c.follows_sample and shape.is_first
        if follows and (c.num_tokens != 1 or c.output_index < 1):
            raise InvalidArgument(f"sequence {c.seq_id}: a chunk that follows a sample is one token "
                                  "with output_index >= 1")
        chunks.append(Chunk(c.seq_id, c.start_pos, c.num_tokens, row, list(c.new_block_ids), c.sample,
                            c.output_index, follows))
        row += c.num_tokens
    if row > MAX_BATCH_TOKENS:
        raise InvalidArgument(f"micro-batch of {row} tokens exceeds the limit of {MAX_BATCH_TOKENS}")
    return chunks, row


def _new_sequences(request: pb.ForwardRequest, shape: StageShape) -> dict[int, NewSequence]:
    new = {}
    for ns in request.new_sequences:
        _check_blocks(ns.block_ids, f"sequence {ns.seq_id}", shape)
        if len(set(ns.block_ids)) != len(ns.block_ids):
            raise InvalidArgument(f"sequence {ns.seq_id}: a block id appears twice in its table")
        history = list(ns.history_ids)
        if history and (min(history) < 0 or max(history) >= shape.vocab_size):
            raise InvalidArgument(f"sequence {ns.seq_id}: history_ids must be in [0, {shape.vocab_size})")
        if not 0 <= ns.num_prompt_tokens <= len(history):
            raise InvalidArgument(f"sequence {ns.seq_id}: num_prompt_tokens {ns.num_prompt_tokens} outside "
                                  f"[0, {len(history)}] (the history sent)")
        new[ns.seq_id] = NewSequence(ns.seq_id, list(ns.block_ids), spec_of(ns.sampling), history,
                                     ns.num_prompt_tokens)
    return new


def _block_copies(request: pb.ForwardRequest, shape: StageShape) -> list[tuple[int, int]]:
    pairs = [(c.src_block_id, c.dst_block_id) for c in request.block_copies]
    _check_blocks([b for pair in pairs for b in pair], "block_copies", shape)
    dst = [d for _, d in pairs]
    if len(set(dst)) != len(dst) or set(dst) & {s for s, _ in pairs}:
        raise InvalidArgument("block_copies: a destination block appears twice or is also a source")
    return pairs


def _check_blocks(block_ids, what: str, shape: StageShape) -> None:
    for b in block_ids:
        if not 0 <= b < shape.num_blocks:
            raise InvalidArgument(f"{what}: block id {b} outside this stage's pool [0, {shape.num_blocks})")


def _token_ids(request: pb.ForwardRequest, num_tokens: int, shape: StageShape) -> list[int]:
    if len(request.token_ids) != num_tokens:
        raise InvalidArgument(f"{len(request.token_ids)} token ids for {num_tokens} scheduled tokens")
    ids = list(request.token_ids)
    if ids and (min(ids) < 0 or max(ids) >= shape.vocab_size):
        raise InvalidArgument(f"token ids must be in [0, {shape.vocab_size})")
    return ids


def _hidden(request: pb.ForwardRequest, hidden, num_tokens: int, shape: StageShape) -> torch.Tensor:
    if hidden is None:
        if not request.HasField("hidden"):
            raise InvalidArgument("this stage is not the first: the request must carry hidden states")
        hidden = request.hidden
    hidden = wire.decode(hidden, aligned=shape.device_type == "cpu")
    expect = (num_tokens, shape.hidden_size)
    if tuple(hidden.shape) != expect:
        raise InvalidArgument(f"hidden states of shape {tuple(hidden.shape)}, expected {expect}")
    return hidden  # on the host: the executor moves it (or the graph path copies it)


def spec_of(sp: pb.SamplingParams) -> SamplingSpec:
    """The wire's SamplingParams as a SamplingSpec; InvalidArgument when a value is out of range."""
    top_p = sp.top_p if sp.HasField("top_p") else 1.0
    try:
        return SamplingSpec(
            temperature=sp.temperature, top_p=top_p, top_k=sp.top_k, seed=sp.seed if sp.HasField("seed") else None,
            min_p=sp.min_p, repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
            presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty, min_tokens=sp.min_tokens,
            logit_bias=tuple(sorted(sp.logit_bias.items())), stop_token_ids=tuple(sp.stop_token_ids),
            logprobs=sp.logprobs if sp.HasField("logprobs") else None,
            prompt_logprobs=sp.prompt_logprobs if sp.HasField("prompt_logprobs") else None,
            grammar=GrammarSpec.from_wire(sp.grammar) if sp.HasField("grammar") else None)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
