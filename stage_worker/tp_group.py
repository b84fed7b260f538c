"""A tensor-parallel stage as a group of processes: rank 0 serves gRPC, ranks 1..k-1 follow.

`python -m stage_worker --tp-size k` makes the worker rank 0: it starts k-1 followers
(`python -m stage_worker.tp_follower`), joins them in a `deepspeed.comm` process group (gloo on
the CPU, NCCL on GPUs, rank r on cuda:(i+r)), and serves through `TPStageService`, the ordinary
StageService whose executor first broadcasts every state-changing call to the followers:

    ("load", layer_start, layer_end)  then ("kv", num_blocks, kv_cache_dtype)   new assignment: load + shard + pool
    ("run", StepInput)                                           one micro-batch (hidden included)
    ("release", lease_id, seq_ids) / ("drop", [lease_id]) / ("reset",) / ("claim", lease_id, owner, order)

Rank 0 decodes and checks a step; only a step that passed every check (step_input.py, the lease
table, the samples it follows: `StageExecutor.on_accept`) goes to the followers, so a refused one
is refused on rank 0 alone, before any collective. Every rank then runs its own StageExecutor on
the same step in lockstep (the executor's state changes are deterministic); the all-reduces
inside the layers meet. Only rank 0's output is used. Control messages go over a gloo group (`broadcast_object_list`), all on
rank 0's single compute thread, so they never interleave with a micro-batch's all-reduces.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch

from stagemesh.net import free_port
from stagemesh.v1 import stagemesh_pb2 as pb

from stage_worker.executor import StageExecutor
from stage_worker.loader import load_stage
from stage_worker.server import StageService
from stage_worker.tensor_parallel import shard_stage

NEVER = timedelta(days=365)  # followers wait on rank 0 for as long as the stage idles


class TPGroup:
    """This process's place in the TP group, and the control channel (rank 0 -> followers)."""

    def __init__(self, rank: int, world: int, port: int, device: str):
        import deepspeed.comm as dist

        self.rank, self.world = rank, world
        self.device = rank_device(device, rank)
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(self.device)
        else:
            # DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU groups on first use
            # (~2 minutes on 2 cores, in every fresh environment); gloo's all-reduce serves here.
            import importlib

            # (the attribute `deepspeed.comm.torch` is the torch package: import the module by name)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        dist.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                              init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                              timeout=NEVER, verbose=False)
        # Pickled control objects travel on the CPU: a gloo group beside NCCL, the default on CPU.
        self.ctrl = torch.distributed.new_group(backend="gloo", timeout=NEVER) if cuda else None

    def send(self, *cmd) -> None:  # rank 0
        import deepspeed.comm as dist

        dist.broadcast_object_list([cmd], src=0, group=self.ctrl)

    def recv(self) -> tuple:  # followers
        import deepspeed.comm as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]


def rank_device(device: str, rank: int) -> str:
    """cuda:i -> cuda:(i+rank) (one GPU per rank); cpu stays cpu."""
    if device.startswith("cuda"):
        base = int(device.split(":")[1]) if ":" in device else 0
        return f"cuda:{base + rank}"
    return device


def load_sharded(model_dir, layer_start: int, layer_end: int, group: TPGroup):
    model, _ = load_stage(model_dir, layer_start, layer_end, device=group.device)
    return shard_stage(model, group.rank, group.world)


