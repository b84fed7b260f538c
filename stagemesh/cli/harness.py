"""Start a mesh in subprocesses, for tests and benchmarks (one harness for both).

Three ways in, by what the caller needs:

- `start_up` / `mesh`: `stagemesh up` as a user runs it (the launcher starts and supervises every
  service); `RunningMesh` finds its children, waits for restarts and stops it.
- `processes` with `coordinator_cmd` / `worker_cmd` / `gateway_cmd`, or `manual_mesh`: single
  services with known addresses, for component tests that query, kill or freeze each process.
- `RedisServer`: a real redis-server on a free loopback port (the prefix index's store).

Not imported by any service. psutil (a test dependency) is imported only where children are listed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from stagemesh.net import free_port

# -- single services ----------------------------------------------------------------------------------


def wait_ready_line(proc: subprocess.Popen, what: str, timeout_s: float = 60) -> str:
    """Read `proc`'s stdout until the line containing `ready` (every service prints one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready" in line:
            return line
        if not line and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
    raise RuntimeError(f"{what} not ready in time")


@contextlib.contextmanager
def processes(*cmds: list[str]):
    """Start each command in turn, each after the previous one is ready; terminate all at exit.
    A command that exits or hangs before its ready line fails with the end of its stderr (kept
    in a temporary file: a pipe nobody reads after start-up could fill and block the service)."""
    procs = []
    with contextlib.ExitStack() as files:
        try:
            for cmd in cmds:
                err = files.enter_context(tempfile.TemporaryFile(mode="w+"))
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
                procs.append(proc)
                try:
                    wait_ready_line(proc, " ".join(cmd[:3]))
                except RuntimeError as exc:
                    err.seek(0)
                    raise RuntimeError(f"{exc}; its stderr ends:\n{err.read()[-2000:]}") from None
            yield procs
        finally:
            stop_all(procs)


def stop_all(procs: list[subprocess.Popen], timeout_s: float = 10) -> None:
    """SIGTERM every process still running, then wait for each; kill one that outlasts timeout_s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def coordinator_cmd(model_dir, port: int, stages: int = 1, *extra: str) -> list[str]:
    return [sys.executable, "-m", "coordinator", "--model", str(model_dir), "--port", str(port),
            "--stages", str(stages), "--block-size", "4", *extra]


def worker_cmd(model_dir, coordinator: str, port: int, kv_blocks: int = 64, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stage_worker", "--model", str(model_dir), "--coordinator", coordinator,
            "--port", str(port), "--block-size", "4", "--kv-blocks", str(kv_blocks), "--threads", "1", *extra]


def gateway_cmd(model_dir, coordinator: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "--model", str(model_dir), "--coordinator", coordinator,
            "--port", str(port), *extra]


def new_port() -> int:
    return free_port()


@contextlib.contextmanager
def manual_mesh(model_dir, stages: int = 2, kv_blocks: int = 64, gateway_args: tuple[str, ...] = (),
                spares: int = 0, coordinator_args: tuple[str, ...] = ()):
    """coordinator + workers (+ spares) + gateway with known addresses, so tests can query,
    kill or freeze each process. procs[0] is the coordinator, procs[-1] the gateway."""
    cport, gport = new_port(), new_port()
    coord = f"127.0.0.1:{cport}"
    wports = [new_port() for _ in range(stages + spares)]
    cmds = [coordinator_cmd(model_dir, cport, stages, *coordinator_args)]
    cmds += [worker_cmd(model_dir, coord, p, kv_blocks) for p in wports]
    cmds.append(gateway_cmd(model_dir, coord, gport, *gateway_args))
    with processes(*cmds) as procs:
        yield {"gateway": f"127.0.0.1:{gport}", "coordinator": coord, "cmds": cmds,
               "workers": [f"127.0.0.1:{p}" for p in wports], "procs": procs}


def get_plan(coordinator: str):
    """The coordinator's current Plan."""
    import grpc

    from stagemesh.v1 import stagemesh_pb2 as pb
    from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc

    with grpc.insecure_channel(coordinator) as ch:
        return pb_grpc.CoordinatorStub(ch).GetPlan(pb.GetPlanRequest(), timeout=5)


def wait_plan_ready(coordinator: str, timeout_s: float = 60):
    """Until the coordinator's plan is ready (every stage has a worker); that Plan."""
    deadline = time.monotonic() + timeout_s
    while True:
        plan = get_plan(coordinator)
        if plan.ready:
            return plan
        assert time.monotonic() < deadline, f"plan not ready after {timeout_s} s: {plan}"
        time.sleep(0.1)


def stage_stats(mesh) -> list:
    """Stage.Stats of every worker of a manual_mesh."""
    import grpc

    from stagemesh.v1 import stagemesh_pb2 as pb
    from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc

    out = []
    for addr in mesh["workers"]:
        with grpc.insecure_channel(addr) as ch:
            out.append(pb_grpc.StageStub(ch).Stats(pb.StatsRequest(), timeout=5))
    return out


