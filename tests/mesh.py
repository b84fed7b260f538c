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

import psutil

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

    @property
    def coordinator(self) -> str:
        """HOST:PORT of the coordinator, from the end of the ready line (a DESIGN.md contract)."""
        return self.ready_line.split("coordinator")[-1].strip()

    def children(self, module: str) -> list[psutil.Process]:
        """The running children of `up` started as `python -m module` (not zombies)."""
        out = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                cmd = child.cmdline()
                if child.status() != psutil.STATUS_ZOMBIE and "-m" in cmd and cmd[cmd.index("-m") + 1] == module:
                    out.append(child)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, IndexError):
                pass
        return out

    def pid_at(self, module: str, address: str) -> int:
        """PID of the child of `module` listening at `address` (`up` gives each child a fixed --port)."""
        port = address.rsplit(":", 1)[1]
        for child in self.children(module):
            cmd = child.cmdline()
            if "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
                return child.pid
        raise LookupError(f"no running {module} child of up at {address}")

    def wait_child(self, module: str, address: str = "", not_pid: int = 0, timeout_s: float = 60) -> int:
        """Until `up` has a running child of `module` (at `address`) other than `not_pid`; its PID."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                pids = [self.pid_at(module, address)] if address else [c.pid for c in self.children(module)]
                pids = [p for p in pids if p != not_pid]
                if pids:
                    return pids[0]
            except (LookupError, psutil.NoSuchProcess):
                pass
            assert self.proc.poll() is None, f"up exited {self.proc.returncode}: {self.stderr_tail()}"
            assert time.monotonic() < deadline, f"up did not restart {module} {address}: {self.stderr_tail()}"
            time.sleep(0.05)

    def stderr_tail(self, n: int = 30) -> str:
        return "".join(self.stderr_lines[-n:])


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
