"""KV hygiene after faults: once the requests are done, no stage keeps a sequence or a block that
nobody owns, including a stage whose assignment a failover left unchanged (asserted: the case
test_up_faults' SIGSTOP scenario runs without checking it) and a frozen worker that came back as a
spare. Every check waits well under the stages' lease TTL (60 s), so what frees the KV is the fix,
not the expiry. A gateway killed and started over is test_up_faults::test_gateway_killed_and_restarted
(fault mid-stream, same tokens, KV back to 0 within 30 s under the same TTL)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from stagemesh.client import AsyncClient
from stagemesh.cli.harness import get_plan, manual_mesh, wait_kv_free
from tests.reference import hf_greedy, random_prompts

N, NEW = 12, 40


@pytest.fixture(scope="module")
def model_dir(ckpt_dir):
    return ckpt_dir("llama", num_layers=4)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(71, [5 + 3 * i for i in range(N)], 320)


async def stream_with_fault(address: str, prompts, strike) -> tuple[list, int]:
    """Stream every request; strike once each has its first token. Returns (outputs or the
    exception, how many requests were still streaming when the fault landed)."""
    progress, done = [0] * len(prompts), [False] * len(prompts)
    async with AsyncClient(address) as client:
        async def one(i, p):
            out = []
            try:
                async for msg in client.stream(timeout=120, prompt_ids=p, max_tokens=NEW, ignore_eos=True):
                    out.extend(msg.token_ids)
                    progress[i] = len(out)
                return out
            finally:
                done[i] = True

        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 60
        while not all(progress):
            assert time.monotonic() < deadline, "requests never started streaming"
            await asyncio.sleep(0.005)
        in_flight = sum(not d for d in done)
        await strike()
        outs = await asyncio.gather(*tasks, return_exceptions=True)
    return outs, in_flight


def test_failover_frees_superseded_generation_on_unchanged_stage(model_dir, prompts):
    with manual_mesh(model_dir, stages=2, spares=1, kv_blocks=256) as m:
        procs = dict(zip(m["workers"], m["procs"][1:-1]))
        before = get_plan(m["coordinator"])
        first, last = (s.address for s in before.replicas[0].stages)

        async def freeze_first_stage():
            os.kill(procs[first].pid, signal.SIGSTOP)

        try:
            outs, in_flight = asyncio.run(stream_with_fault(m["gateway"], prompts, freeze_first_stage))
        finally:
            os.kill(procs[first].pid, signal.SIGCONT)
        assert in_flight == N  # the fault landed while every request was streaming
        assert outs == [hf_greedy(model_dir, p, NEW, ignore_eos=True) for p in prompts]
        after = get_plan(m["coordinator"])
        chain = [s.address for s in after.replicas[0].stages]
        assert after.epoch > before.epoch and first not in chain
        assert chain[-1] == last  # the last stage kept its assignment (and, before the fix, the old KV)
        wait_kv_free(m, timeout_s=15, sequences=True)  # every worker, the thawed one (a spare now) too
