"""Faults as users meet them: the mesh runs under `stagemesh up` (which restarts children that
exit), and each fault is injected by PID while requests stream.

One mesh for the module: 2 stages x 2 replicas + 1 spare, with the Redis-backed prefix index
(a real redis-server). A fault-free run of the workload gives the expected tokens (greedy, and
seeded sampling on every third request); each scenario runs the same workload with one fault and
checks that
- no request is lost (the gateway-kill scenario: a client that retries on UNAVAILABLE loses none),
- every request's tokens equal the fault-free run's,
- KV goes back to 0 blocks / 0 sequences on every worker (`stagemesh status` and each worker's Stats),
- the fault landed mid-stream: at the fault moment some requests had tokens and were not finished,
  and those got more tokens after it,
- the mesh is whole again afterwards (plan ready, the restarted child back on its address, a spare
  registered).
A scenario that leaves the mesh broken fails; the next one then starts on a fresh mesh.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import signal
import time

import grpc
import psutil
import pytest
import redis

from stagemesh.client import AsyncClient
from stagemesh.cli.status import collect
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from stagemesh.cli.harness import mesh
from tests.redis_server import redis_server  # noqa: F401 (module fixture)
from tests.reference import random_prompts

N = 24
STAGES, REPLICAS, SPARES = 2, 2, 1
MID_STREAM = N // 4  # requests that must be mid-stream at the fault moment
DEEP = 12  # ...with at least this many tokens each, so a replay re-prefills generated tokens too
RECOVER_S = 60  # bound on waits for recovery (a failing test, not a hang)


def workload() -> list[dict]:
    rng = random.Random(16)
    prompts = random_prompts(16, [rng.randint(4, 40) for _ in range(N)], 320)
    reqs = []
    for i, p in enumerate(prompts):
        kw = dict(prompt_ids=p, max_tokens=rng.randint(48, 96), ignore_eos=True)
        if i % 3 == 0:  # seeded sampling must replay to the same tokens too
            kw.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        reqs.append(kw)
    return reqs


# -- the shared mesh -----------------------------------------------------------------------------
class Shared:
    """The module's `up` mesh; started again if a scenario left it broken."""

    def __init__(self, model_dir, redis_url: str):
        self.model_dir, self.redis_url = model_dir, redis_url
        self._cm = None
        self.m = None

    def start(self):
        self._cm = mesh(self.model_dir, stages=STAGES, replicas=REPLICAS, timeout_s=180, extra=[
            "--spares", str(SPARES), "--redis", self.redis_url, "--kv-blocks", "512", "--threads", "1",
            "--max-batched-tokens", "256"])
        self.m = self._cm.__enter__()
        return self.m

    def stop(self):
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None

    def healthy(self, timeout_s: float):
        """Whole and holding no KV, so that a scenario fails only for what its own fault did."""
        if self.m is None or self.m.proc.poll() is not None:
            return False
        try:
            wait_whole(self.m, timeout_s)
            wait_kv_zero(self.m, timeout_s=5)
            return True
        except (AssertionError, grpc.RpcError):
            return False


@pytest.fixture(scope="module")
def shared(ckpt_dir, redis_server):  # noqa: F811
    s = Shared(ckpt_dir("llama", num_layers=4), redis_server.url)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def up(shared):
    """The shared mesh, whole: plan ready and a spare registered (a fresh mesh if it is not)."""
    if not shared.healthy(timeout_s=20):
        shared.stop()
        shared.start()
        wait_whole(shared.m, RECOVER_S)
    return shared.m


@pytest.fixture(scope="module")
def expected(shared):
    wait_whole(shared.m, RECOVER_S)
    run = Run(workload())
    asyncio.run(run.drive(shared.m.address))
    assert all(run.done) and not run.errors, run.errors
    return run.tokens


