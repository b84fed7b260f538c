"""python -m gateway --model DIR --coordinator HOST:PORT [--port P]"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stagemesh import config_cli, discovery
from stagemesh import log as logging_setup
from stagemesh.errors import CheckpointError
from stagemesh.metrics import start_metrics_server
from stagemesh.net import GRPC_OPTIONS
from stagemesh.proc import wait_for_signal
from stagemesh.reflection import enable_reflection
from stagemesh.security import add_port, add_tls_flags, tls_from_args
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
    interceptors = [ApiKeyInterceptor(gateway.auth)] if gateway.auth is not None else []
    # A request bigger than any valid one is refused by gRPC itself (RESOURCE_EXHAUSTED): its bytes
    # are dropped as they arrive, never parsed or held whole (a 100 MB one: RSS +10 MB at most).
    options = {**dict(GRPC_OPTIONS), "grpc.max_receive_message_length":
               grpc_message_limit(config.max_prompt_bytes, gateway.model.max_position_embeddings)}
    server = grpc.aio.server(options=list(options.items()), interceptors=interceptors)
    pb_grpc.add_GenerationServicer_to_server(GenerationService(gateway), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # NOT_SERVING until a plan is ready (the servicer starts out SERVING); the plan watcher keeps it true.
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    gateway.readiness.health = health_servicer
    enable_reflection(server, pb.DESCRIPTOR, "Generation")
    port = add_port(server, f"{config.host}:{config.port}", config.tls)
    await server.start()
    start_metrics_server(config.metrics_port, config.host)
    await gateway.start()
    http = None
    if config.http_port:
        from gateway.http_api import HttpFrontend

        http = HttpFrontend(gateway, config.host, config.http_port)
        await http.start()  # OSError if the port is taken; listening when it returns
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("gateway ready", address=f"{config.host}:{port}", model=gateway.model_id,
             metrics_port=config.metrics_port or None, http_port=config.http_port or None)
    print(f"gateway ready on {config.host}:{port}", flush=True)
    registry = discovery.Discovery(consul) if consul else None
    following = None
    if registry is not None:
        service_id = discovery.service_id("gateway", f"{config.host}:{port}")
        await registry.register(discovery.SERVICE_NAMES["gateway"], service_id, config.host, port)
        if follow:
            following = asyncio.create_task(_follow_leader(gateway, registry, config.coordinator, log))
    await wait_for_signal()
    if registry is not None:
        if following is not None:
            following.cancel()
        try:
            await registry.deregister(service_id)
        except discovery.CONSUL_ERRORS:
            pass
        await registry.close()
    if http is not None:
        await http.stop()
    await server.stop(grace=2.0)
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
