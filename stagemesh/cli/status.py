"""`stagemesh status`: the coordinator's plan, and each stage worker's load and KV use.

Reads `Coordinator.GetPlan`, then asks every worker of the plan, and every spare, for
`Stage.Stats` concurrently. A worker that does not answer is shown as unreachable; the command
still succeeds, since a half-broken mesh is exactly when a person runs it. A plan that is not
ready says why (e.g. which slot waits for which worker) and for how long.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc

from stagemesh.net import GRPC_OPTIONS
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc


async def collect(coordinator: str, timeout_s: float = 5.0) -> dict:
    """The plan with each stage's live stats, as plain data (the `--json` output)."""
    async with grpc.aio.insecure_channel(coordinator, options=GRPC_OPTIONS) as channel:
        plan = await pb_grpc.CoordinatorStub(channel).GetPlan(pb.GetPlanRequest(), timeout=timeout_s)
    replicas = []
    for r_index, replica in enumerate(plan.replicas):
        stages = [
            {"stage": i, "worker_id": s.worker_id, "address": s.address, "layer_start": s.layer_start,
             "layer_end": s.layer_end, "num_blocks": s.num_blocks, "loaded": s.loaded}
            for i, s in enumerate(replica.stages)
        ]
        replicas.append({"replica": r_index, "num_blocks": replica.num_blocks, "stages": stages})
    spares = [{"worker_id": w.worker_id, "address": w.address} for w in plan.spares]
    every_worker = [s for r in replicas for s in r["stages"]] + spares
    stats = await asyncio.gather(*(_stats(s["address"], timeout_s) for s in every_worker))
    for worker, st in zip(every_worker, stats):
        worker.update(st)
    return {"coordinator": coordinator, "epoch": plan.epoch, "ready": plan.ready,
            "not_ready_reason": plan.not_ready_reason, "not_ready_s": round(plan.not_ready_ms / 1e3, 1),
            "num_layers": plan.num_layers_total, "block_size": plan.block_size, "replicas": replicas,
            "spares": spares}


async def _stats(address: str, timeout_s: float) -> dict:
    try:
        async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
            st = await pb_grpc.StageStub(channel).Stats(pb.StatsRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return {"reachable": False, "error": f"{exc.code().name}: {exc.details()}"}
    return {"reachable": True, "loaded_epoch": st.epoch, "live_sequences": st.live_sequences,
            "steps": st.steps, "mean_step_ms": round(st.mean_step_us / 1e3, 3),
            "compute_s_total": round(st.compute_us_total / 1e6, 3),
            "gpu_wait_s_total": round(st.gpu_wait_us_total / 1e6, 3),
            "kv_blocks_total": st.num_blocks, "kv_blocks_used": st.blocks_in_use}


def render(status: dict) -> str:
    """Human-readable form: one header line, then one line per stage."""
    lines = [f"coordinator {status['coordinator']}: plan epoch {status['epoch']} "
             f"({'ready' if status['ready'] else 'not ready'}), {status['num_layers']} layers, "
             f"{len(status['replicas'])} replica(s), block size {status['block_size']}"]
    if not status["ready"]:
        lines.append(f"not ready for {status['not_ready_s']:.1f}s: {status['not_ready_reason']}")
    for r in status["replicas"]:
        lines.append(f"replica {r['replica']}: {r['num_blocks']} KV blocks")
        lines.append(f"  {'stage':>5}  {'worker':<8} {'address':<22} {'layers':<10} {'seqs':>5} {'steps':>8} "
                     f"{'step ms':>8}  kv used")
        for s in r["stages"]:
            layers = f"[{s['layer_start']},{s['layer_end']})"
            head = f"  {s['stage']:>5}  {s['worker_id']:<8} {s['address']:<22} {layers:<10}"
            if not s["reachable"]:
                lines.append(f"{head} unreachable ({s['error']})")
                continue
            total = s["kv_blocks_total"]
            pct = 100.0 * s["kv_blocks_used"] / total if total else 0.0
            loading = "" if s["loaded"] else "  (loading)"
            lines.append(f"{head} {s['live_sequences']:>5} {s['steps']:>8} {s['mean_step_ms']:>8.2f}  "
                         f"{s['kv_blocks_used']}/{total} ({pct:.0f}%){loading}")
    lines.append(f"spares: {len(status['spares'])}" if status["spares"] else "spares: none")
    for w in status["spares"]:
        state = (f"reachable, {w['kv_blocks_used']}/{w['kv_blocks_total']} KV blocks used" if w["reachable"]
                 else f"unreachable ({w['error']})")
        lines.append(f"  {w['worker_id']:<8} {w['address']:<22} {state}")
    return "\n".join(lines)


def run(coordinator: str, as_json: bool, timeout_s: float = 5.0) -> int:
    try:
        status = asyncio.run(collect(coordinator, timeout_s))
    except grpc.aio.AioRpcError as exc:
        message = f"coordinator {coordinator}: {exc.code().name}: {exc.details()}"
        if as_json:
            print(json.dumps({"error": message}))
        else:
            print(f"stagemesh status: {message}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if as_json else render(status))
    return 0
