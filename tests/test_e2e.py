"""End to end: `stagemesh up` as subprocesses, greedy tokens equal transformers' generate.

Concurrent requests of different lengths, prompts longer than the prefill budget (chunked
prefill), 1/2/3 stages, and a tied-embedding checkpoint.
"""

from __future__ import annotations

import asyncio

import pytest

from stagemesh.client import AsyncClient
from stagemesh.cli.harness import mesh
from tests.reference import hf_greedy, random_prompts

LENGTHS = [3, 17, 40, 71, 9]
MAX_NEW = 10


async def _generate_all(address: str, prompts: list[list[int]], max_tokens: int, **kw):
    async with AsyncClient(address) as client:
        return await asyncio.gather(*[
            client.generate(prompt_ids=p, max_tokens=max_tokens, timeout=120, **kw) for p in prompts
        ])


# Each checkpoint kind (qwen2's biases, llama3's rope scaling, sharded files, tied embeddings) is
# checked against transformers' logits at 1, 2 and 3 stages in process (test_model.py); the mesh
# has no kind-specific code, so here the stage counts and one other kind go through `up`.
@pytest.mark.parametrize(
    "kind,stages,extra",
    [("llama", 1, ()), ("llama", 2, ()), ("llama", 3, ()),
     ("tied", 3, ("--inflight", "2")),  # fewer micro-batches in flight than stages (stages sharing a GPU)
     ],
)
def test_greedy_equals_transformers(ckpt_dir, kind, stages, extra):
    model_dir = ckpt_dir(kind, num_layers=4)
    prompts = random_prompts(seed=stages, lengths=LENGTHS, vocab=320)
    expected = [hf_greedy(model_dir, p, MAX_NEW) for p in prompts]
    # A 16-token prefill budget forces the longer prompts through several chunks.
    with mesh(model_dir, stages=stages, extra=["--max-batched-tokens", "16", *extra]) as m:
        outs = asyncio.run(_generate_all(m.address, prompts, MAX_NEW))
    for prompt, exp, out in zip(prompts, expected, outs):
        assert out.token_ids == exp, f"prompt of {len(prompt)} tokens diverged"
        assert out.prompt_tokens == len(prompt)
        assert out.completion_tokens == len(exp)
        assert out.finish_reason in ("length", "stop")


@pytest.mark.parametrize("stages,extra", [(1, ()), (1, ("--inflight", "2")), (3, ())],
                         ids=["1stage-2deep", "1stage-1deep", "3stages"])
def test_async_scheduling_equals_transformers_where_a_decode_opens_a_block(ckpt_dir, stages, extra):
    """Greedy decodes follow the sample still in flight: a single stage takes it from its own
    device, the first of three stages from the answer passing back through it. A prompt that
    fills its last block makes the first follower open a block while the prompt's step is being
    sent (its table must not carry that block); long outputs cross several blocks. A single stage
    runs two steps ahead of the answers (three micro-batches in flight, the default) or one."""
    model_dir = ckpt_dir("llama", num_layers=3)
    prompts = random_prompts(seed=11, lengths=[32, 48, 47, 33], vocab=320)
    expected = [hf_greedy(model_dir, p, 40, ignore_eos=True) for p in prompts]
    with mesh(model_dir, stages=stages, extra=["--async-scheduling", "on", *extra]) as m:
        one_by_one = [asyncio.run(_generate_all(m.address, [p], 40, ignore_eos=True))[0] for p in prompts]
        together = asyncio.run(_generate_all(m.address, prompts, 40, ignore_eos=True))
    assert [o.token_ids for o in one_by_one] == expected
    assert [o.token_ids for o in together] == expected
