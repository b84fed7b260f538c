"""The public API under bad input, cancellation and deadlines: clear statuses, nothing leaks.

Coordinator, two stage workers and the gateway run as separate processes; after each test every
stage must hold zero KV blocks again.
"""

from __future__ import annotations


import grpc
import pytest

from stagemesh.client import Client, build_request
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from stagemesh.cli.harness import blocks_in_use, manual_mesh, wait_kv_free

VOCAB = 320
MAX_LEN = 256  # max_position_embeddings of the test checkpoints


@pytest.fixture(scope="module")
def mesh2(ckpt_dir):
    model_dir = ckpt_dir("llama", num_layers=4)
    with manual_mesh(model_dir, stages=2, kv_blocks=96, gateway_args=("--max-batched-tokens", "16")) as m:
        yield m


def wait_all_free(m, timeout_s: float = 10.0) -> None:
    wait_kv_free(m, timeout_s)


BAD = [
    (dict(prompt_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (dict(prompt_ids=[5] * MAX_LEN), grpc.StatusCode.OUT_OF_RANGE, "context"),
    (dict(prompt_ids=[5, 6], max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt_ids=[5, 6], max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt_ids=[5, 6], max_tokens=MAX_LEN), grpc.StatusCode.OUT_OF_RANGE, "context"),
    (dict(prompt_ids=[5, 6], temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(prompt_ids=[5, 6], top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompt_ids=[5, 6], top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(prompt_ids=[5, 6], top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (dict(prompt_ids=[5, 6], model="not-this-one"), grpc.StatusCode.INVALID_ARGUMENT, "unknown model"),
    (dict(prompt_ids=[5, VOCAB]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    (dict(prompt_ids=[-1, 5]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
]


@pytest.mark.parametrize("kwargs,code,words", BAD)
def test_bad_input_gets_a_clear_status_and_the_mesh_keeps_serving(mesh2, kwargs, code, words):
    with Client(mesh2["gateway"]) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(timeout=30, **kwargs)
        assert err.value.code() == code
        assert words in err.value.details()
        ok = client.generate(prompt_ids=[5, 6, 7], max_tokens=3, timeout=30)
        assert len(ok.token_ids) == 3 and ok.finish_reason == "length"
    wait_all_free(mesh2)


def test_no_tokenizer_means_prompt_text_is_refused(mesh2):
    with Client(mesh2["gateway"]) as client, pytest.raises(grpc.RpcError) as err:
        client.generate(prompt="hello", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_ids" in err.value.details()


def test_cancelled_stream_frees_kv_on_every_stage(mesh2):
    with grpc.insecure_channel(mesh2["gateway"]) as ch:
        stub = pb_grpc.GenerationStub(ch)
        call = stub.Generate(build_request(prompt_ids=list(range(3, 60)), max_tokens=150, ignore_eos=True), timeout=60)
        first = next(call)
        assert first.token_ids
        assert any(blocks_in_use(mesh2))
        call.cancel()
    wait_all_free(mesh2)
    with Client(mesh2["gateway"]) as client:
        assert len(client.generate(prompt_ids=[5, 6], max_tokens=2, timeout=30).token_ids) == 2


def test_deadline_is_honoured_and_frees_kv(mesh2):
    with Client(mesh2["gateway"]) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt_ids=list(range(3, 40)), max_tokens=200, ignore_eos=True, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_all_free(mesh2)


def test_seeded_sampling_is_reproducible(mesh2):
    kw = dict(prompt_ids=[7, 8, 9, 10], max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
              ignore_eos=True, timeout=30)
    with Client(mesh2["gateway"]) as client:
        a = client.generate(**kw).token_ids
        b = client.generate(**kw).token_ids
        c = client.generate(**{**kw, "seed": 99}).token_ids
    assert a == b
    assert a != c


def test_usage_and_priority_fields(mesh2):
    with Client(mesh2["gateway"]) as client:
        out = client.generate(prompt_ids=[7, 8, 9], max_tokens=4, priority=pb.PRIORITY_BATCH, timeout=30)
    assert out.prompt_tokens == 3 and out.completion_tokens == 4


def test_list_models(mesh2):
    with grpc.insecure_channel(mesh2["gateway"]) as ch:
        models = pb_grpc.GenerationStub(ch).ListModels(pb.ListModelsRequest(), timeout=5).models
    assert models[0].vocab_size == VOCAB and models[0].max_model_len == MAX_LEN


def test_deltas_waiting_behind_one_go_out_as_one_message():
    """A stream that lags (a slow client, or a gateway busy with a large batch) gets what waits
    as one message; concatenating the messages gives the same tokens and text either way."""
    import asyncio

    from gateway.server import coalesce
    from stagemesh.finish import finish_text, set_finish

    queue = asyncio.Queue()
    for ids, text in (([2], "b"), ([3, 4], "cd")):
        queue.put_nowait(pb.GenerateResponse(token_ids=ids, text=text, request_id="r"))
    last = pb.GenerateResponse(text="!", usage=pb.Usage(completion_tokens=4))
    set_finish(last, "length")
    queue.put_nowait(last)
    queue.put_nowait(pb.GenerateResponse(token_ids=[9], text="never"))  # nothing follows a finish
    msg = coalesce(pb.GenerateResponse(token_ids=[1], text="a", request_id="r"), queue)
    assert (list(msg.token_ids), msg.text, finish_text(msg), msg.usage.completion_tokens) == (
        [1, 2, 3, 4], "abcd!", "length", 4)
    assert queue.qsize() == 1
    alone = coalesce(pb.GenerateResponse(token_ids=[5], text="e"), asyncio.Queue())
    assert (list(alone.token_ids), alone.text, finish_text(alone)) == ([5], "e", "")


def test_tokenizer_pool_gives_encode_s_ids_and_refuses_only_what_is_too_long():
    """Long text is counted piece by piece (cut before whitespace, else anywhere) and refused once it
    is certainly past the limit; otherwise the ids are exactly those of one `encode`."""
    import asyncio
    import random

    from gateway.text import CHUNK_CHARS, TokenizerPool
    from stagemesh.cli.demo_model import train_tokenizer
    from stagemesh.errors import OutOfRange

    tok = train_tokenizer(768)
    rng = random.Random(0)
    words = ["the", "river", "mill", "  stood", "\n\nold", "Ünïcode", "✓", "  ", "gateway,", "x" * 40]
    texts = [" ".join(rng.choice(words) for _ in range(20_000)), "y" * (2 * CHUNK_CHARS + 5), "short text"]
    pool = TokenizerPool(tok)

    async def check():
        for text in texts:
            exact = tok.encode(text).ids
            assert await pool.encode(text, max_tokens=len(exact)) == exact
            assert await pool.encode(text, max_tokens=len(exact), add_special_tokens=False) == \
                tok.encode(text, add_special_tokens=False).ids
            if len(text) > CHUNK_CHARS:
                with pytest.raises(OutOfRange, match="more than"):
                    await pool.encode(text, max_tokens=len(exact) // 2)

    try:
        asyncio.run(check())
    finally:
        pool.close()
