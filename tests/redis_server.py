"""The `redis_server` pytest fixture: a real `redis-server` (stagemesh.cli.harness.RedisServer)
shared by a module. Import it into a test module (`from tests.redis_server import redis_server`)
or a conftest. Tests that stop Redis must leave it running again (`restart()`), because the
fixture is shared by the module.
"""

from __future__ import annotations

import pytest

from stagemesh.cli.harness import RedisServer


@pytest.fixture(scope="module")
def redis_server():
    """A running RedisServer for the module; stopped and its temp dir removed afterwards."""
    server = RedisServer().start()
    yield server
    server.close()
