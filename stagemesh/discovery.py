"""Consul discovery: register a service with a gRPC health check, find passing instances, and
hold the coordinator's leader lock.

Optional at run time: without `--consul` the coordinator is the registry and nothing here runs.
The backend is thin on purpose: every method is one or two Consul HTTP endpoints called through
py-consul's asyncio client (`consul.aio`), and nothing else of Consul is used:

    PUT /v1/agent/service/register             register (check: GRPC "host:port" + Interval)
    PUT /v1/agent/service/deregister/<id>      deregister
    GET /v1/health/service/<name>?passing      find
    PUT /v1/session/create|renew/<id>|destroy/<id>   leader session (TTL, renewed in the background)
    PUT /v1/kv/<key>?acquire=<session> / ?release=<session>   leader lock; the value is the
    GET /v1/kv/<key>                           leader's HOST:PORT, read by workers and gateways

`tests/consul_standin.py` answers exactly these endpoints; `tests/test_discovery.py` is the
contract test. A `Discovery` is created and used on one event loop (aiohttp's session is bound to it).
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from dataclasses import dataclass

import consul
import consul.aio
from consul.callback import CB

SERVICE_NAMES = {
    "coordinator": "stagemesh-coordinator",
    "worker": "stagemesh-worker",
    "gateway": "stagemesh-gateway",
    "cache": "stagemesh-cache",
}
LEADER_KEY = "stagemesh/coordinator-leader"

# What a Consul call can fail with: an HTTP status py-consul maps to ConsulException, or no answer.
CONSUL_ERRORS = (consul.ConsulException, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class ConsulConfig:
    """Where Consul is and how this process uses it; built once in each service's main."""

    url: str  # http://127.0.0.1:8500 (the local agent)
    token: str = ""  # ACL token sent as X-Consul-Token; empty: none (ACLs off)
    check_interval_s: float = 1.0  # how often Consul runs the gRPC health check
    check_timeout_s: float = 1.0
    deregister_after_s: int = 60  # Consul drops a service critical this long (its minimum is 1m)
    # Consul refuses session TTLs below its agent's `session_ttl_min` (10s unless configured) and
    # may take up to 2x the TTL to invalidate a session whose holder died.
    session_ttl_s: float = 10.0
    lock_delay_s: float = 1.0  # after a holder's session dies, nobody may acquire for this long
    poll_interval_s: float = 0.5  # standby and followers re-read the leader key this often

    def __post_init__(self):
        parts = urllib.parse.urlsplit(self.url if "//" in self.url else f"http://{self.url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--consul must look like http://HOST:8500, not {self.url!r}")
        if self.session_ttl_s <= 0 or self.check_interval_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("Consul TTL and intervals must be > 0")

    @property
    def endpoint(self) -> tuple[str, int, str]:
        parts = urllib.parse.urlsplit(self.url if "//" in self.url else f"http://{self.url}")
        return parts.hostname, parts.port or 8500, parts.scheme


def _duration(seconds: float) -> str:
    """Consul's Go duration text: 1.5 -> '1500ms'."""
    return f"{int(round(seconds * 1000))}ms"


class LeaderLock:
    """A held leader lock: the session is renewed every TTL/3 in the background.

    `lost` is set when the session can no longer be renewed (Consul invalidated it, or Consul was
    unreachable for a whole TTL); the holder must then stop acting as leader, since another
    process may already hold the lock.
    """

    def __init__(self, discovery: Discovery, key: str, session_id: str, ttl_s: float):
        self.key, self.session_id, self.ttl_s = key, session_id, ttl_s
        self._d = discovery
        self.lost = asyncio.Event()
        self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self._d._c.session.renew(self.session_id)
                last_ok = loop.time()
            except consul.NotFound:
                break  # invalidated: the lock is gone
            except CONSUL_ERRORS:
                if loop.time() - last_ok >= self.ttl_s:
                    break
        self.lost.set()

    async def release(self) -> None:
        """Give the lock up now (clean shutdown), so the standby need not wait for the TTL."""
        self._renewer.cancel()
        try:
            await self._d._c.kv.put(self.key, None, release=self.session_id)
            await self._d._c.session.destroy(self.session_id)
        except CONSUL_ERRORS:
            pass  # the TTL releases it anyway


