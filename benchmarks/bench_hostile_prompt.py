"""Does a hostile client stall the others? Small-request latency, idle vs while huge prompts arrive.

The mesh runs as users run it (`stagemesh up --http-port`, the demo model, one stage). A small
request (text prompt "The old mill", 1 token, so it is tokenized like any text prompt) is sent
alternately over gRPC and HTTP, one at a time, in rounds (alternating keeps the comparison fair
on a shared machine whose load drifts): with nothing else going on (idle), then while another
process sends, back to back and all at once, a 20 MB and a 100 MB text prompt over
gRPC and the same over HTTP (four senders). Printed: median and p90 latency of the small
requests in both phases and their ratio (target <= 2x), how the huge prompts were answered
(status and time to answer), the gateway's RSS before, at its peak and after, and the CPU the
gateway and the sender used meanwhile: on a small machine the sender's own work (building and
pushing 100 MB messages) takes cores from everyone, so that figure says how much of a slowdown
is the machine's and how much the gateway's.

Issue #21 measured before the fix: 16.3 s for a 1-token request beside a 20 MB gRPC prompt,
timeouts beside a 100 MB one (gateway RSS 3.37 GB), 8.6 s beside a 10 MB HTTP prompt.

    python benchmarks/bench_hostile_prompt.py [--requests 20] [--rounds 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402

from stagemesh.client import Client  # noqa: E402
from stagemesh.cli.demo_model import write_demo_model  # noqa: E402
from stagemesh.net import free_port  # noqa: E402
from stagemesh.v1 import stagemesh_pb2 as pb  # noqa: E402
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc  # noqa: E402
from stagemesh.cli.harness import mesh  # noqa: E402

SMALL = "The old mill"
HUGE_MB = (20, 100)


def small_latencies(target: str, base: str, n: int) -> dict[str, list[float]]:
    """n small requests per API, alternating, one at a time; seconds each."""
    out = {"grpc": [], "http": []}
    with Client(target) as client, requests.Session() as http:
        for _ in range(n):
            t = time.perf_counter()
            done = client.generate(prompt=SMALL, max_tokens=1, timeout=120)
            out["grpc"].append(time.perf_counter() - t)
            assert done.completion_tokens == 1, done
            t = time.perf_counter()
            r = http.post(base + "/v1/completions", json={"prompt": SMALL, "max_tokens": 1, "temperature": 0},
                          timeout=120)
            out["http"].append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return out


def _send_huge(kind: str, mb: int, target: str, base: str, go, stop, busy, results) -> None:
    """One sender: the same huge prompt again and again while `go` is set, until `stop`; puts
    (kind, answer, seconds) for each; `busy` counts sends in flight."""
    text = "word " * (mb * (1 << 20) // 5)
    if kind == "grpc":
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt=text, max_tokens=1)
    else:
        body = json.dumps({"prompt": text, "max_tokens": 1}).encode()
    results.put(("ready", "", 0.0))
    while not stop.is_set():
        if not go.wait(0.05):
            continue
        with busy.get_lock():
            busy.value += 1
        t = time.perf_counter()
        try:
            if kind == "grpc":
                list(stub.Generate(request, timeout=120))
                answer = "OK"
            else:
                answer = str(requests.post(base + "/v1/completions", data=body, timeout=120,
                                           headers={"content-type": "application/json"}).status_code)
        except grpc.RpcError as exc:
            answer = exc.code().name
        except requests.RequestException as exc:
            answer = type(exc).__name__
        results.put((f"{kind} {mb} MB", answer, time.perf_counter() - t))
        with busy.get_lock():
            busy.value -= 1


def hostile(target: str, base: str, sizes_mb, go, stop, busy, results) -> None:
    """The hostile client, in its own process: one sender per API and size, all at once."""
    threads = [threading.Thread(target=_send_huge, args=(kind, mb, target, base, go, stop, busy, results))
               for kind in ("grpc", "http") for mb in sizes_mb]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


class RssWatch:
    """Peak RSS of one process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class CpuShare:
    """CPU cores busy (CPU seconds per wall second) since the last lap, per watched process."""

    def __init__(self, **procs: psutil.Process):
        self.procs = procs
        self._t, self._cpu = time.monotonic(), {k: self._used(p) for k, p in procs.items()}

    @staticmethod
    def _used(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def watch(self, name: str, proc: psutil.Process) -> None:
        self.procs[name], self._cpu[name] = proc, self._used(proc)

    def lap(self) -> dict:
        now, used = time.monotonic(), {k: self._used(p) for k, p in self.procs.items()}
        out = {k: round((used[k] - self._cpu[k]) / (now - self._t), 2) for k in used}
        self._t, self._cpu = now, used
        return out


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1e3, 2), "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1e3, 2),
            "max_ms": round(xs[-1] * 1e3, 2)}


