"""A stand-in for the Consul agent HTTP API, answering ONLY the endpoints stagemesh.discovery uses.

Consul cannot be installed on these machines, so the Consul backend is tested against this: a
stdlib HTTP server in a thread that keeps services, sessions and KV in memory and behaves as Consul
documents for those endpoints (JSON keys case-insensitive as Consul's decoder accepts them, base64
KV values, X-Consul-Index headers, sessions invalidated when their TTL passes without a renew,
locks released on invalidation with a lock delay). The gRPC health checks it is given are run for
real against the registered HOST:PORT, so "passing" means the service answered SERVING.
Any other endpoint answers 501, so a call outside the contract fails loudly.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _seconds(duration: str | int | float | None, default: float) -> float:
    """Go duration text ('10s', '1500ms', '1m') -> seconds."""
    if duration in (None, ""):
        return default
    if isinstance(duration, (int, float)):
        return duration / 1e9  # Consul reads bare numbers as nanoseconds
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|us|ns|h|m|s)", duration):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    return total


def _lower(d: dict) -> dict:
    return {k.lower(): v for k, v in d.items()}


def grpc_serving(target: str, timeout_s: float) -> bool:
    """What Consul's GRPC check does: grpc.health.v1 Check on HOST:PORT[/service]."""
    address, _, service = target.partition("/")
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class ConsulStandin:
    """In-memory Consul agent. `min_session_ttl_s` is Consul's session_ttl_min (10s by default)."""

    def __init__(self, min_session_ttl_s: float = 10.0):
        self.min_session_ttl_s = min_session_ttl_s
        self.lock = threading.RLock()
        self.index = 1
        self.services: dict[str, dict] = {}
        self.sessions: dict[str, dict] = {}
        self.kv: dict[str, dict] = {}
        self.lock_delay_until: dict[str, float] = {}
        self.tokens_seen: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call, for contract checks
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True),
                         threading.Thread(target=self._background, daemon=True)]

    def start(self) -> ConsulStandin:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- state ---------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.index += 1
        return self.index

    def _invalidate(self, session_id: str) -> None:
        """Session gone (destroyed or TTL passed): release its locks, keep the values (Behavior release)."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        for key, entry in self.kv.items():
            if entry.get("Session") == session_id:
                entry.pop("Session")
                entry["ModifyIndex"] = self._bump()
                self.lock_delay_until[key] = time.monotonic() + session["lock_delay_s"]

    def _background(self) -> None:
        """Expire sessions and run due gRPC health checks, every 50 ms."""
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self.lock:
                for sid in [s for s, v in self.sessions.items() if v["expires"] <= now]:
                    self._invalidate(sid)
                due = [(sid, svc["check"]) for sid, svc in self.services.items()
                       if svc["check"] and svc["check"]["next"] <= now]
                for _, check in due:
                    check["next"] = now + check["interval_s"]
            for sid, check in due:
                status = "passing" if grpc_serving(check["grpc"], check["timeout_s"]) else "critical"
                with self.lock:
                    if sid in self.services and self.services[sid]["check"] is check:
                        check["status"] = status

    # -- endpoints -----------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, object]:
        with self.lock:
            self.requests.append((method, path))
            if method == "PUT" and path == "/v1/agent/service/register":
                return self._register(_lower(json.loads(body or b"{}")))
            if method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
                sid = path.rsplit("/", 1)[1]
                if self.services.pop(sid, None) is None:
                    return 404, f"Unknown service ID {sid!r}"
                return 200, None
            if method == "GET" and path.startswith("/v1/health/service/"):
                return 200, self._health(path.rsplit("/", 1)[1], "passing" in query)
            if method == "PUT" and path == "/v1/session/create":
                return self._session_create(_lower(json.loads(body)) if body else {})
            if method == "PUT" and path.startswith("/v1/session/renew/"):
                session = self.sessions.get(path.rsplit("/", 1)[1])
                if session is None:
                    return 404, f"Session id '{path.rsplit('/', 1)[1]}' not found"
                session["expires"] = time.monotonic() + session["ttl_s"]
                return 200, [self._session_json(path.rsplit("/", 1)[1])]
            if method == "PUT" and path.startswith("/v1/session/destroy/"):
                self._invalidate(path.rsplit("/", 1)[1])
                return 200, True
            if path.startswith("/v1/kv/"):
                key = urllib.parse.unquote(path[len("/v1/kv/"):])
                if method == "GET":
                    return self._kv_get(key)
                if method == "PUT":
                    return self._kv_put(key, query, body)
        return 501, f"{method} {path} is not an endpoint the stand-in answers"

    def _register(self, payload: dict) -> tuple[int, object]:
        name = payload.get("name")
        if not name:
            return 400, "Missing service name"
        checks = payload.get("checks") or ([payload["check"]] if payload.get("check") else [])
        check = None
        for c in map(_lower, checks):
            if c.get("grpc"):
                check = {"grpc": c["grpc"], "interval_s": _seconds(c.get("interval"), 10.0),
                         "timeout_s": _seconds(c.get("timeout"), 10.0), "status": "critical", "next": 0.0}
            else:
                return 501, "the stand-in runs GRPC checks only"
        sid = payload.get("id") or name
        self.services[sid] = {"ID": sid, "Service": name, "Address": payload.get("address", ""),
                              "Port": int(payload.get("port", 0)), "check": check}
        self._bump()
        return 200, None

    def _health(self, name: str, passing_only: bool) -> list[dict]:
        out = []
        for sid, svc in self.services.items():
            if svc["Service"] != name:
                continue
            status = svc["check"]["status"] if svc["check"] else "passing"
            if passing_only and status != "passing":
                continue
            checks = [{"Node": "standin", "CheckID": "serfHealth", "Status": "passing"}]
            if svc["check"]:
                checks.append({"Node": "standin", "CheckID": f"service:{sid}", "Status": status, "ServiceID": sid})
            out.append({"Node": {"Node": "standin", "Address": "127.0.0.1"},
                        "Service": {k: svc[k] for k in ("ID", "Service", "Address", "Port")}, "Checks": checks})
        return out

    def _session_create(self, payload: dict) -> tuple[int, object]:
        ttl_s = _seconds(payload.get("ttl"), 0.0)
        if ttl_s and ttl_s < self.min_session_ttl_s:
            return 500, (f"Invalid Session TTL '{payload.get('ttl')}', "
                         f"must be between [{self.min_session_ttl_s}s=24h0m0s]")
        sid = str(uuid.uuid4())
        self.sessions[sid] = {"name": payload.get("name", ""), "ttl_s": ttl_s or 1e9,
                              "ttl": payload.get("ttl", ""), "expires": time.monotonic() + (ttl_s or 1e9),
                              "lock_delay_s": _seconds(payload.get("lockdelay"), 15.0),
                              "behavior": payload.get("behavior", "release")}
        self._bump()
        return 200, {"ID": sid}

    def _session_json(self, sid: str) -> dict:
        s = self.sessions[sid]
        return {"ID": sid, "Name": s["name"], "TTL": s["ttl"], "Behavior": s["behavior"]}

    def _kv_get(self, key: str) -> tuple[int, object]:
        entry = self.kv.get(key)
        if entry is None:
            return 404, None
        out = {"Key": key, "Flags": 0, "LockIndex": entry["LockIndex"], "CreateIndex": entry["CreateIndex"],
               "ModifyIndex": entry["ModifyIndex"],
               "Value": base64.b64encode(entry["Value"]).decode() if entry["Value"] else None}
        if entry.get("Session"):
            out["Session"] = entry["Session"]
        return 200, [out]

    def _kv_put(self, key: str, query: dict, body: bytes) -> tuple[int, object]:
        entry = self.kv.get(key)
        if "acquire" in query:
            sid = query["acquire"][0]
            if sid not in self.sessions:
                return 500, f"invalid session {sid!r}"
            if entry and entry.get("Session") not in (None, sid):
                return 200, False
            if entry is None or entry.get("Session") != sid:
                if time.monotonic() < self.lock_delay_until.get(key, 0.0):
                    return 200, False
            entry = self._kv_entry(key, entry)
            if entry.get("Session") != sid:
                entry["LockIndex"] += 1
            entry.update(Session=sid, Value=body)
        elif "release" in query:
            if entry is None or entry.get("Session") != query["release"][0]:
                return 200, False
            entry.pop("Session")
            entry["Value"] = body
        else:
            self._kv_entry(key, entry)["Value"] = body
        self.kv[key]["ModifyIndex"] = self._bump()
        return 200, True

    def _kv_entry(self, key: str, entry: dict | None) -> dict:
        if entry is None:
            entry = self.kv[key] = {"Value": b"", "LockIndex": 0, "CreateIndex": self._bump()}
        return entry

    def _handler_class(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                token = self.headers.get("X-Consul-Token")
                if token:
                    with standin.lock:
                        standin.tokens_seen.add(token)
                code, data = standin.handle(self.command, url.path, urllib.parse.parse_qs(url.query, True), body)
                raw = (data if isinstance(data, str) else json.dumps(data)).encode() if data is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(data, str) else "application/json")
                self.send_header("X-Consul-Index", str(standin.index))
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_PUT = do_DELETE = do_POST = _answer

            def log_message(self, *args):
                pass

        return Handler


if __name__ == "__main__":  # python -m tests.consul_standin: a stand-in to try the flags by hand
    import sys

    with ConsulStandin(min_session_ttl_s=float(sys.argv[1]) if len(sys.argv) > 1 else 10.0) as s:
        print(f"consul stand-in ready on {s.url}", flush=True)
        threading.Event().wait()
