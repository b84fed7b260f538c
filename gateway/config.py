"""Gateway settings, built once in main and validated here."""

from __future__ import annotations

from dataclasses import dataclass, field

from stagemesh.security import TlsConfig

from gateway.scheduler import SchedulerConfig


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: str
    coordinator: str  # host:port
    host: str = "127.0.0.1"
    port: int = 50051
    model_id: str = ""  # defaults to the checkpoint directory's name
    default_max_tokens: int = 16
    max_stop_strings: int = 16
    # Prompt text above this is refused before tokenizing (RESOURCE_EXHAUSTED / HTTP 413); the
    # gRPC message and HTTP body limits follow from it (gateway/validation.py).
    max_prompt_bytes: int = 4 << 20
    forward_timeout_s: float = 120.0
    plan_wait_s: float = 300.0
    http_port: int = 0  # OpenAI-compatible HTTP API; 0: off
    metrics_port: int = 0  # Prometheus /metrics; 0: off
    cache_service: str = ""  # host:port of cache_service; empty: local prefix matching only
    routing: str = "cache_aware"  # or "round_robin"
    # w in cost = w * blocks to prefill after the overlap + blocks of work queued on the replica.
    # 2.0 measured best on the shared-prefix workload (benchmarks/bench_prefix.py): at 1.0 the
    # load term diverts requests from the replica holding their prefix too early.
    routing_weight: float = 2.0
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tls: TlsConfig | None = None  # public port TLS (client cert optional unless required); mTLS on links
    coordinator_plaintext: bool = False  # reach a coordinator that does not serve TLS yet
    api_keys: tuple[str, ...] = ()  # empty: no API key needed
    rate_limit_rps: float = 0.0  # Generate requests per second per API key; 0: unlimited
    rate_limit_burst: float = 0.0  # bucket size; 0: max(1, rate)
    # Wrong API keys from one peer: this many within a minute lock it out for auth_lockout_s (0: off).
    auth_max_failures: int = 10
    auth_lockout_s: float = 30.0

    def __post_init__(self):
        if not self.coordinator:
            raise ValueError("the gateway needs --coordinator HOST:PORT")
        if self.routing not in ("cache_aware", "round_robin"):
            raise ValueError(f"--routing must be cache_aware or round_robin, not {self.routing!r}")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.max_prompt_bytes < 1:
            raise ValueError("--max-prompt-bytes must be >= 1")