# -- driving requests ----------------------------------------------------------------------------
class Run:
    """One pass of the workload, streamed, with each request's progress visible while it runs."""

    def __init__(self, reqs: list[dict], retry_unavailable: bool = False):
        self.reqs = reqs
        self.tokens: list[list[int]] = [[] for _ in reqs]
        self.done = [False] * len(reqs)
        self.cancelled = [False] * len(reqs)
        self.errors: dict[int, str] = {}
        self.client_saw: list[str] = []  # errors a retrying client got before succeeding
        self.retry_unavailable = retry_unavailable
        self.calls: dict[int, object] = {}
        self.cancel_after: dict[int, float] = {}  # request -> cancel at its first token after this time

    def mid_stream(self) -> list[int]:
        return [i for i in range(len(self.reqs)) if self.tokens[i] and not self.done[i] and not self.cancelled[i]]

    def counts(self) -> list[int]:
        return [len(t) for t in self.tokens]

    async def drive(self, address: str, fault=None) -> None:
        async with AsyncClient(address) as client:
            tasks = [asyncio.create_task(self._one(client, i)) for i in range(len(self.reqs))]
            if fault is not None:
                await fault(self)
            await asyncio.gather(*tasks)

    async def _one(self, client: AsyncClient, i: int) -> None:
        deadline = time.monotonic() + 180
        while True:
            self.tokens[i] = []
            call = self.calls[i] = client.stream(timeout=120, **self.reqs[i])
            try:
                async for msg in call:
                    self.tokens[i].extend(msg.token_ids)
                    if i in self.cancel_after and time.monotonic() > self.cancel_after[i]:
                        self.cancelled[i] = True
                        call.cancel()
                        return
                self.done[i] = True
                return
            except asyncio.CancelledError:
                if self.cancelled[i]:
                    return
                raise
            except grpc.aio.AioRpcError as exc:
                if self.cancelled[i]:
                    return
                retry = self.retry_unavailable and exc.code() == grpc.StatusCode.UNAVAILABLE
                if not retry or time.monotonic() > deadline:
                    self.errors[i] = f"{exc.code().name}: {exc.details()}"
                    return
                self.client_saw.append(exc.code().name)
                await asyncio.sleep(0.2)

    async def until_mid_stream(self, n: int, timeout_s: float = RECOVER_S) -> list[int]:
        """Wait until at least n requests are mid-stream with DEEP tokens or more; returns the
        requests mid-stream then."""
        deadline = time.monotonic() + timeout_s
        while len([i for i in self.mid_stream() if len(self.tokens[i]) >= DEEP]) < n:
            assert time.monotonic() < deadline, f"never {n} requests mid-stream: counts {self.counts()}"
            assert not all(self.done), "every request finished before the fault"
            await asyncio.sleep(0.01)
        return self.mid_stream()


def drive_faulted(m, act, retry_unavailable: bool = False) -> tuple[Run, dict]:
    """Drive the workload and, once MID_STREAM requests are mid-stream, note which (seen["mid"],
    seen["counts"]) and run `act(run, seen)`, plain or async: the fault."""
    seen: dict = {}

    async def fault(run: Run):
        seen["mid"] = await run.until_mid_stream(MID_STREAM)
        seen["counts"] = run.counts()
        done = act(run, seen)
        if inspect.isawaitable(done):
            await done

    run = Run(workload(), retry_unavailable)
    asyncio.run(run.drive(m.address, fault))
    return run, seen


def kill(pid: int, sig: int = signal.SIGKILL):
    return lambda run, seen: os.kill(pid, sig)


def check_landed(run: Run, mid: list[int], counts_at_fault: list[int]) -> None:
    """The fault landed mid-stream: enough requests were, and they went on streaming after it."""
    assert len(mid) >= MID_STREAM, f"only {len(mid)} requests mid-stream at the fault"
    resumed = [i for i in mid if run.done[i] and len(run.tokens[i]) > counts_at_fault[i]]
    assert len(resumed) >= MID_STREAM, f"mid-stream at the fault: {mid}; resumed after it: {resumed}"
    before, total = sum(counts_at_fault), sum(len(t) for t in run.tokens)
    print(f"fault landed with {len(mid)}/{len(run.reqs)} requests mid-stream; tokens {before} before it, "
          f"{total - before} after")


