"""`python -m stagemesh.healthcheck` (the compose files' healthcheck) against real gRPC health
servers: the coordinator process, and a small in-test server that reports NOT_SERVING."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stagemesh.cli.harness import coordinator_cmd, processes
from stagemesh.net import free_port

ROOT = Path(__file__).resolve().parent.parent


def _probe(address: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stagemesh.healthcheck", address, *extra],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_healthcheck_serving_coordinator(tmp_path):
    from stagemesh.cli.demo_model import write_demo_model

    write_demo_model(tmp_path / "m", num_layers=2)
    port = free_port()
    with processes(coordinator_cmd(tmp_path / "m", port)):
        ok = _probe(f"127.0.0.1:{port}")
        assert ok.returncode == 0, ok.stderr
        assert "SERVING" in ok.stdout
        unknown = _probe(f"127.0.0.1:{port}", "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_healthcheck_not_serving_and_unreachable():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        down = _probe(f"127.0.0.1:{port}")
        assert down.returncode == 1 and "NOT_SERVING" in down.stderr
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _probe(f"127.0.0.1:{port}").returncode == 0
    finally:
        server.stop(None)
    closed = _probe(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stderr