class Discovery:
    """Consul backend of one process. Create and use it on the event loop of the service."""

    def __init__(self, config: ConsulConfig):
        self.config = config
        host, port, scheme = config.endpoint
        self._c = consul.aio.Consul(host=host, port=port, scheme=scheme, token=config.token or None)

    async def close(self) -> None:
        await self._c.close()

    async def register(self, service_name: str, service_id: str, address: str, port: int,
                       grpc_health: bool = True) -> None:
        """Register with the local agent; Consul calls grpc.health.v1 Check on HOST:PORT."""
        check = None
        if grpc_health:
            check = consul.Check.grpc(f"{address}:{port}", _duration(self.config.check_interval_s),
                                      timeout=_duration(self.config.check_timeout_s),
                                      deregister=f"{self.config.deregister_after_s}s")
        await self._c.agent.service.register(service_name, service_id=service_id, address=address, port=port,
                                             check=check)

    async def deregister(self, service_id: str) -> None:
        await self._c.agent.service.deregister(service_id)

    async def find(self, service_name: str) -> list[tuple[str, int]]:
        """(address, port) of every instance whose checks all pass."""
        _, entries = await self._c.health.service(service_name, passing=True)
        found = []
        for entry in entries or []:
            svc = entry["Service"]
            found.append((svc.get("Address") or entry["Node"]["Address"], int(svc["Port"])))
        return found

    async def leader(self, key: str = LEADER_KEY) -> str | None:
        """HOST:PORT stored by the current lock holder; None while nobody holds the lock."""
        _, entry = await self._c.kv.get(key)
        if not entry or not entry.get("Session") or not entry.get("Value"):
            return None
        return entry["Value"].decode()

    async def wait_for_leader(self, key: str = LEADER_KEY, timeout_s: float = 120.0) -> str:
        """The leader's HOST:PORT once there is one (workers and gateways started before it)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                address = await self.leader(key)
                if address:
                    return address
            except CONSUL_ERRORS:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no coordinator holds {key} in Consul after {timeout_s:.0f}s")
            await asyncio.sleep(self.config.poll_interval_s)

    async def acquire_leadership(self, key: str, value: str, session_ttl_s: float | None = None) -> LeaderLock | None:
        """One attempt: a fresh TTL session, then KV acquire with `value`. None if someone holds it."""
        ttl = session_ttl_s or self.config.session_ttl_s
        body = {"Name": f"{key} {value}", "TTL": _duration(ttl), "LockDelay": _duration(self.config.lock_delay_s),
                "Behavior": "release"}
        # py-consul's session.create asserts TTL >= 10s; an agent may allow less (session_ttl_min),
        # so the body is sent as is through the same client.
        session_id = await self._c.http.put(CB.json(is_id=True), "/v1/session/create",
                                            headers=self._c.prepare_headers(), data=json.dumps(body))
        try:
            if await self._c.kv.put(key, value, acquire=session_id):
                return LeaderLock(self, key, session_id, ttl)
        except CONSUL_ERRORS:
            pass
        try:
            await self._c.session.destroy(session_id)
        except CONSUL_ERRORS:
            pass
        return None

    async def wait_for_leadership(self, key: str, value: str, session_ttl_s: float | None = None) -> LeaderLock:
        """Hot standby: retry the lock until it is free (holder released it or its session expired)."""
        while True:
            try:
                if not await self.leader(key):
                    lock = await self.acquire_leadership(key, value, session_ttl_s)
                    if lock is not None:
                        return lock
            except CONSUL_ERRORS:
                pass  # Consul unreachable: keep waiting
            await asyncio.sleep(self.config.poll_interval_s)

    async def watch_leader(self, current: str, key: str = LEADER_KEY) -> str:
        """Return the leader's address once it differs from `current` (a standby took over)."""
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                address = await self.leader(key)
            except CONSUL_ERRORS:
                continue
            if address and address != current:
                return address


def add_arguments(parser) -> None:
    """--consul / --consul-token, the same on every service."""
    parser.add_argument("--consul", default="", help="Consul agent URL (http://127.0.0.1:8500): register there "
                        "and find the other services there; empty: the coordinator is the registry")
    parser.add_argument("--consul-token", default="", help="Consul ACL token (X-Consul-Token); empty: none")


def config_from_args(args) -> ConsulConfig | None:
    return ConsulConfig(url=args.consul, token=args.consul_token) if args.consul else None


def service_id(kind: str, address: str) -> str:
    """Stable per address, so a restarted process replaces its own entry."""
    return f"{SERVICE_NAMES[kind]}-{address.replace(':', '-')}"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