def check_tokens(run: Run, expected: list[list[int]]) -> None:
    assert not run.errors, f"requests lost: {run.errors}"
    for i, got in enumerate(run.tokens):
        if run.cancelled[i]:
            assert got == expected[i][:len(got)], f"request {i} (cancelled) diverged"
        else:
            assert run.done[i], f"request {i} did not finish"
            assert got == expected[i], f"request {i}: {len(got)} tokens, differs from the fault-free run"


# -- the mesh's state ----------------------------------------------------------------------------
def get_plan(m) -> pb.Plan:
    with grpc.insecure_channel(m.coordinator) as ch:
        return pb_grpc.CoordinatorStub(ch).GetPlan(pb.GetPlanRequest(), timeout=5)


def plan_workers(m) -> list[str]:
    return [s.address for r in get_plan(m).replicas for s in r.stages]


def worker_addresses(m) -> list[str]:
    out = []
    for child in m.children("stage_worker"):
        cmd = child.cmdline()
        out.append(f"{cmd[cmd.index('--host') + 1]}:{cmd[cmd.index('--port') + 1]}")
    return out


def wait_whole(m, timeout_s: float = RECOVER_S) -> pb.Plan:
    """Until the plan is ready with every replica at full stages and a spare registered."""
    deadline = time.monotonic() + timeout_s
    while True:
        why = ""
        try:
            plan = get_plan(m)
            shape = [len(r.stages) for r in plan.replicas]
            if not plan.ready:
                why = f"plan not ready: {plan.not_ready_reason or '?'}"
            elif shape != [STAGES] * REPLICAS:
                why = f"plan stages per replica {shape}"
            elif len(plan.spares) < SPARES:
                why = f"spares {len(plan.spares)} < {SPARES}"
            elif len(m.children("stage_worker")) != STAGES * REPLICAS + SPARES:
                why = "worker processes missing"
            else:
                return plan
        except grpc.RpcError as exc:
            why = f"coordinator: {exc.code().name}"
        assert m.proc.poll() is None, f"up exited {m.proc.returncode}: {m.stderr_tail()}"
        assert time.monotonic() < deadline, f"mesh not whole after {timeout_s}s: {why}"
        time.sleep(0.1)


def kv_held(m) -> list:
    """(source, address, blocks, sequences) of every stage that still holds KV: the plan's stages
    as `stagemesh status --json` reports them, and every worker process of `up` (spares too)."""
    status = asyncio.run(collect(m.coordinator))
    held = [("status", s["address"], s.get("kv_blocks_used", "?"), s.get("live_sequences", "?"))
            for r in status["replicas"] for s in r["stages"]
            if not s["reachable"] or s["kv_blocks_used"] or s["live_sequences"]]
    plan = {s["address"] for r in status["replicas"] for s in r["stages"]}
    for address in worker_addresses(m):
        if address in plan:
            continue  # status asked it already
        with grpc.insecure_channel(address) as ch:
            st = pb_grpc.StageStub(ch).Stats(pb.StatsRequest(), timeout=5)
        if st.blocks_in_use or st.live_sequences:
            held.append(("spare", address, st.blocks_in_use, st.live_sequences))
    return held


