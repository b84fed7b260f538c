"""Configuration of cache_service: one dataclass, built once in `__main__`, validated on creation.

`IndexConfig` is the part `PrefixIndex` needs (Redis and schema); `CacheServiceConfig` adds what
the gRPC server needs (address and request limits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse

from stagemesh.config_cli import knob
from stagemesh.tls import TlsConfig


@dataclass(frozen=True)
class IndexConfig:
    """Redis connection and schema settings of the global prefix index."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Where the index lives; `redis://host:port/db` (plain TCP or unix://). Its flag, --redis, is
    cache_service's own (it falls back to $STAGEMESH_REDIS_URL, keeping a password off argv)."""
    # Bounds how long the entry of a replica that vanished without a ClearReplica lingers.
    block_ttl_s: int = knob(3600, "expiry of a block entry, refreshed whenever it is stored or matched")
    # Lets tests and deployments share a Redis.
    key_prefix: str = knob("sm:v1:", "namespace of every Redis key written")
    redis_timeout_s: float = knob(1.0, "Redis connect/read timeout; a Redis slower than this counts as unavailable")
    max_connections: int = 64
    """Connection pool size; one connection per rpc in flight."""
    # A password goes in the URL: `rediss://:PASSWORD@host:6380/0` (or `redis://user:PASSWORD@...`).
    redis_tls_ca: str = knob("", "CA that verifies a rediss:// server (default: the system's)")

    @property
    def refresh_interval_s(self) -> int:
        """A used block's TTL is reset at most this often: one write per block per interval
        instead of one per look-up, at the price of entries living 7/8..1 of block_ttl_s."""
        return max(1, self.block_ttl_s // 8)

    def __post_init__(self) -> None:
        scheme = urlparse(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url must be redis://, rediss:// or unix://, got {self.redis_url!r}")
        if self.block_ttl_s < 1:
            raise ValueError(f"block_ttl_s must be >= 1, got {self.block_ttl_s}")
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty (the index would collide with other data)")
        if self.redis_timeout_s <= 0:
            raise ValueError(f"redis_timeout_s must be > 0, got {self.redis_timeout_s}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")


@dataclass(frozen=True)
class CacheServiceConfig:
    """Everything `python -m cache_service` needs."""

    host: str = knob("127.0.0.1", "address to bind")
    port: int = knob(50070, "gRPC port; 0 picks a free one (printed on the ready line)")
    index: IndexConfig = field(default_factory=IndexConfig)
    """Redis and schema settings, handed to PrefixIndex."""
    max_chains_per_match: int = 1024
    """Upper bound on chains in one Match; a Redis script blocks Redis while it runs."""
    max_hashes_per_request: int = 1 << 17
    """Upper bound on block hashes in one Match or Publish, for the same reason."""
    grace_s: float = 2.0
    """How long in-flight rpcs may finish after SIGTERM/SIGINT."""
    metrics_port: int = knob(0, "serve Prometheus /metrics here (0: off)")
    tls: TlsConfig | None = None
    """Mutual TLS on the gRPC port: callers need a client certificate signed by the CA."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.max_chains_per_match < 1:
            raise ValueError(f"max_chains_per_match must be >= 1, got {self.max_chains_per_match}")
        if self.max_hashes_per_request < 1:
            raise ValueError(f"max_hashes_per_request must be >= 1, got {self.max_hashes_per_request}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
