"""Property-based fuzzing of the public Generate API and the internal Stage.Forward, over real gRPC.

A 2-stage mesh (demo model with a real tokenizer) runs as separate processes. Hypothesis sends
random field values, wrong dtypes, shapes that do not match the bytes, unknown sequence ids,
out-of-pool block ids and stale epochs. Every answer must be OK or a clear client-side status
(never INTERNAL / UNKNOWN / UNAVAILABLE), no process may die, and once a fuzz lease is released
every stage holds zero blocks again. `STATUS_COUNTS` is printed at the end (README figures).
The cases of issue #21 (non-finite floats, an enum value out of range, an empty stop string, ids
and max_tokens past int32 on the wire, oversize prompts) are also asserted one by one.
"""

from __future__ import annotations

import collections
import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagemesh.cli.demo_model import write_demo_model
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from stagemesh.cli.harness import manual_mesh

KV_BLOCKS, BLOCK = 64, 4
MAX_PROMPT_BYTES = 1 << 20  # the gateway's --max-prompt-bytes here (default 4 MiB): big cases stay quick
CLEAR_GENERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                  grpc.StatusCode.RESOURCE_EXHAUSTED}
CLEAR_FORWARD = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
STATUS_COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    model_dir = write_demo_model(tmp_path_factory.mktemp("fuzz") / "demo", num_layers=2, max_positions=256)
    with manual_mesh(model_dir, stages=2, kv_blocks=KV_BLOCKS,
                     gateway_args=("--max-prompt-bytes", str(MAX_PROMPT_BYTES))) as m:
        chans = {a: grpc.insecure_channel(a) for a in [m["gateway"], *m["workers"]]}
        stages = sorted(((pb_grpc.StageStub(chans[a]).Stats(pb.StatsRequest(), timeout=5), a)
                         for a in m["workers"]), key=lambda sa: sa[0].layer_start)
        m["stage_stubs"] = [pb_grpc.StageStub(chans[a]) for _, a in stages]
        m["epoch"] = stages[0][0].epoch
        m["gen"] = pb_grpc.GenerationStub(chans[m["gateway"]])
        m["vocab"] = m["gen"].ListModels(pb.ListModelsRequest(), timeout=5).models[0].vocab_size
        yield m
        for ch in chans.values():
            ch.close()
        print("\nfuzz answers by status:", {k: dict(v) for k, v in STATUS_COUNTS.items()})


def _alive(m) -> None:
    dead = [p.args[2] for p in m["procs"] if p.poll() is not None]
    assert not dead, f"processes died: {dead}"


def _held(m) -> list[tuple[int, int]]:
    return [(s.blocks_in_use, s.live_sequences)
            for s in (stub.Stats(pb.StatsRequest(), timeout=5) for stub in m["stage_stubs"])]


# -- Generate ---------------------------------------------------------------------------------------
floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 0.5, 1.0, -1.0])
int32 = st.integers(-2**31, 2**31 - 1)


@st.composite
def generate_requests(draw):
    if draw(st.booleans()):  # a valid request with one field mutated: reaches the pipeline
        req = pb.GenerateRequest(prompt_ids=draw(st.lists(st.integers(0, 700), min_size=1, max_size=20)),
                                 max_tokens=draw(st.integers(1, 6)))
        field = draw(st.sampled_from(["temperature", "top_p", "top_k", "seed", "stop", "prompt", "none"]))
        if field == "temperature":
            req.sampling.temperature = draw(floats)
        elif field == "top_p":
            req.sampling.top_p = draw(floats)
        elif field == "top_k":
            req.sampling.top_k = draw(int32)
        elif field == "seed":
            req.sampling.temperature, req.sampling.seed = 1.0, draw(st.integers(0, 2**64 - 1))
        elif field == "stop":
            req.stop.extend(draw(st.lists(st.text(max_size=8), max_size=20)))
        elif field == "prompt":
            req.ClearField("prompt_ids")
            req.prompt = draw(st.text(min_size=1, max_size=200))
        return req
    req = pb.GenerateRequest()
    kind = draw(st.sampled_from(["ids", "text", "both", "none"]))
    if kind in ("ids", "both"):
        req.prompt_ids.extend(draw(st.lists(st.integers(-5, 1000) | int32, max_size=40)))
    if kind in ("text", "both"):
        req.prompt = draw(st.text(max_size=200))
    if draw(st.booleans()):
        req.max_tokens = draw(st.integers(-3, 12) | int32)
    req.sampling.temperature = draw(floats)
    if draw(st.booleans()):
        req.sampling.top_p = draw(floats)
    req.sampling.top_k = draw(st.integers(-3, 100) | int32)
    if draw(st.booleans()):
        req.sampling.seed = draw(st.integers(0, 2**64 - 1))
    req.stop.extend(draw(st.lists(st.text(max_size=8), max_size=20)))
    req.model = draw(st.sampled_from(["", "demo", "other"]) | st.text(max_size=10))
    req.priority = draw(st.integers(-5, 5) | int32)
    req.ignore_eos = draw(st.booleans())
    req.request_id = draw(st.text(max_size=300))
    return req


