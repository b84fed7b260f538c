"""Restart paths with real processes: a coordinator restarted from its state file while a plan
worker died; a gateway that has no ready plan yet; a spread replica given its stage back."""

from __future__ import annotations

import asyncio
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagemesh.client import Client
from stagemesh.cli.status import collect, render
from stagemesh.cli.harness import (
    coordinator_cmd, gateway_cmd, get_plan, manual_mesh, new_port, processes, wait_kv_free, wait_ready_line, worker_cmd,
)
from tests.reference import hf_greedy, random_prompts
from tests.test_kv_hygiene import NEW, stream_with_fault

N = 10


@pytest.fixture(scope="module")
def model_dir(ckpt_dir):
    return ckpt_dir("llama", num_layers=4)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(81, [6 + 2 * i for i in range(N)], 320)


def _until(pred, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s}s"
        time.sleep(0.1)


def test_worker_dies_while_coordinator_is_down(model_dir, prompts, tmp_path):
    state = str(tmp_path / "plan.json")
    with manual_mesh(model_dir, stages=2, spares=1, kv_blocks=256, coordinator_args=("--state-file", state)) as m:
        procs = dict(zip(m["workers"], m["procs"][1:-1]))
        # The plan is ready once two workers are in; the third registers as a spare when it can.
        _until(lambda: asyncio.run(collect(m["coordinator"]))["spares"], what="the spare registered")
        status = asyncio.run(collect(m["coordinator"]))
        chain = [s["address"] for s in status["replicas"][0]["stages"]]
        spare = next(a for a in m["workers"] if a not in chain)
        assert [(w["address"], w["reachable"]) for w in status["spares"]] == [(spare, True)]
        assert "spares: 1" in render(status)

        async def strike():
            m["procs"][0].kill()
            m["procs"][0].wait()
            procs[chain[-1]].kill()  # the last stage: the stage before it heartbeats about a pending slot
            await asyncio.sleep(1.0)
            new = subprocess.Popen(m["cmds"][0], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            m["procs"][0] = new
            await asyncio.get_running_loop().run_in_executor(None, wait_ready_line, new, "coordinator")

        outs, in_flight = asyncio.run(stream_with_fault(m["gateway"], prompts, strike))
        assert in_flight == N
        assert outs == [hf_greedy(model_dir, p, NEW, ignore_eos=True) for p in prompts]
        plan = get_plan(m["coordinator"])
        assert plan.ready and [s.address for s in plan.replicas[0].stages] == [chain[0], spare]
        assert m["procs"][0].poll() is None  # the restored coordinator never raised on the pending slot
        m["workers"] = [chain[0], spare]  # the killed one answers no Stats
        wait_kv_free(m, timeout_s=15, sequences=True)


def _health(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_gateway_health_and_errors_follow_the_plan(model_dir, prompts):
    """NOT_SERVING and UNAVAILABLE (saying why) before the first plan; SERVING once it is ready;
    in-flight requests fail UNAVAILABLE, never hang, when the plan stays not ready past the bound
    (--plan-wait-s); SERVING again once a worker comes back."""
    cport, gport, wport = new_port(), new_port(), new_port()
    coord, gw = f"127.0.0.1:{cport}", f"127.0.0.1:{gport}"
    with processes(coordinator_cmd(model_dir, cport, 1)):
        gateway = subprocess.Popen(gateway_cmd(model_dir, coord, gport, "--plan-wait-s", "2"), stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        try:
            _until(lambda: _try(_health, gw) == "NOT_SERVING", what="gateway health NOT_SERVING")
            with Client(gw) as client, pytest.raises(grpc.RpcError) as err:
                client.generate(prompt_ids=prompts[0], max_tokens=4, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "waiting for workers: 0 of 1 registered" in err.value.details()
            with processes(worker_cmd(model_dir, coord, wport, 64)) as (worker,):
                wait_ready_line(gateway, "gateway")
                assert _health(gw) == "SERVING"
                with Client(gw) as client:
                    out = client.generate(prompt_ids=prompts[0], max_tokens=4, timeout=30)
                assert out.token_ids == hf_greedy(model_dir, prompts[0], 4)

                async def kill_only_worker():
                    worker.kill()

                outs, in_flight = asyncio.run(stream_with_fault(gw, prompts, kill_only_worker))
            assert in_flight == N
            for o in outs:  # no spare, no survivor: the plan waits for a worker; nobody hangs
                assert isinstance(o, grpc.aio.AioRpcError) and o.code() == grpc.StatusCode.UNAVAILABLE, o
                assert "not ready" in o.details() and "waiting for workers: 0 of 1 registered" in o.details()
            _until(lambda: _health(gw) == "NOT_SERVING", what="gateway health NOT_SERVING in the outage")
            with processes(worker_cmd(model_dir, coord, new_port(), 64)):
                _until(lambda: _health(gw) == "SERVING", what="gateway health SERVING again")
                with Client(gw) as client:
                    out = client.generate(prompt_ids=prompts[2], max_tokens=4, timeout=30)
                assert out.token_ids == hf_greedy(model_dir, prompts[2], 4)
        finally:
            gateway.terminate()
            gateway.wait(timeout=10)


def _try(fn, *args):
    try:
        return fn(*args)
    except grpc.RpcError:
        return None


def test_spread_replica_gets_its_stage_back_from_a_joining_worker(model_dir, prompts):
    with manual_mesh(model_dir, stages=2, kv_blocks=256) as m:
        victim = m["procs"][2]  # the last stage: its layers spread onto the first worker
        victim.kill()
        victim.wait()
        _until(lambda: len(get_plan(m["coordinator"]).replicas[0].stages) == 1 and get_plan(m["coordinator"]).ready,
               what="spread over the survivor")
        port = new_port()
        joiner = f"127.0.0.1:{port}"
        with processes(worker_cmd(model_dir, m["coordinator"], port, 256)):
            _until(lambda: [s.address for s in get_plan(m["coordinator"]).replicas[0].stages] == [m["workers"][0], joiner]
                   and get_plan(m["coordinator"]).ready, what="the joining worker folded back in")
            status = asyncio.run(collect(m["coordinator"]))
            assert [s["loaded"] for s in status["replicas"][0]["stages"]] == [True, True] and status["spares"] == []
            with Client(m["gateway"]) as client:
                out = client.generate(prompt_ids=prompts[1], max_tokens=NEW, ignore_eos=True, timeout=60)
            assert out.token_ids == hf_greedy(model_dir, prompts[1], NEW, ignore_eos=True)
            m["workers"] = [m["workers"][0], joiner]
            wait_kv_free(m, timeout_s=15, sequences=True)