def gateway_pid(up_pid: int) -> int:
    for child in psutil.Process(up_pid).children():
        cmd = child.cmdline()
        if "-m" in cmd and cmd[cmd.index("-m") + 1] == "gateway":
            return child.pid
    raise LookupError("no gateway child of up")


def run(n: int, rounds: int, sizes_mb=HUGE_MB) -> dict:
    """`rounds` times: n small requests per API idle, then n beside the huge prompts."""
    model_dir = write_demo_model(Path(tempfile.mkdtemp()) / "demo", num_layers=4)
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    ctx = multiprocessing.get_context("spawn")
    go, stop, busy, results = ctx.Event(), ctx.Event(), ctx.Value("i", 0), ctx.Queue()
    idle, beside = {"grpc": [], "http": []}, {"grpc": [], "http": []}
    cpu_idle, cpu_beside, answers = [], [], []
    with mesh(model_dir, stages=1, timeout_s=300, extra=["--http-port", str(http_port), "--threads", "1"]) as m:
        watch = RssWatch(gateway_pid(m.proc.pid))
        small_latencies(m.address, base, 5)  # warm up both paths
        rss_before = watch.now_mb()
        sender = ctx.Process(target=hostile, args=(m.address, base, sizes_mb, go, stop, busy, results))
        sender.start()
        for _ in range(len(sizes_mb) * 2):
            results.get(timeout=300)  # every sender has its message built
        cpu = CpuShare(gateway=watch.proc, huge_prompt_sender=psutil.Process(sender.pid))
        with watch:
            for _ in range(rounds):
                cpu.lap()
                _extend(idle, small_latencies(m.address, base, n))
                cpu_idle.append(cpu.lap())
                go.set()
                answers.append(results.get(timeout=120))  # the huge prompts are being answered
                _extend(beside, small_latencies(m.address, base, n))
                cpu_beside.append(cpu.lap())
                go.clear()
                while busy.value:  # the next idle phase starts quiet
                    time.sleep(0.05)
            stop.set()
            sender.join(timeout=300)
        while not results.empty():
            answers.append(results.get())
        time.sleep(1.0)
        rss_after = watch.now_mb()
    return _result(n * rounds, idle, beside, answers, cpu_idle, cpu_beside,
                   {"before": round(rss_before, 1), "peak": round(watch.peak / 2**20, 1),
                    "after": round(rss_after, 1)})


def _extend(into: dict, more: dict) -> None:
    for api, xs in more.items():
        into[api] += xs


def _result(n, idle, beside, answers, cpu_idle, cpu_beside, rss) -> dict:
    by_kind = collections.defaultdict(list)
    for kind, answer, seconds in answers:
        by_kind[kind].append((answer, seconds))
    huge = {kind: {"answers": dict(collections.Counter(a for a, _ in xs)), **_stats([s for _, s in xs])}
            for kind, xs in sorted(by_kind.items())}
    mean = lambda laps: {k: round(statistics.mean(lap[k] for lap in laps), 2) for k in laps[0]}  # noqa: E731
    result = {"small_requests_per_api_and_phase": n, "idle": {api: _stats(xs) for api, xs in idle.items()},
              "beside_huge_prompts": {api: _stats(xs) for api, xs in beside.items()},
              "huge_prompts": huge, "gateway_rss_mb": rss,
              "cpu_cores_busy": {"idle": mean(cpu_idle), "beside_huge_prompts": mean(cpu_beside)},
              "machine_cores": psutil.cpu_count(), "load_average_1m_at_end": round(psutil.getloadavg()[0], 2)}
    result["ratio_median"] = {api: round(statistics.median(beside[api]) / statistics.median(idle[api]), 2)
                              for api in idle}
    result["ratio_p90"] = {api: round(result["beside_huge_prompts"][api]["p90_ms"] / result["idle"][api]["p90_ms"], 2)
                           for api in idle}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20, help="small requests per API, phase and round")
    ap.add_argument("--rounds", type=int, default=4, help="idle / beside-huge-prompts alternations")
    ap.add_argument("--sizes-mb", default=",".join(map(str, HUGE_MB)), help="huge prompt sizes, MB")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    result = run(args.requests, args.rounds, tuple(int(x) for x in args.sizes_mb.split(",")))
    print(json.dumps(result, indent=2))
    for api in ("grpc", "http"):
        print(f"{api}: small request median {result['idle'][api]['median_ms']} ms idle, "
              f"{result['beside_huge_prompts'][api]['median_ms']} ms beside {args.sizes_mb} MB prompts: "
              f"ratio {result['ratio_median'][api]}x (p90 {result['ratio_p90'][api]}x; target <= 2x)")
    print(f"gateway RSS: {result['gateway_rss_mb']}")
    print(f"CPU cores busy (of {result['machine_cores']}): {result['cpu_cores_busy']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
