"""Consul discovery: contract test of stagemesh.discovery against tests/consul_standin.py.

Consul cannot be installed on these machines; the stand-in answers only the endpoints the backend
uses and runs the gRPC health checks it is given for real. Covered: register/find/deregister with
a gRPC check (SERVING passes, NOT_SERVING does not), the ACL token on every call, the leader lock
(session, acquire, renew, TTL expiry, release), and the mesh: coordinator, cache_service, workers
and gateway started with --consul (workers and gateway without --coordinator) serve a request; a
standby coordinator stays NOT_SERVING behind the lock and takes over when the leader is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stagemesh import discovery
from stagemesh.cli.harness import stop_all
from stagemesh.client import Client
from stagemesh.healthcheck import check
from stagemesh.net import free_port
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from tests.consul_standin import ConsulStandin
from tests.redis_server import redis_server  # noqa: F401 (fixture)

TOKEN = "test-acl-token"
COORD, WORKER, GATEWAY, CACHE = (discovery.SERVICE_NAMES[k] for k in ("coordinator", "worker", "gateway", "cache"))


def _fast(url: str) -> discovery.ConsulConfig:
    return discovery.ConsulConfig(url=url, token=TOKEN, check_interval_s=0.2, session_ttl_s=1.0,
                                  lock_delay_s=0.2, poll_interval_s=0.1)


async def _health_server(status) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", status)
    return server, servicer, port


async def _until(cond, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await cond()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def test_register_find_deregister_with_grpc_checks():
    async def run():
        with ConsulStandin() as consul:
            d = discovery.Discovery(_fast(consul.url))
            up, up_servicer, up_port = await _health_server(health_pb2.HealthCheckResponse.SERVING)
            down, _, down_port = await _health_server(health_pb2.HealthCheckResponse.NOT_SERVING)
            await d.register(WORKER, "w-up", "127.0.0.1", up_port)
            await d.register(WORKER, "w-down", "127.0.0.1", down_port)
            assert await d.find(WORKER) == []  # a new check is critical until it has run and passed
            assert await _until(lambda: d.find(WORKER)) == [("127.0.0.1", up_port)]
            await up_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # now failing
            assert await _until(lambda: _empty(d.find(WORKER)))
            await up_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            assert await _until(lambda: d.find(WORKER)) == [("127.0.0.1", up_port)]
            await d.deregister("w-up")
            await d.deregister("w-down")
            assert await d.find(WORKER) == []
            await d.close()
            await up.stop(None)
            await down.stop(None)
            assert consul.tokens_seen == {TOKEN}
            assert {p.split("/")[2] for _, p in consul.requests} <= {"agent", "health"}

    asyncio.run(run())


async def _empty(coro):
    return not await coro


def test_leader_lock_acquire_renew_expire_release():
    async def run():
        with ConsulStandin(min_session_ttl_s=0) as consul:
            a, b = discovery.Discovery(_fast(consul.url)), discovery.Discovery(_fast(consul.url))
            key = discovery.LEADER_KEY
            lock_a = await a.acquire_leadership(key, "10.0.0.1:1")
            assert lock_a is not None and await b.leader(key) == "10.0.0.1:1"
            assert await b.acquire_leadership(key, "10.0.0.2:2") is None
            standby = asyncio.create_task(b.wait_for_leadership(key, "10.0.0.2:2"))
            await asyncio.sleep(2.5)  # 2.5 TTLs: renewals keep the lock
            assert not standby.done() and not lock_a.lost.is_set()
            lock_a._renewer.cancel()  # the holder freezes: its session expires after the TTL
            lock_b = await asyncio.wait_for(standby, 5)
            assert await a.leader(key) == "10.0.0.2:2"
            await lock_b.release()  # clean shutdown: free at once
            assert await a.leader(key) is None
            lock_a2 = await a.acquire_leadership(key, "10.0.0.1:1")
            assert lock_a2 is not None
            await lock_a2.release()
            await a.close()
            await b.close()
            # Consul's own minimum session TTL (10s) is what the stand-in enforces by default.
        with ConsulStandin() as strict:
            d = discovery.Discovery(_fast(strict.url))
            with pytest.raises(discovery.consul.ConsulException):
                await d.acquire_leadership("k", "v")
            await d.close()

    asyncio.run(run())


def _start(cmd: list[str], procs: list, ready: str | None = "ready", timeout_s: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(proc)
    if ready:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if ready in line:
                return proc
            if not line and proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}")
        raise RuntimeError(f"{cmd[2]} not {ready!r} in time")
    return proc


def _find(url: str, name: str) -> list[tuple[str, int]]:
    async def run():
        d = discovery.Discovery(discovery.ConsulConfig(url=url, token=TOKEN))
        try:
            return await d.find(name)
        finally:
            await d.close()

    return asyncio.run(run())


def _wait_for(fn, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_mesh_discovers_through_consul_and_standby_takes_over(ckpt_dir, tmp_path, redis_server):  # noqa: F811
    model = str(ckpt_dir("llama"))
    state = str(tmp_path / "plan.json")
    py = sys.executable
    procs: list[subprocess.Popen] = []
    with ConsulStandin(min_session_ttl_s=0) as consul:
        flags = ["--consul", consul.url, "--consul-token", TOKEN]
        cports = [free_port(), free_port()]
        coord = [py, "-m", "coordinator", "--model", model, "--stages", "2", "--block-size", "4",
                 "--state-file", state, "--consul-session-ttl-s", "2", *flags]
        try:
            _start(coord + ["--port", str(cports[0])], procs)
            # Same command, same state file: waits behind the lock, NOT_SERVING.
            _start(coord + ["--port", str(cports[1])], procs, ready="standby")
            _start([py, "-m", "cache_service", "--port", "0", "--redis", redis_server.url, *flags], procs)
            assert _wait_for(lambda: _find(consul.url, CACHE))
            for _ in range(2):  # no --coordinator: the leader is read from Consul
                _start([py, "-m", "stage_worker", "--model", model, "--port", "0", "--block-size", "4",
                        "--kv-blocks", "64", "--threads", "1", *flags], procs)
            gport = free_port()
            _start([py, "-m", "gateway", "--model", model, "--port", str(gport), *flags], procs)
            target = f"127.0.0.1:{gport}"
            with Client(target) as client:
                first = client.generate(prompt_ids=[5, 6, 7], max_tokens=3)
            assert len(first.token_ids) == 3

            assert _wait_for(lambda: len(_find(consul.url, WORKER)) == 2)
            assert _wait_for(lambda: _find(consul.url, GATEWAY)) == [("127.0.0.1", gport)]
            assert _find(consul.url, COORD) == [("127.0.0.1", cports[0])]  # the standby is critical
            assert check(f"127.0.0.1:{cports[1]}")[1] == "NOT_SERVING"

            procs[0].send_signal(signal.SIGKILL)  # the leader dies: its session expires after 2 s
            procs[0].wait()
            assert _wait_for(lambda: _find(consul.url, COORD) == [("127.0.0.1", cports[1])], 20)
            # The workers found the new leader in Consul and report to it: its plan (from the state
            # file) is ready, and every stage has loaded it.
            assert _wait_for(lambda: _plan_served(f"127.0.0.1:{cports[1]}"), 20)
            with Client(target) as client:
                after = _retry(lambda: client.generate(prompt_ids=[5, 6, 7], max_tokens=3))
            assert after.token_ids == first.token_ids  # same plan from the state file, greedy
            assert consul.tokens_seen == {TOKEN}
            assert not [r for r in consul.requests if r[1].split("/")[2] not in ("agent", "health", "session", "kv")]
        finally:
            stop_all(procs)
        # Clean shutdown deregistered every service that was still running.
        assert set(consul.services) == {discovery.service_id("coordinator", f"127.0.0.1:{cports[0]}")}


def _plan_served(coordinator: str) -> bool:
    with grpc.insecure_channel(coordinator) as channel:
        try:
            plan = pb_grpc.CoordinatorStub(channel).GetPlan(pb.GetPlanRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return plan.ready and all(st.num_blocks > 0 for r in plan.replicas for st in r.stages)


def _retry(call, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