def wait_kv_zero(m, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            held = kv_held(m)
        except grpc.RpcError as exc:
            held = [f"unreachable: {exc.code().name}"]
        if not held:
            return
        assert time.monotonic() < deadline, f"KV still held after {timeout_s}s (source, address, blocks, seqs): {held}"
        time.sleep(0.2)


def finish(m, run: Run, expected, restarted: tuple[str, str, int] | None = None) -> None:
    """The checks every scenario ends with. `restarted`: (module, address, old pid) that up restarts."""
    check_tokens(run, expected)
    if restarted is not None:
        module, address, old = restarted
        m.wait_child(module, address, not_pid=old)
    wait_whole(m)
    wait_kv_zero(m)


# -- scenarios -----------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", [(0, 0), (1, 1)], ids=["r0-stage0", "r1-last-stage"])
def test_kill9_plan_worker(up, expected, victim):
    """kill -9 of a plan worker: a spare takes its layers; up restarts it and it joins as a spare."""
    plan0 = get_plan(up)
    address = plan0.replicas[victim[0]].stages[victim[1]].address
    pid = up.pid_at("stage_worker", address)
    run, seen = drive_faulted(up, kill(pid))
    check_landed(run, seen["mid"], seen["counts"])
    finish(up, run, expected, restarted=("stage_worker", address, pid))
    epoch = get_plan(up).epoch
    assert epoch > plan0.epoch, "the plan never changed: no failover happened"
    print(f"plan epoch {plan0.epoch} -> {epoch}; {address} restarted, plan {plan_workers(up)}")


def test_sigstop_plan_worker(up, expected):
    """SIGSTOP of a plan worker (a hung host): it is declared dead, a spare takes over; resumed
    later, it comes back as a spare and keeps no KV of the old plan."""
    plan0 = get_plan(up)
    address = plan0.replicas[1].stages[0].address
    pid = up.pid_at("stage_worker", address)
    try:
        run, seen = drive_faulted(up, kill(pid, signal.SIGSTOP))
        moved = address not in plan_workers(up)
    finally:
        os.kill(pid, signal.SIGCONT)
    check_landed(run, seen["mid"], seen["counts"])
    assert moved, "the stopped worker is still in the plan: requests finished without a failover"
    finish(up, run, expected)


def test_two_workers_killed_with_one_spare(up, expected):
    """Two plan workers killed at once, one spare: one replica takes the spare, the other runs
    spread over its survivor; the workers up restarts fold it back to full stages."""
    plan0 = get_plan(up)
    victims = [plan0.replicas[0].stages[0].address, plan0.replicas[1].stages[1].address]
    pids = [up.pid_at("stage_worker", a) for a in victims]

    async def act(run: Run, seen: dict):
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + RECOVER_S
        while True:  # the spread: a replica with fewer stages than asked, while requests stream
            shape = sorted(len(r.stages) for r in get_plan(up).replicas)
            if shape == [1, STAGES]:
                break
            assert time.monotonic() < deadline, f"no replica ran spread over its survivor: stages {shape}"
            await asyncio.sleep(0.05)
        seen["spread_mid"] = run.mid_stream()

    run, seen = drive_faulted(up, act)
    check_landed(run, seen["mid"], seen["counts"])
    assert seen["spread_mid"], "every request had finished before the replica ran spread"
    for address, pid in zip(victims, pids):
        up.wait_child("stage_worker", address, not_pid=pid)
    finish(up, run, expected)  # wait_whole: STAGES stages per replica again, and a spare


def test_cancellations_during_a_failover(up, expected):
    """Requests cancelled at the kill and during the replay after it: the rest unaffected, no KV kept."""
    address = get_plan(up).replicas[0].stages[1].address
    pid = up.pid_at("stage_worker", address)
    at_kill = set(range(0, N, 6))  # cancelled at the kill moment
    in_replay = set(range(3, N, 6))  # cancelled at their first token after the kill

    async def act(run: Run, seen: dict):
        for i in in_replay:
            run.cancel_after[i] = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for i in at_kill:
            if not run.done[i]:
                run.cancelled[i] = True
                run.calls[i].cancel()

    run, seen = drive_faulted(up, act)
    check_landed(run, [i for i in seen["mid"] if i not in at_kill | in_replay], seen["counts"])
    assert sum(run.cancelled) >= 4, f"only {sum(run.cancelled)} requests were cancelled mid-stream"
    finish(up, run, expected, restarted=("stage_worker", address, pid))


def test_redis_restarted_empty(up, expected, redis_server):  # noqa: F811
    """Redis restarts empty mid-stream: serving goes on, and the gateway republishes its index."""
    r = redis.Redis.from_url(redis_server.url)

    async def act(run: Run, seen: dict):
        seen["keys"] = set(r.keys(b"sm:v1:b:*"))
        await asyncio.get_running_loop().run_in_executor(None, redis_server.restart)
        seen["after_restart"] = len(r.keys(b"sm:v1:b:*"))

    run, seen = drive_faulted(up, act)
    check_landed(run, seen["mid"], seen["counts"])
    assert seen["keys"], "the index was empty before the restart: nothing to lose"
    finish(up, run, expected)
    deadline = time.monotonic() + 20
    while True:  # every block indexed before the restart is cached still, so indexed again
        missing = seen["keys"] - set(r.keys(b"sm:v1:b:*"))
        if not missing:
            break
        assert time.monotonic() < deadline, (
            f"{len(missing)} of {len(seen['keys'])} block keys still missing 20s after Redis came back empty")
        time.sleep(0.2)


def test_cache_service_killed(up, expected):
    """kill -9 of cache_service: the gateway matches prefixes locally meanwhile; up restarts it on
    the same port."""
    (proc,) = up.children("cache_service")
    cmd = proc.cmdline()
    address = f"{cmd[cmd.index('--host') + 1]}:{cmd[cmd.index('--port') + 1]}"
    run, seen = drive_faulted(up, kill(proc.pid))
    check_landed(run, seen["mid"], seen["counts"])
    finish(up, run, expected, restarted=("cache_service", address, proc.pid))


def test_gateway_killed_and_restarted(up, expected):
    """kill -9 of the gateway: its streams fail with UNAVAILABLE (the requests lived in it); up
    restarts it on the same port and a client that retries gets exactly the same tokens. The old
    gateway's KV must not stay pinned on the stages."""
    pid = up.pid_at("gateway", up.address)
    run, seen = drive_faulted(up, kill(pid), retry_unavailable=True)
    assert len(seen["mid"]) >= MID_STREAM, f"only {len(seen['mid'])} requests mid-stream at the kill"
    assert run.client_saw and set(run.client_saw) == {"UNAVAILABLE"}, run.client_saw
    print(f"gateway killed with {len(seen['mid'])}/{N} requests mid-stream; the client saw "
          f"{len(run.client_saw)} UNAVAILABLE and retried")
    finish(up, run, expected, restarted=("gateway", up.address, pid))


def test_coordinator_kill9(up, expected):
    """kill -9 of the coordinator: serving goes on; up restarts it on the same address from its
    state file, and the workers re-register under the same plan."""
    plan0 = get_plan(up)
    pid = up.pid_at("coordinator", up.coordinator)
    run, seen = drive_faulted(up, kill(pid))
    check_landed(run, seen["mid"], seen["counts"])
    finish(up, run, expected, restarted=("coordinator", up.coordinator, pid))
    plan = get_plan(up)
    assert plan.epoch == plan0.epoch and plan_workers(up) == [s.address for r in plan0.replicas for s in r.stages]


def test_worker_killed_while_the_coordinator_is_down(up, expected):
    """kill -9 of the coordinator, then of a plan worker before the coordinator is back: the
    restarted coordinator finds the restored plan's dead slot and moves it to the spare."""
    address = get_plan(up).replicas[1].stages[1].address
    wpid = up.pid_at("stage_worker", address)
    cpid = up.pid_at("coordinator", up.coordinator)

    async def act(run: Run, seen: dict):
        os.kill(cpid, signal.SIGKILL)
        psutil.Process(cpid).wait(5)
        os.kill(wpid, signal.SIGKILL)
        seen["coordinator_down"] = not _answers(up.coordinator)
        seen["mid_at_worker_kill"] = run.mid_stream()

    run, seen = drive_faulted(up, act)
    assert seen["coordinator_down"], "the coordinator was back before the worker died"
    check_landed(run, seen["mid_at_worker_kill"], seen["counts"])
    finish(up, run, expected, restarted=("stage_worker", address, wpid))


def _answers(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as ch:
            pb_grpc.CoordinatorStub(ch).GetPlan(pb.GetPlanRequest(), timeout=0.2)
        return True
    except grpc.RpcError:
        return False