def blocks_in_use(mesh) -> list[int]:
    return [s.blocks_in_use for s in stage_stats(mesh)]


def wait_kv_free(mesh, timeout_s: float = 10.0, sequences: bool = False) -> None:
    """Until no stage holds a KV block (and, with `sequences`, no sequence); fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = [(s.blocks_in_use, s.live_sequences if sequences else 0) for s in stage_stats(mesh)]
        if not any(b or n for b, n in held):
            return
        assert time.monotonic() < deadline, f"(blocks, sequences) still held per stage: {held}"
        time.sleep(0.05)


# -- `stagemesh up` -----------------------------------------------------------------------------------


def stagemesh_cmd() -> list[str]:
    exe = shutil.which("stagemesh")
    return [exe] if exe else [sys.executable, "-m", "stagemesh.cli"]


class RunningMesh:
    """`stagemesh up` in a subprocess: its ready line, its stderr (kept, and copied to `log_path`)."""

    def __init__(self, proc: subprocess.Popen, address: str, log_path=None):
        self.proc = proc
        self.address = address
        self.ready_line = ""
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        self._log = open(log_path, "w") if log_path else None
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    @property
    def coordinator(self) -> str:
        """HOST:PORT of the coordinator, from the end of the ready line (a DESIGN.md contract)."""
        return self.ready_line.split("coordinator")[-1].strip()

    def wait_ready(self, timeout_s: float = 120) -> float:
        """Until `up` prints its ready line; the seconds waited. RuntimeError if it exits or times out."""
        t0 = time.monotonic()
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None and not self._ready.is_set():
                time.sleep(0.2)  # let the stderr reader catch the last lines
                raise RuntimeError(f"stagemesh up exited {self.proc.returncode}: {self.stderr_tail(20)}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"stagemesh up did not print ready in {timeout_s:.0f} s: {self.stderr_tail(20)}")
        return time.monotonic() - t0

    def stop(self, timeout_s: float = 20) -> None:
        """SIGINT (up stops its children in order), SIGKILL past timeout_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()

    def children(self, module: str) -> list:
        """The running children of `up` started as `python -m module` (not zombies)."""
        import psutil

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
        import psutil

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

    def wait_stderr(self, text: str, timeout_s: float = 10) -> str:
        """Until a line of up's stderr holds `text` (read by another thread: a child can be seen
        restarted before the line saying so is read); that line."""
        deadline = time.monotonic() + timeout_s
        while True:
            line = next((line for line in self.stderr_lines if text in line), None)
            if line is not None:
                return line
            assert time.monotonic() < deadline, f"no {text!r} on up's stderr: {self.stderr_tail()}"
            time.sleep(0.05)

    def stderr_tail(self, n: int = 30) -> str:
        return "".join(self.stderr_lines[-n:])

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            if self._log:
                self._log.write(line)
                self._log.flush()
            if not self._ready.is_set() and "ready" in line:
                self.ready_line = line
                self._ready.set()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if self._log:
                self._log.write(line)


def start_up(model_dir, stages: int = 1, replicas: int = 1, extra=(), port: int = 0, env=None,
             log_path=None, cwd=None) -> RunningMesh:
    """Start `stagemesh up` (not waiting for it): `extra` are more up flags, `env` its environment."""
    port = port or free_port()
    cmd = [*stagemesh_cmd(), "up", "--model", str(model_dir), "--stages", str(stages), "--replicas", str(replicas),
           "--port", str(port), *extra]
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    return RunningMesh(proc, f"127.0.0.1:{port}", log_path)


@contextlib.contextmanager
def mesh(model_dir, stages: int = 1, replicas: int = 1, extra: list[str] | None = None, timeout_s: float = 120):
    """`stagemesh up` running and ready; stopped (SIGINT) at exit."""
    running = start_up(model_dir, stages, replicas, extra or [])
    try:
        running.wait_ready(timeout_s)
        yield running
    finally:
        running.stop()


# -- Redis ---------------------------------------------------------------------------------------------


class RedisServer:
    """One redis-server process (loopback, a temp dir, no persistence); `stop()` and `restart()`
    (same port, so clients keep their URL) simulate an outage."""

    def __init__(self, port: int | None = None, binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise RuntimeError(f"{binary} is not installed (apt-get install redis-server)")
        self.binary = path
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="stagemesh-redis-")
        self.log_path = f"{self.dir}/redis.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 5.0) -> "RedisServer":
        """Start and wait until it answers PING."""
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait_for_ping(timeout_s)
        return self

    def stop(self) -> None:
        """Terminate the server and wait for its port to close."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, empty."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _wait_for_ping(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                with open(self.log_path, errors="replace") as log:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {log.read()}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout_s}s")