def test_fuzz_generate(mesh):
    @FUZZ
    @given(req=generate_requests())
    def check(req):
        try:
            for _ in mesh["gen"].Generate(req, timeout=60):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert exc.details(), "an error status needs a message"
        STATUS_COUNTS["Generate"][code.name] += 1
        assert code in CLEAR_GENERATE, (code, req)

    check()
    _alive(mesh)


def test_oversize_generate_is_refused_clearly(mesh):
    huge = pb.GenerateRequest(prompt_ids=[5] * 1_000_000, max_tokens=1)  # ~5 MB, far past the context
    with pytest.raises(grpc.RpcError) as err:
        list(mesh["gen"].Generate(huge, timeout=60))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    STATUS_COUNTS["Generate"][err.value.code().name] += 1
    _alive(mesh)


def _refusal(m, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list(m["gen"].Generate(req, timeout=60))
    STATUS_COUNTS["Generate issue #21"][err.value.code().name] += 1
    return err.value


def _sampling(**kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_ids=[5, 6], max_tokens=2, sampling=pb.SamplingParams(**kw))


ISSUE_21 = [  # (request, status, the field the message must name)
    (_sampling(temperature=math.inf), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (_sampling(temperature=1e309), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),  # inf in float32
    (_sampling(temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (_sampling(temperature=1.0, top_p=math.inf), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (_sampling(temperature=1.0, top_p=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (_sampling(top_k=-2**31), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (pb.GenerateRequest(prompt_ids=[5], priority=99), grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    (pb.GenerateRequest(prompt_ids=[5], priority=-1), grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    (pb.GenerateRequest(prompt_ids=[5], stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (pb.GenerateRequest(prompt_ids=[5], stop=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (pb.GenerateRequest(prompt_ids=[5], stop=["x" * 513]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    (pb.GenerateRequest(prompt_ids=[5], max_tokens=2**31 - 1), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
    (pb.GenerateRequest(prompt_ids=[5], request_id="r" * 300), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    (pb.GenerateRequest(prompt="word " * (MAX_PROMPT_BYTES // 5 + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "--max-prompt-bytes"),
    # Under the byte limit, far past the 256-token context: refused after a few chunks are counted.
    (pb.GenerateRequest(prompt="word " * (MAX_PROMPT_BYTES // 6)), grpc.StatusCode.OUT_OF_RANGE, "context"),
]


@pytest.mark.parametrize("req,code,words", ISSUE_21, ids=[f"{c.name}-{w}-{i}" for i, (_, c, w) in enumerate(ISSUE_21)])
def test_issue_21_cases_are_refused_naming_the_field(mesh, req, code, words):
    err = _refusal(mesh, req)
    assert (err.code(), words in err.details()) == (code, True), (err.code(), err.details())
    ok = list(mesh["gen"].Generate(pb.GenerateRequest(prompt_ids=[5, 6], max_tokens=2), timeout=60))
    assert sum(len(m.token_ids) for m in ok) == 2
    _alive(mesh)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@pytest.mark.parametrize("field", ["prompt_ids", "max_tokens"])
def test_values_past_int32_on_the_wire_are_refused(mesh, field):
    """A client with its own encoder can put 2**31 (or 2**40) in an int32 field; protobuf keeps the
    low 32 bits (-2**31), which must be refused, not taken as a token id or a length."""
    ids = b"".join(_varint(v) for v in (5, 2**31, 2**40 + 7))
    body = bytes([0x1A, len(ids)]) + ids if field == "prompt_ids" else \
        bytes([0x1A, 1, 5, 0x20]) + _varint(2**31)  # prompt_ids [5], max_tokens (field 4) 2**31
    generate = grpc.insecure_channel(mesh["gateway"]).unary_stream(
        "/stagemesh.v1.Generation/Generate", request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(generate(body, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()
    _alive(mesh)


def test_a_100_mb_prompt_is_refused_unread(mesh):
    """Past the gateway's gRPC message limit (derived from --max-prompt-bytes): gRPC refuses it
    before parsing, the gateway's memory does not hold it."""
    err = _refusal(mesh, pb.GenerateRequest(prompt="x" * (100 << 20), max_tokens=1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "SERVER: Received message larger than max" in err.details()  # the gateway's limit, not ours
    _alive(mesh)
    assert _held(mesh) == [(0, 0), (0, 0)]


# -- Stage.Forward ----------------------------------------------------------------------------------
block_ids = st.lists(st.integers(0, KV_BLOCKS - 1) | st.integers(-3, 10**6), max_size=6)
seq_ids = st.integers(0, 6) | st.integers(0, 2**64 - 1)


@st.composite
def tensors(draw, tokens: int, hidden: int):
    dtype = draw(st.sampled_from(["float32", "float32", "float16", "bfloat16", "int8", "", "float64"])
                 | st.text(max_size=8))
    if draw(st.booleans()):
        shape = [tokens, hidden]
    else:
        shape = draw(st.lists(st.integers(-2, 300) | st.integers(-2**63, 2**63 - 1), max_size=4))
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 1)
    numel = math.prod(shape) if all(0 <= d < 10**6 for d in shape) else 0
    if draw(st.booleans()) and 0 <= numel * itemsize <= 1 << 20:
        n = numel * itemsize  # bytes that match the claimed shape
    else:
        n = draw(st.integers(0, 4096))
    value = draw(st.sampled_from([b"\x00", b"\x7f\x7f\xff\xff", b"\x01\x02"]))  # zeros, NaN-ish, junk
    return pb.Tensor(dtype=dtype, shape=shape, data=(value * (n // len(value) + 1))[:n])


@st.composite
def forward_requests(draw, epoch: int, first: bool, hidden: int, vocab: int):
    req = pb.ForwardRequest(
        epoch=epoch if draw(st.integers(0, 9)) < 8 else draw(st.sampled_from([epoch + 1, 0]) | st.integers(0, 2**64 - 1)),
        lease_id="fuzz-" + draw(st.text(max_size=6)), step_id=draw(st.integers(0, 2**64 - 1)),
    )
    for sid in draw(st.lists(seq_ids, max_size=3)):
        ns = req.new_sequences.add(seq_id=sid, block_ids=draw(block_ids))
        ns.sampling.temperature = draw(floats)
        if draw(st.booleans()):
            ns.sampling.top_p = draw(floats)
        ns.sampling.top_k = draw(st.integers(-2, 50))
        if draw(st.booleans()):
            ns.sampling.seed = draw(st.integers(0, 2**64 - 1))
    known = [ns.seq_id for ns in req.new_sequences]
    for sid in draw(st.lists(st.sampled_from(known) if known and draw(st.booleans()) else seq_ids, max_size=3)):
        req.chunks.add(seq_id=sid, start_pos=draw(st.integers(0, 20) | int32),
                       num_tokens=draw(st.integers(1, 12) | int32), new_block_ids=draw(block_ids),
                       sample=draw(st.booleans()), output_index=draw(st.integers(0, 2**31 - 1)))
    req.finished_seq_ids.extend(draw(st.lists(seq_ids, max_size=2)))
    tokens = sum(max(0, c.num_tokens) for c in req.chunks)
    if first or draw(st.integers(0, 4)) == 0:
        n = tokens if draw(st.booleans()) else draw(st.integers(0, 30))
        req.token_ids.extend(draw(st.lists(st.integers(0, vocab - 1) | int32, min_size=min(n, 64),
                                           max_size=min(n, 64))))
    if not first or draw(st.integers(0, 4)) == 0:
        req.hidden.CopyFrom(draw(tensors(tokens, hidden)))
    return req


@pytest.mark.parametrize("stage", [0, 1], ids=["first", "last"])
def test_fuzz_forward(mesh, stage):
    stub = mesh["stage_stubs"][stage]
    hidden = 64  # write_demo_model's hidden_size

    @FUZZ
    @given(req=forward_requests(mesh["epoch"], stage == 0, hidden, mesh["vocab"]))
    def check(req):
        try:
            stub.Forward(req, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert exc.details(), "an error status needs a message"
        finally:  # release the lease on both stages (stage 0 relays Release down the chain)
            for s in mesh["stage_stubs"]:
                s.Release(pb.ReleaseRequest(lease_id=req.lease_id), timeout=10)
        STATUS_COUNTS[f"Forward stage {stage}"][code.name] += 1
        assert code in CLEAR_FORWARD, (code, req)
        assert _held(mesh) == [(0, 0), (0, 0)]

    check()
    _alive(mesh)


def test_oversize_forward_is_refused_clearly(mesh):
    big = pb.ForwardRequest(epoch=mesh["epoch"], lease_id="fuzz-big",
                            hidden=pb.Tensor(dtype="float32", shape=[1], data=b"\0" * (257 << 20)))
    with pytest.raises(grpc.RpcError) as err:
        mesh["stage_stubs"][1].Forward(big, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    STATUS_COUNTS["Forward oversize"][err.value.code().name] += 1
    _alive(mesh)
    assert _held(mesh) == [(0, 0), (0, 0)]
