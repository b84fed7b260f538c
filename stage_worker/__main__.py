"""python -m stage_worker --model DIR --coordinator HOST:PORT [--port P] [--device cuda:0]"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys

import torch

from stagemesh import config_cli, discovery
from stagemesh import log as logging_setup
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig
from stagemesh.service import ServiceSpec, run_service
from stagemesh.security import add_tls_flags, tls_from_args
from stagemesh.v1 import stagemesh_pb2 as pb

from stage_worker.config import WorkerConfig
from stage_worker.device import gpu_name, resolve_device
from stage_worker.kernels import tuning
from stage_worker.kv_cache import check_kv_cache_dtype
from stage_worker.models import MODEL_REGISTRY
from stage_worker.server import StageService, add_stage_service, heartbeat_loop, lease_expiry_loop


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m stage_worker")
    config_cli.add_flags(p, WorkerConfig)
    p.add_argument("--log-level", default="info")
    add_tls_flags(p)
    discovery.add_arguments(p)
    a = p.parse_args(argv)
    if not a.coordinator and not a.consul:
        p.error("--coordinator HOST:PORT is required (or --consul URL to find the coordinator in Consul)")
    cfg = config_cli.from_args(WorkerConfig, a, device=resolve_device(a.device), tls=tls_from_args(a))
    return cfg, a.log_level, discovery.config_from_args(a)


async def serve(config: WorkerConfig, log, consul: discovery.ConsulConfig | None = None) -> None:
    registry = discovery.Discovery(consul) if consul else None
    follow = registry is not None and not config.coordinator  # the coordinator is whoever leads in Consul
    if follow:
        config = dataclasses.replace(config, coordinator=await registry.wait_for_leader())
    if config.tp_size:  # rank 0 of a tensor-parallel group (starts its followers)
        from stage_worker.tp_group import TPStageService

        service = TPStageService(config, log)
    else:
        service = StageService(config, log)

    def tasks(running) -> list[asyncio.Task]:
        # The heartbeats ending ends the worker (exit 1 when they failed: the supervisor restarts it).
        return [asyncio.create_task(_heartbeats(service, config, running.address, log, registry if follow else None)),
                asyncio.create_task(lease_expiry_loop(service, config.lease_ttl_s))]

    await run_service(ServiceSpec(
        name="stage worker", host=config.host, port=config.port, tls=config.tls, log=log,
        metrics_port=config.metrics_port, descriptor=pb.DESCRIPTOR, services=("Stage",),
        add_servicers=lambda server: add_stage_service(service, server), advertise=config.advertise,
        ready_event="stage worker listening", ready_fields={"device": config.device},
        consul=registry, consul_kind="worker", tasks=tasks))


async def _heartbeats(service, config: WorkerConfig, address: str, log, registry=None) -> None:
    """heartbeat_loop with the coordinator; following Consul, restarted against each new leader."""
    if registry is None:
        return await heartbeat_loop(service, config, address, log)
    while True:
        beat = asyncio.create_task(heartbeat_loop(service, config, address, log))
        moved = asyncio.create_task(registry.watch_leader(config.coordinator))
        await asyncio.wait({beat, moved}, return_when=asyncio.FIRST_COMPLETED)
        if beat.done():
            moved.cancel()
            return beat.result()
        beat.cancel()
        log.info("coordinator_moved", coordinator=moved.result())
        config = dataclasses.replace(config, coordinator=moved.result())


def intra_op_threads(config: WorkerConfig) -> int:
    """--threads, else: one on a GPU (a GPU worker's host side is small ops and kernel launches from
    one Python thread, which a pool of intra-op threads only competes with: on the H100 host, 16
    threads per worker made the mixed benchmark about twice as slow, benchmarks/README_gpu.md);
    on the CPU, the cores split between the --cpu-share workers of this host."""
    if config.threads:
        return config.threads
    if config.device.startswith("cuda"):
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, config.cpu_share))


def main(argv=None) -> None:
    try:
        config, level, consul = parse_args(argv)
    except ValueError as exc:
        sys.exit(f"stage_worker: {exc}")
    torch.set_num_threads(intra_op_threads(config))
    log = logging_setup.configure("stage_worker", level)
    try:
        model = ModelConfig.from_dir(config.model_dir)  # an unsupported architecture: one line, before serving
        # a --kv-cache-dtype the model's pool or this device cannot take: likewise, not after a load
        check_kv_cache_dtype(config.kv_cache_dtype, MODEL_REGISTRY[model.architecture].kv_cache_cls,
                             torch.device(config.device))
        kernel_tuning = tuning.load(config.kernel_tuning, gpu_name(config.device))
    except (CheckpointError, OSError, ValueError) as exc:
        sys.exit(f"stage_worker: {exc}")
    tuning.use(kernel_tuning)
    changed = tuning.active().changed()  # what this process's kernels run with, where it is not the default
    if changed:
        log.info("kernel_tuning", **changed)
    try:
        asyncio.run(serve(config, log, consul))
    except (CheckpointError, OSError) as exc:
        sys.exit(f"stage_worker: {exc}")


if __name__ == "__main__":
    main()
