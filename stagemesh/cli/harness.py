"""Start single services (coordinator, stage workers) as subprocesses for component tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

from stagemesh.net import free_port


def _wait_ready(proc: subprocess.Popen, what: str, timeout_s: float = 60) -> str:
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
    procs = []
    try:
        for cmd in cmds:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(proc)
            _wait_ready(proc, " ".join(cmd[:3]))
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def coordinator_cmd(model_dir, port: int, stages: int = 1, *extra: str) -> list[str]:
    return [sys.executable, "-m", "coordinator", "--model", str(model_dir), "--port", str(port),
            "--stages", str(stages), "--block-size", "4", *extra]


def worker_cmd(model_dir, coordinator: str, port: int, kv_blocks: int = 64, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stage_worker", "--model", str(model_dir), "--coordinator", coordinator,
            "--port", str(port), "--block-size", "4", "--kv-blocks", str(kv_blocks), "--threads", "1", *extra]


def new_port() -> int:
    return free_port()


def gateway_cmd(model_dir, coordinator: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "--model", str(model_dir), "--coordinator", coordinator,
            "--port", str(port), *extra]


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


def stage_stats(mesh) -> list:
    """Stage.Stats of every worker of a manual_mesh."""
    from stagemesh.v1 import stagemesh_pb2 as pb
    from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc
    import grpc

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
