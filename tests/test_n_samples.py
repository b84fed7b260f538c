"""n samples of one prompt, the API key's reach, min_tokens with a grammar, through a real mesh.

One mesh for the module (coordinator, two stage workers and a gateway with --http-port and an API
key, as separate processes; the demo checkpoint): `Client.generate` and `stagemesh generate
--json` collect every sample of n > 1 (the fields of n = 1 unchanged, sample 0's); only the /v1
HTTP API needs the key, as in vLLM; min_tokens holds EOS back while a grammar may go on, and
lets a complete answer stop short of it (vLLM's terminal-grammar rule).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import requests
import torch

from gateway.block_manager import BlockManager
from gateway.scheduler import Scheduler, SchedulerConfig, StepShape
from gateway.sequence import Sequence, Status
from stage_worker.kv_cache import PagedKVCache
from stage_worker.mla_cache import MLAKVCache
from stage_worker.step_input import StageShape, decode
from stagemesh.cli.demo_model import write_demo_model
from stagemesh.errors import InvalidArgument
from stagemesh.cli.harness import manual_mesh, new_port, stage_stats, stagemesh_cmd, wait_kv_free
from tests.meshes import peak_kv_blocks
from stagemesh.client import Client
from stagemesh.sampling import sample_seed
from stagemesh.v1 import stagemesh_pb2 as pb

KEY = "sk-n-samples"
PROMPT_IDS = [5, 61, 300, 12, 91, 7, 44, 230, 18, 9, 150, 33, 70, 8]  # 14 tokens: a partial last block
SAMPLED = dict(prompt_ids=PROMPT_IDS, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    model_dir = write_demo_model(tmp_path_factory.mktemp("demo"))
    http_port = new_port()
    with manual_mesh(model_dir, stages=2, kv_blocks=128,
                     gateway_args=("--http-port", str(http_port), "--api-key", KEY)) as m:
        m["base"] = f"http://127.0.0.1:{http_port}"
        m["client"] = Client(m["gateway"], api_key=KEY)
        yield m
        m["client"].close()


def run_cli(*args) -> dict:
    res = subprocess.run([*stagemesh_cmd(), *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# --- n samples fork the prompt's KV -----------------------------------------------------------------------


def _samples(n: int, prompt_len: int) -> list[Sequence]:
    lead = Sequence(seq_id=1, prompt_ids=list(range(1, prompt_len + 1)), max_tokens=3)
    return [lead] + [Sequence(seq_id=i + 1, prompt_ids=list(lead.prompt_ids), max_tokens=3, fork_of=lead)
                     for i in range(1, n)]


def test_scheduler_forks_samples_after_the_prompt_and_copies_the_partial_block():
    bm = BlockManager(32, 4, "m")
    s = Scheduler(SchedulerConfig(max_batched_tokens=64), bm, StepShape(inflight_target=1))
    lead, *rest = _samples(3, 10)  # blocks: [0-3] [4-7] [8, 9 | partial]
    for q in (lead, *rest):
        s.add(q)
    first = s.schedule()  # only sample 0 computes the prompt: the others wait for it
    assert [(c.seq.seq_id, c.num_tokens) for c in first.chunks] == [(1, 10)] and not first.block_copies
    s.update(first, {c.wire_id: 5 for c in first.chunks})
    second = s.schedule()  # sample 0's decode; the others: only the prompt's last token each
    forked = [c for c in second.chunks if c.seq.seq_id != 1]
    assert [(c.start_pos, c.num_tokens, c.sample, c.is_new) for c in forked] == [(9, 1, True, True)] * 2
    lead_table = s.admission(lead).block_table
    tables = [c.admission.block_table for c in forked]
    assert all(t[:2] == lead_table[:2] and t[2] not in lead_table for t in tables)  # full blocks shared
    assert second.block_copies == [(lead_table[2], t[2]) for t in tables]  # the partial one copied
    assert bm.blocks[lead_table[2]].ref_count == 3  # held by the copies until they ran
    s.update(second, None)  # the step failed: the stages may have missed the copies, sent again
    again = s.schedule()
    assert sorted(again.block_copies) == sorted(second.block_copies)
    s.update(again, {c.wire_id: 6 for c in again.chunks})
    assert bm.blocks[lead_table[2]].ref_count == 1 and bm.blocks[lead_table[0]].ref_count == 3
    while s.has_work():
        plan = s.schedule()
        for q in s.update(plan, {c.wire_id: 7 for c in plan.chunks}):
            if len(q.output_ids) >= q.max_tokens:
                s.finish(q, "length")
    assert all(q.status == Status.FINISHED for q in (lead, *rest)) and bm.num_free == 32 and bm.num_tracked == 0


def test_a_sample_whose_sample_0_is_gone_is_admitted_as_any_sequence():
    bm = BlockManager(32, 4, "m")
    s = Scheduler(SchedulerConfig(max_batched_tokens=64), bm, StepShape(inflight_target=1))
    lead, other = _samples(2, 8)  # the prompt ends on a block boundary
    s.add(lead)
    s.add(other)
    s.finish(lead, "cancelled")  # before it computed anything
    plan = s.schedule()
    assert [(c.seq.seq_id, c.start_pos, c.num_tokens) for c in plan.chunks] == [(2, 0, 8)]
    assert not plan.block_copies


@pytest.mark.parametrize("pool", [PagedKVCache(2, 6, 4, 2, 3, torch.float32), MLAKVCache(2, 6, 4, 5, 2, torch.float32)])
def test_a_stage_copies_blocks_in_every_layer(pool):
    for t in pool.tensors():
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in pool.tensors()]
    pool.copy_blocks([(1, 4), (2, 5)])
    for old, new in zip(before, pool.tensors()):
        assert torch.equal(new[16:20], old[4:8]) and torch.equal(new[20:24], old[8:12])
        assert torch.equal(new[:16], old[:16])  # nothing else moved
    shape = StageShape(True, True, 50, 4, 6, 4, "cpu")
    ok = pb.ForwardRequest(block_copies=[pb.BlockCopy(src_block_id=1, dst_block_id=4)])
    assert decode(ok, shape).block_copies == [(1, 4)]
    for pairs in ([(1, 6)], [(1, 4), (2, 4)], [(1, 4), (4, 5)]):  # outside the pool, twice, chained
        bad = pb.ForwardRequest(block_copies=[pb.BlockCopy(src_block_id=a, dst_block_id=b) for a, b in pairs])
        with pytest.raises(InvalidArgument, match="block_copies"):
            decode(bad, shape)


# --- n samples fork the prompt's KV, on the mesh -----------------------------------------------------------------------


def test_samples_fork_the_prompt_kv_once(mesh):
    prompt = list(range(100, 131))  # 31 tokens: 7 full blocks of 4, then 3 in a partial block
    n, max_tokens, kw = 3, 6, dict(prompt_ids=prompt, temperature=1.0, seed=7, ignore_eos=True, timeout=60)
    wait_kv_free(mesh)
    before = [s.tokens_total for s in stage_stats(mesh)]
    with peak_kv_blocks(mesh) as peak:
        out = mesh["client"].generate(n=n, max_tokens=max_tokens, **kw)
    computed = [s.tokens_total - b for s, b in zip(stage_stats(mesh), before)]
    # The prompt once; each other sample computes only the prompt's last token (its own first
    # sample); then every sample's decodes. (Through the prefix cache alone: 31 + 2 x 3.)
    assert computed == [len(prompt) + (n - 1) + n * (max_tokens - 1)] * 2, computed
    # Shared: the 7 full blocks; each sample: its copy of the partial block and its decode blocks
    # (3 blocks for positions 28-36). Three separate prompts would hold 3 x 10 blocks.
    assert 8 <= peak[0] <= 7 + n * 3 < n * 10, peak[0]
    assert len({tuple(c.token_ids) for c in out.choices}) == n
    for i, choice in enumerate(out.choices):  # each sample equals itself run alone, with its seed
        alone = mesh["client"].generate(max_tokens=max_tokens, **{**kw, "seed": sample_seed(7, i)})
        assert alone.token_ids == choice.token_ids, i
    wait_kv_free(mesh, sequences=True)


# --- the API key: only /v1 -----------------------------------------------------------------------------


def test_only_the_v1_api_needs_the_key(mesh):
    base, auth = mesh["base"], {"authorization": f"Bearer {KEY}"}
    assert requests.get(base + "/health", timeout=10).status_code == 200
    assert requests.get(base + "/version", timeout=10).status_code == 200
    assert "stagemesh_" in requests.get(base + "/metrics", timeout=10).text
    tok = requests.post(base + "/tokenize", json={"prompt": "The old mill"}, timeout=10)
    assert tok.status_code == 200 and tok.json()["count"] > 0
    assert requests.post(base + "/detokenize", json={"tokens": tok.json()["tokens"]}, timeout=10).status_code == 200
    for method, path, body in (("get", "/v1/models", None),
                               ("post", "/v1/completions", {"prompt": "a", "max_tokens": 1})):
        bare = getattr(requests, method)(base + path, json=body, timeout=10)
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert getattr(requests, method)(base + path, json=body, headers=auth, timeout=30).status_code == 200


# --- the client and `generate --json` with n > 1 ---------------------------------------------------------


def test_client_collects_every_sample_by_index(mesh):
    out = mesh["client"].generate(n=3, timeout=60, **SAMPLED)
    streamed: dict[int, list[int]] = {}
    for msg in mesh["client"].stream(n=3, timeout=60, **SAMPLED):
        streamed.setdefault(msg.index, []).extend(msg.token_ids)
    assert [c.token_ids for c in out.choices] == [streamed[i] for i in range(3)]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.choices)
    assert len({tuple(c.token_ids) for c in out.choices}) == 3  # each sample its own seed
    assert out.token_ids == out.choices[0].token_ids  # the fields stay sample 0's
    assert out.completion_tokens == 18 and out.prompt_tokens == len(PROMPT_IDS)
    one = mesh["client"].generate(timeout=60, **SAMPLED)
    assert one.choices == [] and one.token_ids == out.token_ids  # sample 0 = the seed itself = n=1


def test_generate_json_keeps_its_fields_and_adds_choices(mesh):
    common = ("generate", "--target", mesh["gateway"], "--api-key", KEY, "--prompt-ids",
              ",".join(map(str, PROMPT_IDS)), "--max-tokens", "6", "--temperature", "1", "--seed", "7",
              "--ignore-eos", "--json")
    one = run_cli(*common)
    assert set(one) == {"token_ids", "text", "finish_reason", "usage"}  # n = 1: the contract as it was
    assert set(one["usage"]) == {"prompt_tokens", "completion_tokens", "cached_tokens"}
    three = run_cli(*common, "--n", "3")
    assert {k: three[k] for k in ("token_ids", "text", "finish_reason")} == {
        k: one[k] for k in ("token_ids", "text", "finish_reason")}
    assert three["usage"]["completion_tokens"] == 18 and three["usage"]["prompt_tokens"] == len(PROMPT_IDS)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three["choices"][0]["token_ids"] == one["token_ids"]
    assert all(set(c) == {"index", "token_ids", "text", "finish_reason", "usage"} for c in three["choices"])


# --- min_tokens with a grammar ------------------------------------------------------------------------


def test_min_tokens_with_a_grammar_as_vllm(mesh):
    def completion(extra, **kw):
        body = {"model": "", "prompt": "The old mill", "max_tokens": 16, "temperature": 0,
                "logit_bias": {"1": 100}, **kw, **extra}  # EOS (id 1) first wherever it may come
        resp = requests.post(mesh["base"] + "/v1/completions", json=body, timeout=60,
                             headers={"authorization": f"Bearer {KEY}"})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"], resp.json()["usage"]["completion_tokens"]

    # The grammar may go on: EOS waits for min_tokens (without it, EOS comes right after one token;
    # completion_tokens counts the EOS).
    text, used = completion({"guided_regex": "[a-z ]{1,60}"})
    assert used == 2 and re.fullmatch("[a-z ]{1,60}", text)
    text, used = completion({"guided_regex": "[a-z ]{1,60}", "min_tokens": 6})
    assert used == 7 and re.fullmatch("[a-z ]{1,60}", text), (text, used)
    # The answer is complete before min_tokens: only EOS is allowed, and it stops there.
    for seed in (1, 2):
        text, used = completion({"guided_choice": ["yes", "no"], "min_tokens": 10}, temperature=1.0, seed=seed)
        assert text in ("yes", "no") and used < 10
