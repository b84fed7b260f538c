"""One bootstrap for every gRPC service: server, member-auth interceptor, health, reflection, TLS
port, metrics, ready line, Consul registration, and the way down on SIGINT/SIGTERM.

A service describes itself in a `ServiceSpec` and calls `run_service(spec)`. The order is fixed:
bind and start the port (health NOT_SERVING), start /metrics, run `spec.start` (e.g. the gateway
waiting for its first plan), turn health SERVING, print the ready line (`stagemesh up` and the
tests wait for it), register in Consul, start `spec.tasks`; then serve until a signal or until
one of those tasks ends (a failed one is printed and the process exits 1, so a supervisor
restarts it); then deregister, cancel the tasks, run `spec.stop` and stop the server.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stagemesh import discovery
from stagemesh.membership import server_interceptors
from stagemesh.metrics import start_metrics_server
from stagemesh.net import GRPC_OPTIONS
from stagemesh.proc import wait_for_signal
from stagemesh.reflection import enable_reflection
from stagemesh.security import TlsConfig, add_port


@dataclass
class Running:
    """What a started service knows about itself (handed to its start/tasks/stop hooks)."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    address: str  # advertised HOST:PORT


@dataclass
class ServiceSpec:
    name: str  # in the ready line, logs and stderr messages ("coordinator", "stage worker", ...)
    host: str
    port: int
    tls: TlsConfig | None
    add_servicers: Callable[[grpc.aio.Server], None]
    descriptor: Any  # the pb2 module's DESCRIPTOR, for reflection
    services: tuple[str, ...]  # short service names in it
    log: Any
    metrics_port: int = 0
    # Ready line printed on stdout; {address} and {port} are filled in.
    ready_line: str = "{name} ready on {address}"
    ready_fields: dict[str, Any] = field(default_factory=dict)  # extra fields of the ready log event
    ready_event: str = ""  # default "{name} ready"
    advertise: str = ""  # address others reach us at; default host:port
    # None: internal service, mesh members only (stagemesh/membership.py); else these interceptors.
    interceptors: list | None = None
    options: list = field(default_factory=lambda: list(GRPC_OPTIONS))
    consul: discovery.Discovery | None = None  # registered in (and closed at the end) when given
    consul_kind: str = ""  # discovery.SERVICE_NAMES key
    start: Callable[[Running], Awaitable[None]] | None = None  # before SERVING and the ready line
    tasks: Callable[[Running], list[asyncio.Task]] | None = None  # after the ready line
    stop: Callable[[], Awaitable[None]] | None = None  # after the tasks end, before the server stops
    grace_s: float = 1.0


def build_server(spec: ServiceSpec) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    interceptors = spec.interceptors
    if interceptors is None:
        interceptors = server_interceptors(spec.host, spec.tls, spec.name)
    server = grpc.aio.server(options=spec.options, interceptors=interceptors)
    spec.add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, spec.descriptor, *spec.services)
    return server, health_servicer


async def run_service(spec: ServiceSpec) -> None:
    """Serve `spec` until SIGINT/SIGTERM or until one of its tasks ends (see the module doc)."""
    server, health_servicer = build_server(spec)
    # NOT_SERVING until ready (the servicer starts out SERVING): a probe never sees a half-started service.
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = add_port(server, f"{spec.host}:{spec.port}", spec.tls)  # OSError if it cannot bind
    await server.start()
    running = Running(server, health_servicer, port, spec.advertise or f"{spec.host}:{port}")
    failed: BaseException | None = None
    tasks: list[asyncio.Task] = []
    try:
        start_metrics_server(spec.metrics_port, spec.host)
        if spec.start is not None:
            await spec.start(running)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        spec.log.info(spec.ready_event or f"{spec.name} ready", address=running.address,
                      metrics_port=spec.metrics_port or None, **spec.ready_fields)
        print(spec.ready_line.format(name=spec.name, address=running.address, port=port), flush=True)
        if spec.consul is not None:
            await spec.consul.register(discovery.SERVICE_NAMES[spec.consul_kind], _service_id(spec, running),
                                       *discovery.split_address(running.address))
        tasks = spec.tasks(running) if spec.tasks is not None else []
        failed = await _serve_until_stopped(tasks)
    finally:
        for task in tasks:
            task.cancel()
        await _deregister(spec, running)
        if spec.stop is not None:
            await spec.stop()
        await server.stop(grace=spec.grace_s)
    if failed is not None:
        trace = "".join(traceback.format_exception(failed))  # where it failed: a CUDA error's message alone says little
        spec.log.error("service_failed", error=str(failed), traceback=trace)
        print(f"{spec.name}: {failed}\n{trace}", file=sys.stderr, flush=True)
        sys.exit(1)


async def _serve_until_stopped(tasks: list[asyncio.Task]) -> BaseException | None:
    """Wait for a signal or for a task to end; the exception of a task that failed, else None."""
    signal = asyncio.create_task(wait_for_signal())
    done, _ = await asyncio.wait({signal, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    signal.cancel()
    for task in done:
        if task is not signal and not task.cancelled() and task.exception() is not None:
            return task.exception()
    return None


def _service_id(spec: ServiceSpec, running: Running) -> str:
    return discovery.service_id(spec.consul_kind, running.address)


async def _deregister(spec: ServiceSpec, running: Running) -> None:
    if spec.consul is None:
        return
    try:
        await spec.consul.deregister(_service_id(spec, running))
    except discovery.CONSUL_ERRORS:
        pass  # Consul drops it once its check has been critical long enough
    await spec.consul.close()
