"""What the mesh benchmarks watch while a workload runs: GPU utilisation (nvidia-smi), each
stage's steps / compute / GPU-idle seconds (Stage.Stats through `stagemesh status`), and py-spy
samples of the mesh's processes."""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path


def start_util_sampler():
    """nvidia-smi's 'utilization.gpu' (share of time a kernel ran) every 100 ms, or None."""
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 "-lms", "100"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None


def stop_util_sampler(proc) -> float | None:
    """Mean utilisation in % over the samples, or None without nvidia-smi."""
    if proc is None:
        return None
    proc.terminate()
    vals = [float(x) for x in proc.communicate()[0].split() if x.strip().isdigit()]
    return round(statistics.mean(vals), 1) if vals else None


async def stage_busy(coordinator: str) -> list[tuple[int, float, float]]:
    """(steps, compute seconds, seconds the GPU waited between steps) of every stage so far."""
    from stagemesh.cli.status import collect

    status = await collect(coordinator)
    return [(s["steps"], s["compute_s_total"], s["gpu_wait_s_total"]) for r in status["replicas"] for s in r["stages"]]


def histogram(url: str, name: str) -> tuple[float, float] | None:
    """(sum, count) of an unlabelled histogram on a /metrics page; None when the page or the
    histogram is not there (a tree without it, a gateway restarting)."""
    import urllib.request

    try:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    except OSError:
        return None
    vals = {}
    for line in text.splitlines():
        if line.startswith((f"{name}_sum ", f"{name}_count ")):
            key, value = line.split()
            vals[key] = float(value)
    return (vals[f"{name}_sum"], vals[f"{name}_count"]) if len(vals) == 2 else None


def histogram_mean(before: tuple[float, float] | None, after: tuple[float, float] | None) -> tuple[float | None, int]:
    """(mean in seconds, count) of a histogram's observations between two `histogram` readings;
    (None, 0) when either is missing or nothing was observed."""
    if before is None or after is None or after[1] <= before[1]:
        return None, 0
    count = int(after[1] - before[1])
    return (after[0] - before[0]) / count, count


def gateway_cpu_s(root: int) -> float | None:
    """User + system CPU seconds of the gateway process under `stagemesh up` (pid root); None when
    it is not there (restarting)."""
    import psutil

    try:
        gateway = next(p for p in psutil.Process(root).children(recursive=True) if "gateway" in p.cmdline())  # -m gateway
        return sum(gateway.cpu_times()[:2])
    except (StopIteration, psutil.Error):
        return None


def _descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent
    return False


def start_py_spy(binary: str, out: Path, label: str, root: int) -> list[subprocess.Popen]:
    """Sample the gateway's and every stage worker's Python stacks under `root` (the mesh's
    `up`) for 6 s (py-spy record, non-blocking, raw collapsed stacks: benchmarks/pyspy_top.py)."""
    procs = []
    for pid in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not pid.isdigit() or not _descends_from(int(pid), root):  # this mesh's processes only
                continue
        except (OSError, ValueError):
            continue
        role = next((a.decode() for a in argv if a in (b"gateway", b"stage_worker")), None)
        if role and b"-m" in argv:
            path = out / f"pyspy_{label}_{role}_{pid}.txt"
            procs.append(subprocess.Popen([binary, "record", "--pid", pid, "--rate", "250", "--duration", "6",
                                           "--nonblocking", "--threads", "--format", "raw", "--output", str(path)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout_s: float = 60) -> None:
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
