"""Measured plans and live rebalancing with real processes.

A worker slowed by a factor gets fewer layers at planning time; a slowdown injected mid-run
makes the coordinator move layer boundaries while requests stream, and every output still
equals transformers' greedy output.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import grpc

from stagemesh.client import AsyncClient
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from stagemesh.cli.harness import coordinator_cmd, gateway_cmd, new_port, processes, worker_cmd
from tests.reference import hf_greedy, random_prompts


def get_plan(coordinator: str) -> pb.Plan:
    with grpc.insecure_channel(coordinator) as ch:
        return pb_grpc.CoordinatorStub(ch).GetPlan(pb.GetPlanRequest(), timeout=5)


def wait_ready(coordinator: str, timeout_s: float = 60) -> pb.Plan:
    deadline = time.monotonic() + timeout_s
    while True:
        plan = get_plan(coordinator)
        if plan.ready:
            return plan
        assert time.monotonic() < deadline
        time.sleep(0.1)


def live_rebalance_mesh(model_dir, *coord_args: str):
    """(coordinator, gateway port, worker ports, commands) of a 2-stage mesh, uniform plan, that
    rebalances after 0.5 s of imbalance with no minimum interval."""
    cport, gport = new_port(), new_port()
    coord = f"127.0.0.1:{cport}"
    wports = [new_port() for _ in range(2)]
    cmds = [coordinator_cmd(model_dir, cport, 2, "--plan", "uniform", "--rebalance-window-s", "0.5",
                            "--rebalance-min-interval-s", "0", *coord_args)]
    # The tests slow a worker down mid-run with Stage.SetSlowdown, a test control.
    cmds += [worker_cmd(model_dir, coord, p, 64, "--enable-test-controls") for p in wports]
    cmds.append(gateway_cmd(model_dir, coord, gport))
    return coord, gport, wports, cmds


def test_slow_worker_gets_fewer_layers(ckpt_dir):
    model_dir = ckpt_dir("llama", num_layers=6)
    cport = new_port()
    coord = f"127.0.0.1:{cport}"
    cmds = [coordinator_cmd(model_dir, cport, 3, "--no-rebalance")]
    cmds += [worker_cmd(model_dir, coord, new_port(), 64, *(["--slowdown", "6"] if i == 1 else []))
             for i in range(3)]
    with processes(*cmds):
        plan = wait_ready(coord)
    sizes = [s.layer_end - s.layer_start for s in plan.replicas[0].stages]
    # The slowed worker gets one layer where the uniform plan gives two. How the other five split
    # depends on the two fast workers' own measurements, which on this shared 2-core machine have
    # differed up to 4x ([1, 1, 4] was planned then): not asserted.
    assert sum(sizes) == 6 and min(sizes) >= 1
    assert sizes[1] == 1


def test_explicit_split_overrides_the_measured_plan(ckpt_dir):
    model_dir = ckpt_dir("llama", num_layers=6)
    cport = new_port()
    coord = f"127.0.0.1:{cport}"
    cmds = [coordinator_cmd(model_dir, cport, 2, "--split", "5,1", "--no-rebalance")]
    cmds += [worker_cmd(model_dir, coord, new_port()) for _ in range(2)]
    with processes(*cmds):
        plan = wait_ready(coord)
    assert [(s.layer_start, s.layer_end) for s in plan.replicas[0].stages] == [(0, 5), (5, 6)]


def test_live_rebalance_during_generation_keeps_outputs_exact(ckpt_dir):
    model_dir = ckpt_dir("llama", num_layers=6)
    prompts = random_prompts(3, [5, 12, 30, 8, 20, 16, 9, 25], 320)
    new = 40
    expected = [hf_greedy(model_dir, p, new, ignore_eos=True) for p in prompts]
    coord, gport, wports, cmds = live_rebalance_mesh(model_dir)
    with processes(*cmds):
        before = wait_ready(coord)
        assert [(s.layer_start, s.layer_end) for s in before.replicas[0].stages] == [(0, 3), (3, 6)]

        async def run():
            """Waves of requests until the plan has changed under them (bounded by time)."""
            waves = []
            async with AsyncClient(f"127.0.0.1:{gport}") as client:
                deadline = time.monotonic() + 90
                while True:
                    tasks = [asyncio.create_task(client.generate(prompt_ids=p, max_tokens=new, ignore_eos=True,
                                                                 timeout=120)) for p in prompts]
                    if not waves:
                        await asyncio.sleep(0.3)
                        async with grpc.aio.insecure_channel(f"127.0.0.1:{wports[0]}") as ch:
                            await pb_grpc.StageStub(ch).SetSlowdown(pb.SetSlowdownRequest(factor=8.0))
                    waves.append(await asyncio.gather(*tasks))
                    if get_plan(coord).epoch > before.epoch or time.monotonic() > deadline:
                        return waves

        waves = asyncio.run(run())
        after = wait_ready(coord)
    assert after.epoch > before.epoch, "no rebalance happened"
    ranges = [(s.layer_start, s.layer_end) for s in after.replicas[0].stages]
    assert ranges[0][1] < 3, f"the slowed first stage kept its layers: {ranges}"
    for outs in waves:  # requests in flight while the boundaries moved included
        assert [o.token_ids for o in outs] == expected


def test_a_move_no_worker_can_load_is_undone_and_serving_goes_on(ckpt_dir, tmp_path):
    """A live move whose new layers fail to load (here the weights file is gone; on a GPU, out of
    memory) must not kill the worker: it keeps serving its old layers, the coordinator brings the
    old plan back after --rebalance-load-timeout-s, and every output is still exact."""
    src = ckpt_dir("llama", num_layers=6)
    model_dir = tmp_path / "m"
    shutil.copytree(src, model_dir)
    prompts = random_prompts(4, [7, 15, 22, 10], 320)
    new = 24
    expected = [hf_greedy(model_dir, p, new, ignore_eos=True) for p in prompts]
    coord, gport, wports, cmds = live_rebalance_mesh(model_dir, "--rebalance-load-timeout-s", "2")
    weights = next(model_dir.glob("*.safetensors"))
    with processes(*cmds) as procs:
        before = wait_ready(coord)
        uniform = [(s.layer_start, s.layer_end) for s in before.replicas[0].stages]
        weights.rename(model_dir / "moved-away.bin")  # every load from now on fails

        async def run():
            waves, epochs = [], {before.epoch}
            async with AsyncClient(f"127.0.0.1:{gport}") as client:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{wports[0]}") as ch:
                    await pb_grpc.StageStub(ch).SetSlowdown(pb.SetSlowdownRequest(factor=8.0))
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    waves.append(await asyncio.gather(*[
                        client.generate(prompt_ids=p, max_tokens=new, ignore_eos=True, timeout=120) for p in prompts]))
                    plan = get_plan(coord)
                    epochs.add(plan.epoch)
                    ranges = [(s.layer_start, s.layer_end) for s in plan.replicas[0].stages]
                    if plan.epoch >= before.epoch + 2 and plan.ready and ranges == uniform:
                        break  # moved, failed, undone
            return waves, plan

        waves, plan = asyncio.run(run())
        alive = [p.poll() is None for p in procs]
        weights_back = model_dir / "moved-away.bin"
        weights_back.rename(weights)
    assert plan.epoch >= before.epoch + 2, "no move was tried and undone"
    assert [(s.layer_start, s.layer_end) for s in plan.replicas[0].stages] == uniform
    assert all(alive), f"a process died: {alive}"
    for outs in waves:
        assert [o.token_ids for o in outs] == expected
