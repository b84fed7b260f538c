"""Observability end to end: one real 2-stage mesh (`stagemesh up --metrics-port BASE --redis URL`).

Prometheus endpoints are scraped over HTTP and parsed with prometheus_client's own parser; gRPC
reflection is read with grpcio-reflection's client-side descriptor database; `stagemesh status`
and `stagemesh bench` run as a user runs them, in subprocesses.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from stagemesh.client import build_request
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
from stagemesh.cli.harness import mesh, stagemesh_cmd
from tests.redis_server import redis_server  # noqa: F401  (fixture)

NUM_LAYERS = 4
KV_BLOCKS = 64
GATEWAY, COORDINATOR, CACHE_SERVICE, WORKER0 = 0, 1, 2, 10  # offsets from the metrics base port


def _free_port_block(size: int = 12) -> int:
    """A base port such that base .. base+size-1 are all free right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


@pytest.fixture(scope="module")
def running(ckpt_dir, redis_server):  # noqa: F811
    base = _free_port_block()
    model_dir = ckpt_dir("llama", num_layers=NUM_LAYERS)
    extra = ["--metrics-port", str(base), "--redis", redis_server.url, "--kv-blocks", str(KV_BLOCKS),
             "--log-level", "info"]
    with mesh(model_dir, stages=2, extra=extra) as m:
        m.metrics_base = base
        yield m


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    """Sum of a sample over every label set that includes `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def generate(address: str, prompt_ids: list[int], max_tokens: int, metadata=()) -> list:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        req = build_request(prompt_ids=prompt_ids, max_tokens=max_tokens, ignore_eos=True)
        return list(stub.Generate(req, metadata=metadata, timeout=60))


def status_json(running) -> dict:
    out = subprocess.run([*stagemesh_cmd(), "status", "--coordinator", running.coordinator, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    return json.loads(out.stdout)


def test_metrics_move_on_every_service(running):
    base = running.metrics_base
    before = scrape(base + GATEWAY)
    prompts = [[5 + i, 6, 7, 8, 9 + i] * (i + 1) for i in range(4)]
    for p in prompts:
        assert len([t for msg in generate(running.address, p, 5) for t in msg.token_ids]) == 5
    gw = scrape(base + GATEWAY)

    def delta(name, **labels):
        return value(gw, name, **labels) - value(before, name, **labels)

    assert delta("stagemesh_ttft_seconds_count") == len(prompts)
    assert delta("stagemesh_e2e_seconds_count") == len(prompts)
    assert delta("stagemesh_itl_seconds_count") == len(prompts) * (5 - 1)  # one gap per token after the first
    assert delta("stagemesh_prompt_tokens_total") == sum(map(len, prompts))
    assert delta("stagemesh_hop_seconds_count") > 0
    assert delta("stagemesh_step_turnaround_seconds_count") > 0  # a returned step refilled its slot
    assert value(gw, "stagemesh_prefix_hit_tokens_total") >= 0
    assert value(gw, "stagemesh_kv_blocks_used") + value(gw, "stagemesh_kv_blocks_free") == KV_BLOCKS
    assert value(gw, "stagemesh_queue_depth") == 0 and value(gw, "stagemesh_running_sequences") == 0
    assert ("stagemesh_replays_total", ()) in gw

    stages_stepped = set()
    for worker in (0, 1):
        samples = scrape(base + WORKER0 + worker)
        for (name, labels), v in samples.items():
            if name == "stagemesh_stage_step_seconds_count" and v > 0:
                stages_stepped.add(dict(labels)["stage"])
    assert stages_stepped == {"0", "1"}

    assert value(scrape(base + COORDINATOR), "stagemesh_rebalances_total") == 0
    assert ("stagemesh_ttft_seconds_count", ()) in scrape(base + CACHE_SERVICE)  # every metric everywhere


def test_request_id_from_metadata_reaches_the_gateway_logs(running):
    msgs = generate(running.address, [11, 12, 13], 3, metadata=(("x-request-id", "trace-obs-42"),))
    assert {m.request_id for m in msgs} == {"trace-obs-42"}
    deadline = time.monotonic() + 10  # the last log line may follow the client's last message
    while True:
        logged = [json.loads(line) for line in list(running.stderr_lines) if "trace-obs-42" in line]
        events = {e["event"] for e in logged if e.get("request_id") == "trace-obs-42"}
        if {"request_queued", "request_finished"} <= events or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {"request_queued", "request_finished"} <= events


def test_status_shows_plan_workers_load_and_kv(running):
    st = status_json(running)
    assert st["ready"] and st["num_layers"] == NUM_LAYERS and len(st["replicas"]) == 1
    stages = st["replicas"][0]["stages"]
    assert len(stages) == 2
    assert stages[0]["layer_start"] == 0 and stages[-1]["layer_end"] == NUM_LAYERS
    assert stages[0]["layer_end"] == stages[1]["layer_start"]
    for s in stages:
        assert s["reachable"] and s["kv_blocks_total"] == KV_BLOCKS and s["worker_id"] and s["address"]
        assert s["kv_blocks_used"] >= 0 and s["live_sequences"] >= 0
    text = subprocess.run([*stagemesh_cmd(), "status", "--coordinator", running.coordinator],
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and f"epoch {st['epoch']}" in text.stdout and "[0," in text.stdout


def _reflected_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_reflection_lists_each_service(running):
    st = status_json(running)
    assert {"stagemesh.v1.Generation", "grpc.health.v1.Health"} <= _reflected_services(running.address)
    assert "stagemesh.v1.Coordinator" in _reflected_services(running.coordinator)
    for s in st["replicas"][0]["stages"]:
        assert "stagemesh.v1.Stage" in _reflected_services(s["address"])
    with grpc.insecure_channel(running.address) as channel:  # a full descriptor, as grpcurl describes
        db = ProtoReflectionDescriptorDatabase(channel)
        from google.protobuf.descriptor_pool import DescriptorPool

        service = DescriptorPool(db).FindServiceByName("stagemesh.v1.Generation")
        assert "Generate" in service.methods_by_name


def test_bench_prints_throughput_and_percentiles(running):
    out = subprocess.run([*stagemesh_cmd(), "bench", "--target", running.address, "--requests", "6",
                          "--concurrency", "3", "--prompt-len", "4-12", "--output-len", "3-6", "--seed", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert re.search(r"requests: 6 \(0 failed\)", out.stdout)
    assert re.search(r"throughput: [\d.]+ req/s, [\d.]+ output tok/s", out.stdout)
    for name in ("TTFT ms", "ITL ms", "E2E ms"):
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(name))
        assert re.search(r"p50 [\d.]+  p90 [\d.]+  p99 [\d.]+", line), line
