"""python -m gateway --model DIR --coordinator HOST:PORT [--port P]"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stagemesh import discovery
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
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, tokenizer.json)")
    p.add_argument("--coordinator", default="", help="HOST:PORT; with --consul and without it: the leader in Consul")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--served-model-name", "--model-id", dest="model_id", default="",
                   help="the model name the APIs serve (/v1/models, ListModels, responses) and requests must "
                        "name; default: the checkpoint directory's name")
    p.add_argument("--cache-service", default="")
    p.add_argument("--max-batched-tokens", type=int, default=512)
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--max-waiting", type=int, default=1024)
    p.add_argument("--inflight", type=int, default=0,
                   help="micro-batches in flight (0: 3 on a single stage with async scheduling, stages + 2 on a "
                        "chain with it, else max(2, stages), following the plan's changes)")
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="send a greedy decode before the sample it follows is back: auto on single-stage "
                        "replicas, on on every replica (chains too), off never")
    p.add_argument("--routing", default="cache_aware", choices=["cache_aware", "round_robin"])
    p.add_argument("--routing-weight", type=float, default=2.0)
    p.add_argument("--plan-wait-s", type=float, default=300.0,
                   help="while serving, requests on a stalled replica fail UNAVAILABLE (saying why) once the "
                        "plan has been not ready this long (at start the gateway waits for a plan without limit, "
                        "NOT_SERVING meanwhile)")
    p.add_argument("--http-port", type=int, default=0, help="also serve the OpenAI-compatible HTTP API here")
    p.add_argument("--max-prompt-bytes", type=int, default=4 << 20,
                   help="prompt text above this is refused before tokenizing (RESOURCE_EXHAUSTED / HTTP 413); "
                        "the gRPC message and HTTP body size limits follow from it")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    p.add_argument("--log-level", default="info")
    add_tls_flags(p, public=True)
    p.add_argument("--coordinator-plaintext", action="store_true",
                   help="reach the coordinator without TLS even when --tls-* is set")
    p.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable)")
    p.add_argument("--api-keys-file", default="", help="file of accepted API keys, one per line")
    p.add_argument("--rate-limit-rps", type=float, default=0.0, help="Generate requests/s per API key (0: off)")
    p.add_argument("--rate-limit-burst", type=float, default=0.0, help="burst per API key (0: max(1, rps))")
    p.add_argument("--auth-max-failures", type=int, default=10,
                   help="wrong API keys from one peer within a minute before it is locked out (0: never)")
    p.add_argument("--auth-lockout-s", type=float, default=30.0, help="how long a locked-out peer is refused")
    discovery.add_arguments(p)
    args = p.parse_args(argv)
    if not args.coordinator and not args.consul:
        p.error("--coordinator HOST:PORT is required (or --consul URL to find the coordinator in Consul)")
    consul = discovery.config_from_args(args)
    follow = consul is not None and not args.coordinator
    if consul is not None:
        args.coordinator, args.cache_service = asyncio.run(_from_consul(consul, args.coordinator, args.cache_service))
    # Keys also come from $STAGEMESH_API_KEYS (how `stagemesh up` hands them over: not in argv).
    keys = [*args.api_key, *(load_keys_file(args.api_keys_file) if args.api_keys_file else []), *keys_from_env()]
    sched = SchedulerConfig(max_batched_tokens=args.max_batched_tokens, max_running=args.max_running,
                            max_waiting=args.max_waiting, inflight_target=args.inflight,
                            async_scheduling=args.async_scheduling)
    return GatewayConfig(model_dir=args.model, coordinator=args.coordinator, host=args.host, port=args.port,
                         model_id=args.model_id, cache_service=args.cache_service, http_port=args.http_port,
                         max_prompt_bytes=args.max_prompt_bytes, plan_wait_s=args.plan_wait_s,
                         metrics_port=args.metrics_port,
                         routing=args.routing, routing_weight=args.routing_weight,
                         scheduler=sched, tls=tls_from_args(args, require_client_cert=args.tls_require_client_cert),
                         coordinator_plaintext=args.coordinator_plaintext, api_keys=tuple(keys),
                         rate_limit_rps=args.rate_limit_rps, rate_limit_burst=args.rate_limit_burst,
                         auth_max_failures=args.auth_max_failures, auth_lockout_s=args.auth_lockout_s), \
        args.log_level, consul, follow


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
