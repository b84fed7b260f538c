"""A real `redis-server` for tests: a free loopback port, a temp dir, no persistence.

`RedisServer` starts, stops and restarts (on the same port, so clients keep their URL) one
server; `redis_server` is a module-scoped pytest fixture around it. Import the fixture into a test
module (`from tests.redis_server import redis_server`) or a conftest. Tests that stop Redis must
leave it running again (`restart()`), because the fixture is shared by the module.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process owned by a test; `stop()` and `restart()` simulate an outage."""

    def __init__(self, port: int | None = None, binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise RuntimeError(f"{binary} is not installed (apt-get install redis-server)")
        self.binary = path
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="stagemesh-redis-")
        self.log_path = f"{self.dir}/redis.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 5.0) -> "RedisServer":
        """Start and wait until it answers PING."""
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait_for_ping(timeout_s)
        return self

    def stop(self) -> None:
        """Terminate the server and wait for its port to close."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, empty."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _wait_for_ping(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                with open(self.log_path, errors="replace") as log:
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {log.read()}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout_s}s")


@pytest.fixture(scope="module")
def redis_server():
    """A running RedisServer for the module; stopped and its temp dir removed afterwards."""
    server = RedisServer().start()
    yield server
    server.close()
