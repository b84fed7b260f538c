"""Coordinator under Consul: register, take the leader lock or wait as hot standby, then serve.

Without `--consul` none of this runs: `coordinator.server.serve` is called directly and the
coordinator is the registry. With it:

1. the coordinator binds a fixed HOST:PORT (a free one when --port is 0), serves only
   grpc.health.v1 there, answering NOT_SERVING, and registers as `stagemesh-coordinator` with a
   gRPC health check, so Consul lists it as critical and `find` does not return it;
2. it takes the `stagemesh/coordinator-leader` lock (Consul session + KV acquire; the value is
   its HOST:PORT, which workers and gateways read), or waits behind it as standby;
3. once leader, it stops the health-only server and runs `serve()` on the same port; the plan
   comes from `--state-file`, which leader and standby must share (same host or a shared volume);
4. on SIGINT/SIGTERM it releases the lock and deregisters; if the session cannot be renewed
   it exits with status 1 at once, since a standby may already be leading.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stagemesh import discovery
from stagemesh.net import GRPC_OPTIONS, free_port
from stagemesh.proc import wait_for_signal

from coordinator.config import CoordinatorConfig
from coordinator.server import serve


async def serve_with_consul(config: CoordinatorConfig, consul: discovery.ConsulConfig, log) -> None:
    if not config.port:
        config = dataclasses.replace(config, port=free_port(config.host))
    address = f"{config.host}:{config.port}"
    service_id = discovery.service_id("coordinator", address)
    consul_client = discovery.Discovery(consul)
    standby = await _health_only_server(address)
    try:
        await consul_client.register(discovery.SERVICE_NAMES["coordinator"], service_id, config.host, config.port)
        lock = await consul_client.acquire_leadership(discovery.LEADER_KEY, address)
        if lock is None:
            log.info("coordinator standby", address=address, lock=discovery.LEADER_KEY)
            print(f"coordinator standby on {address} (waiting for {discovery.LEADER_KEY})", flush=True)
            waiting = asyncio.create_task(consul_client.wait_for_leadership(discovery.LEADER_KEY, address))
            stop = asyncio.create_task(wait_for_signal())
            await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                waiting.cancel()
                return
            stop.cancel()
            lock = waiting.result()
        log.info("coordinator_leader", address=address, session=lock.session_id)
        await standby.stop(grace=None)
        standby = None
        serving = asyncio.create_task(serve(config, log))
        lost = asyncio.create_task(lock.lost.wait())
        await asyncio.wait({serving, lost}, return_when=asyncio.FIRST_COMPLETED)
        if lost.done():
            serving.cancel()
            log.error("coordinator_leadership_lost", address=address)
            sys.exit("coordinator: lost the Consul leader lock (session not renewed); exiting")
        lost.cancel()
        serving.result()
        await lock.release()
    finally:
        if standby is not None:
            await standby.stop(grace=None)
        try:
            await consul_client.deregister(service_id)
        except discovery.CONSUL_ERRORS:
            pass
        await consul_client.close()


async def _health_only_server(address: str):
    """What a standby serves: grpc.health.v1 saying NOT_SERVING (Consul's check reads it as critical)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return server
