"""End to end: `stagemesh up` as subprocesses, greedy tokens equal transformers' generate.

Concurrent requests of different lengths, prompts longer than the prefill budget (chunked
prefill), 1/2/3 stages, and a tied-embedding checkpoint.
"""

from __future__ import annotations

import asyncio

import pytest

from stagemesh.cli.harness import mesh
from tests.meshes import check_mesh_greedy, generate_all
from tests.reference import hf_greedy, random_prompts

LENGTHS = [3, 17, 40, 71, 9]
MAX_NEW = 10


# Each checkpoint kind (qwen2's biases, llama3's rope scaling, sharded files, tied embeddings) is
# checked against transformers' logits at 1, 2 and 3 stages in process (test_model.py); the mesh
# has no kind-specific code, so here the stage counts and one other kind go through `up`.
@pytest.mark.parametrize(
    "kind,stages,extra",
    # 2 stages: test_families, test_gguf, test_deepseek and the API tests' meshes run it
    [("llama", 1, ()), ("llama", 3, ()),
     ("tied", 3, ("--inflight", "2")),  # fewer micro-batches in flight than stages (stages sharing a GPU)
     ],
)
def test_greedy_equals_transformers(ckpt_dir, kind, stages, extra):
    model_dir = ckpt_dir(kind, num_layers=4)
    check_mesh_greedy(model_dir, stages, random_prompts(seed=stages, lengths=LENGTHS, vocab=320), MAX_NEW, extra)


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
        one_by_one = [asyncio.run(generate_all(m.address, [p], 40, ignore_eos=True))[0] for p in prompts]
        together = asyncio.run(generate_all(m.address, prompts, 40, ignore_eos=True))
    assert [o.token_ids for o in one_by_one] == expected
    assert [o.token_ids for o in together] == expected
