"""Start the mesh as a user does (`stagemesh up` in a subprocess) and talk to it over gRPC."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from stagemesh.net import free_port


def stagemesh_cmd() -> list[str]:
    exe = shutil.which("stagemesh")
    return [exe] if exe else [sys.executable, "-m", "stagemesh.cli"]


class RunningMesh:
    def __init__(self, proc: subprocess.Popen, address: str, ready_line: str):
        self.proc = proc
        self.address = address
        self.ready_line = ready_line
        self.stderr_lines: list[str] = []


@contextlib.contextmanager
def mesh(model_dir, stages: int = 1, replicas: int = 1, extra: list[str] | None = None, timeout_s: float = 120):
    port = free_port()
    cmd = [*stagemesh_cmd(), "up", "--model", str(model_dir), "--stages", str(stages), "--replicas", str(replicas),
           "--port", str(port), *(extra or [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    running = RunningMesh(proc, f"127.0.0.1:{port}", "")
    threading.Thread(target=_drain, args=(proc.stderr, running.stderr_lines), daemon=True).start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            line = proc.stdout.readline()
            if "ready" in line:
                running.ready_line = line
                break
            if not line and proc.poll() is not None:
                raise RuntimeError(f"stagemesh up exited {proc.returncode}: {''.join(running.stderr_lines[-20:])}")
            if time.monotonic() > deadline:
                raise RuntimeError("stagemesh up did not print ready in time")
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
