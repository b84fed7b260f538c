"""python -m gateway --model DIR --coordinator HOST:PORT [--port P]"""

from __future__ import annotations

import argparse
import asyncio
import sys

from stagemesh import config_cli, discovery
from stagemesh import log as logging_setup
from stagemesh.errors import CheckpointError
from stagemesh.net import GRPC_OPTIONS
from stagemesh.service import ServiceSpec, run_service
from stagemesh.security import add_tls_flags, tls_from_args
from stagemesh.v1 import stagemesh_pb2 as pb
from stagemesh.v1 import stagemesh_pb2_grpc as pb_grpc

from gateway.auth import ApiKeyInterceptor, keys_from_env, load_keys_file
from gateway.config import GatewayConfig
from gateway.scheduler import SchedulerConfig
from gateway.server import Gateway, GenerationService
from gateway.validation import grpc_message_limit


def parse_args(argv=None) -> GatewayConfig:
    p = argparse.ArgumentParser(prog="python -m gateway")
    config_cli.add_flags(p, GatewayConfig)
    config_cli.add_flags(p, SchedulerConfig)
    p.add_argument("--api-keys-file", default="", help="file of accepted API keys, one per line")
    p.add_argument("--log-level", default="info")
    add_tls_flags(p, public=True)
    discovery.add_arguments(p)
    args = p.parse_args(argv)
    if not args.coordinator and not args.consul:
        p.error("--coordinator HOST:PORT is required (or --consul URL to find the coordinator in Consul)")
    consul = discovery.config_from_args(args)
    follow = consul is not None and not args.coordinator
    if consul is not None:
        args.coordinator, args.cache_service = asyncio.run(_from_consul(consul, args.coordinator, args.cache_service))
    # Keys also come from $STAGEMESH_API_KEYS (how `stagemesh up` hands them over: not in argv).
    keys = [*args.api_keys, *(load_keys_file(args.api_keys_file) if args.api_keys_file else []), *keys_from_env()]
    config = config_cli.from_args(GatewayConfig, args, scheduler=config_cli.from_args(SchedulerConfig, args),
                                  tls=tls_from_args(args, require_client_cert=args.tls_require_client_cert),
                                  api_keys=tuple(keys))
    return config, args.log_level, consul, follow


async def _from_consul(consul: discovery.ConsulConfig, coordinator: str, cache_service: str) -> tuple[str, str]:
    """The flags not given, found in Consul: the leading coordinator, a passing cache_service."""
    registry = discovery.Discovery(consul)
    try:
        coordinator = coordinator or await registry.wait_for_leader()
        if not cache_service:
            found = await registry.find(discovery.SERVICE_NAMES["cache"])
            cache_service = f"{found[0][0]}:{found[0][1]}" if found else ""  # none: local prefix matching
        return coordinator, cache_service
    finally:
        await registry.close()


async def _follow_leader(gateway: Gateway, registry: discovery.Discovery, current: str, log) -> None:
    """A standby coordinator took the lock: point the gateway at it (the plan carries on from the state file)."""
    while True:
        current = await registry.watch_leader(current)
        log.info("coordinator_moved", coordinator=current)
        gateway.set_coordinator(current)


async def serve(config: GatewayConfig, log, consul: discovery.ConsulConfig | None = None,
                follow: bool = False) -> None:
    gateway = Gateway(config, log)
    registry = discovery.Discovery(consul) if consul else None
    http = []  # the HTTP frontend once started

    async def start(running) -> None:
        gateway.readiness.health = running.health  # NOT_SERVING whenever the plan is not ready
        await gateway.start()
        if config.http_port:
            from gateway.http_api import HttpFrontend

            http.append(HttpFrontend(gateway, config.host, config.http_port))
            await http[0].start()  # OSError if the port is taken; listening when it returns

    def tasks(_running) -> list[asyncio.Task]:
        if registry is None or not follow:
            return []
        return [asyncio.create_task(_follow_leader(gateway, registry, config.coordinator, log))]

    async def stop() -> None:
        for frontend in http:
            await frontend.stop()

    # A request bigger than any valid one is refused by gRPC itself (RESOURCE_EXHAUSTED): its bytes
    # are dropped as they arrive, never parsed or held whole (a 100 MB one: RSS +10 MB at most).
    options = {**dict(GRPC_OPTIONS), "grpc.max_receive_message_length":
               grpc_message_limit(config.max_prompt_bytes, gateway.model.max_position_embeddings)}
    try:
        await run_service(ServiceSpec(
            name="gateway", host=config.host, port=config.port, tls=config.tls, log=log,
            metrics_port=config.metrics_port, descriptor=pb.DESCRIPTOR, services=("Generation",),
            add_servicers=lambda server: pb_grpc.add_GenerationServicer_to_server(GenerationService(gateway), server),
            interceptors=[ApiKeyInterceptor(gateway.auth)] if gateway.auth is not None else [],  # a public port
            options=list(options.items()), consul=registry, consul_kind="gateway", grace_s=2.0,
            ready_fields={"model": gateway.model_id, "http_port": config.http_port or None},
            start=start, tasks=tasks, stop=stop))
    finally:
        await gateway.close()


def main(argv=None) -> None:
    try:
        config, level, consul, follow = parse_args(argv)
        log = logging_setup.configure("gateway", level)
        asyncio.run(serve(config, log, consul, follow))
    except (CheckpointError, ValueError, OSError) as exc:
        sys.exit(f"gateway: {exc}")


if __name__ == "__main__":
    main()