def make_executor(model, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> StageExecutor:
    kv = model.make_kv_cache(num_blocks, block_size, dtype=model.kv_cache_dtype(kv_cache_dtype))  # local KV heads
    # No CUDA graphs: the decode graph would have to capture the NCCL all-reduces (not tried).
    return StageExecutor(model, kv, block_size, cuda_graphs=False)


class TPExecutor:
    """Rank 0's executor: broadcasts each state-changing call, then runs it locally."""

    def __init__(self, inner: StageExecutor, group: TPGroup):
        self.__dict__.update(inner=inner, group=group)
        # Host follows resolved: the followers get the ids, not the flags.
        inner.on_accept = lambda step: group.send("run", step)

    def __getattr__(self, name):  # launch, finish, shape, leases, steps, mean_step_us, ...
        return getattr(self.inner, name)

    def __setattr__(self, name, value):  # slowdown
        setattr(self.inner, name, value)

    def release(self, lease_id: str, seq_ids=()) -> None:
        self.group.send("release", lease_id, list(seq_ids))
        self.inner.release(lease_id, seq_ids)

    def reset(self) -> None:
        self.group.send("reset")
        self.inner.reset()

    def claim(self, lease_id: str, owner: str, order: int, strict: bool = True) -> int:
        dropped = self.inner.claim(lease_id, owner, order, strict)  # raises before telling anyone
        self.group.send("claim", lease_id, owner, order)
        return dropped

    def expire_leases(self, ttl_s: float) -> int:
        dead = self.inner.leases.stale(ttl_s)  # rank 0's clock decides, followers follow
        if dead:
            self.group.send("drop", sorted(dead))
        return self.inner.leases.drop_leases(dead)


class TPStageService(StageService):
    """StageService of a TP group's rank 0: starts the followers, loads sharded, broadcasts."""

    survives_failed_load = False  # the followers drop their layers before loading: stop instead

    def __init__(self, config, log):
        super().__init__(config, log)
        world = config.tp_size
        port = free_port()
        self.followers = [subprocess.Popen(follower_cmd(config, r, world, port)) for r in range(1, world)]
        atexit.register(self._stop_followers)
        self.group = TPGroup(0, world, port, config.device)
        log.info("tensor_parallel_group", tp_size=world, device=self.group.device)

    def _load(self, a: pb.Assignment) -> TPExecutor:
        cfg = self.config
        self.group.send("load", a.layer_start, a.layer_end)
        model = load_sharded(cfg.model_dir, a.layer_start, a.layer_end, self.group)
        per_block = model.kv_block_bytes(cfg.block_size, model.kv_cache_dtype(cfg.kv_cache_dtype))  # local heads
        num_blocks = cfg.kv_blocks or max(1, self._kv_budget(model) // per_block)
        self.group.send("kv", num_blocks, cfg.kv_cache_dtype)  # one pool for the gateway: the same on every rank
        executor = TPExecutor(make_executor(model, num_blocks, cfg.block_size, cfg.kv_cache_dtype), self.group)
        executor.slowdown = self.slowdown
        return executor

    def _stop_followers(self) -> None:
        for proc in self.followers:
            proc.terminate()
        for proc in self.followers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def follower_cmd(config, rank: int, world: int, port: int) -> list[str]:
    return [sys.executable, "-m", "stage_worker.tp_follower", "--model", config.model_dir,
            "--rank", str(rank), "--world", str(world), "--port", str(port), "--device", config.device,
            "--block-size", str(config.block_size), "--threads", str(config.threads),
            "--kernel-tuning", config.kernel_tuning]


def follow(group: TPGroup, model_dir: str, block_size: int) -> None:
    """A follower's loop: mirror rank 0's executor until told to stop (or rank 0 is gone)."""
    executor = None
    while True:
        cmd = group.recv()
        op = cmd[0]
        if op == "load":
            executor = None  # free the old shard before loading the next
            model = load_sharded(model_dir, cmd[1], cmd[2], group)
            op, num_blocks, kv_cache_dtype = group.recv()
            assert op == "kv", op
            executor = make_executor(model, num_blocks, block_size, kv_cache_dtype)
        elif op == "run":
            try:
                executor.run(cmd[1])  # rank 0 checked it against the same state: it passes here too
            except Exception:  # noqa: BLE001 - not expected: say so, and keep mirroring
                traceback.print_exc()
        elif op == "release":
            executor.release(cmd[1], cmd[2])
        elif op == "drop":
            executor.leases.drop_leases(set(cmd[1]))
        elif op == "reset":
            executor.reset()
        elif op == "claim":
            executor.claim(cmd[1], cmd[2], cmd[3], strict=False)
        elif op == "stop":
            return


def exit_with_parent() -> None:
    """Followers die with rank 0 even when a collective would not notice (idle group)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
