"""Tensor parallelism inside a stage (deepspeed.comm over gloo on the CPU): tp 1 and tp 2.

(1) shard_stage at world 1 is the unsharded stage, bit for bit; (2) two processes, a full-model
stage sharded tp=2: logits close to transformers and greedy tokens equal to its generate; (3) a
mesh whose stage workers run `--tp-size 1`/`2` (one or two stages) serves greedy requests equal to transformers.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.multiprocessing as mp

from stage_worker.attention import AttnMetadata
from stage_worker.loader import load_stage
from stage_worker.tensor_parallel import shard_stage
from stagemesh.errors import CheckpointError
from stagemesh.net import free_port
from stagemesh.cli.harness import coordinator_cmd, gateway_cmd, new_port, processes, worker_cmd
from tests.meshes import generate_all
from tests.reference import hf_greedy, random_prompts

PROMPT = [5, 9, 33, 100, 7, 250, 3]
MAX_NEW = 8
BLOCK = 4


def _greedy(model, prompt: list[int], max_new: int) -> tuple[torch.Tensor, list[int]]:
    """(prefill logits [P, V], greedy continuation) through the paged KV pool, one sequence."""
    kv = model.make_kv_cache(16, BLOCK)
    table = list(range(16))
    meta = AttnMetadata.build([(0, len(prompt), table)], BLOCK)
    hidden = model(torch.tensor(prompt), None, meta, kv)
    logits = model.compute_logits(hidden)
    out = [int(logits[-1].argmax())]
    while len(out) < max_new:
        pos = len(prompt) + len(out) - 1
        meta = AttnMetadata.build([(pos, 1, table)], BLOCK)
        hidden = model(torch.tensor(out[-1:]), None, meta, kv)
        out.append(int(model.compute_logits(hidden)[-1].argmax()))
    return logits, out


def test_world_1_is_the_unsharded_stage(ckpt_dir):
    model_dir = ckpt_dir("qwen2", num_layers=2)  # q/k/v biases: the column shards keep them
    ref, _ = load_stage(model_dir, 0, 2)
    tp, _ = load_stage(model_dir, 0, 2)
    shard_stage(tp, 0, 1)
    assert tp.make_kv_cache(1, BLOCK).num_kv_heads == ref.cfg.num_key_value_heads
    ref_logits, ref_tokens = _greedy(ref, PROMPT, MAX_NEW)
    tp_logits, tp_tokens = _greedy(tp, PROMPT, MAX_NEW)
    assert torch.equal(ref_logits, tp_logits)
    assert ref_tokens == tp_tokens


def test_indivisible_heads_are_refused(ckpt_dir):
    model, _ = load_stage(ckpt_dir("llama", num_layers=2), 0, 2)  # 2 KV heads
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        shard_stage(model, 0, 4)


def _tp_rank(rank: int, world: int, port: int, model_dir: str, results) -> None:
    torch.set_num_threads(1)
    from stage_worker.tp_group import TPGroup, load_sharded

    group = TPGroup(rank, world, port, "cpu")
    model = load_sharded(model_dir, 0, 2, group)
    kv_heads = model.make_kv_cache(1, BLOCK).num_kv_heads
    logits, tokens = _greedy(model, PROMPT, MAX_NEW)
    results.put((rank, kv_heads, logits.numpy().copy(), tokens))


def test_tp2_matches_transformers(ckpt_dir):
    from tests.reference import _load

    model_dir = ckpt_dir("llama", num_layers=2)  # 4 query heads, 2 KV heads
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_tp_rank, args=(r, 2, port, str(model_dir), results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        rank, kv_heads, logits, tokens = results.get(timeout=120)
        got[rank] = (kv_heads, torch.from_numpy(logits), tokens)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    with torch.no_grad():
        ref = _load(str(model_dir))(torch.tensor([PROMPT])).logits[0]
    expected = hf_greedy(model_dir, PROMPT, MAX_NEW, ignore_eos=True)
    for rank in (0, 1):
        kv_heads, logits, tokens = got[rank]
        assert kv_heads == 1  # the pool holds this rank's half of the KV heads
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
        assert tokens == expected


@pytest.mark.parametrize("tp_sizes", [(2,), (2, 1)], ids=["tp2", "2stages-tp2-tp1"])
def test_mesh_with_tp_stages_equals_transformers(ckpt_dir, tp_sizes):
    """One worker per entry (its --tp-size); with two stages one runs tp 2 and the other tp 1
    (the TP code path at world 1), in whichever order the coordinator assigns them."""
    model_dir = ckpt_dir("llama", num_layers=2)
    prompts = random_prompts(seed=7, lengths=[3, 17, 30], vocab=320)
    expected = [hf_greedy(model_dir, p, MAX_NEW) for p in prompts]
    cport, gport = new_port(), new_port()
    coord = f"127.0.0.1:{cport}"
    workers = [worker_cmd(model_dir, coord, new_port(), 64, "--tp-size", str(tp)) for tp in tp_sizes]
    with processes(coordinator_cmd(model_dir, cport, len(tp_sizes)), *workers,
                   gateway_cmd(model_dir, coord, gport)):
        outs = asyncio.run(generate_all(f"127.0.0.1:{gport}", prompts, MAX_NEW))
    for prompt, exp, out in zip(prompts, expected, outs):
        assert out.token_ids == exp, f"prompt of {len(prompt)} tokens diverged"


def test_tp_refuses_what_its_shards_would_ignore():
    """The shards load as the checkpoint is: --quantization and --load-format dummy are refused
    with --tp-size at parse time, not silently dropped."""
    from stage_worker.config import WorkerConfig

    for extra in ({"quantization": "fp8"}, {"quantization": "fp8-channel"}, {"load_format": "dummy"}):
        with pytest.raises(ValueError, match="--tp-size takes neither"):
            WorkerConfig(model_dir="m", tp_size=2, **extra)
    assert WorkerConfig(model_dir="m", quantization="fp8").tp_size == 0
    assert WorkerConfig(model_dir="m", tp_size=2, kv_cache_dtype="fp8").tp_size == 2
