"""Gateway settings, built once in main and validated here."""

from __future__ import annotations

from dataclasses import dataclass, field

from stagemesh.config_cli import knob
from stagemesh.tls import TlsConfig

from gateway.scheduler import SchedulerConfig
from gateway.validation import DEFAULT_MAX_STOP_STRINGS


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: str = knob(help="checkpoint directory (config.json, tokenizer.json) or .gguf file", flag="--model")
    coordinator: str = knob("", "HOST:PORT of the coordinator; with --consul and without it: the leader in Consul")
    host: str = knob("127.0.0.1", "address the gateway's ports bind")
    port: int = knob(50051, "gRPC port of the public Generation API")
    model_id: str = knob("", "the model name the APIs serve (/v1/models, ListModels, responses) and requests must "
                             "name; default: the checkpoint directory's name",
                         flag="--served-model-name", aliases=("--model-id",))
    max_model_len: int = knob(0, "longest sequence (prompt + output) served; 0: the model's max_position_embeddings. "
                                 "/v1/models and ListModels report the smaller of this and what a replica's KV "
                                 "cache holds")
    default_max_tokens: int = 16
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS  # the OpenAPI document states the default
    # The gRPC message and HTTP body limits follow from it (gateway/validation.py).
    max_prompt_bytes: int = knob(4 << 20, "prompt text above this is refused before tokenizing "
                                          "(RESOURCE_EXHAUSTED / HTTP 413); the gRPC message and HTTP body size "
                                          "limits follow from it")
    forward_timeout_s: float = 120.0
    plan_wait_s: float = knob(300.0, "while serving, requests on a stalled replica fail UNAVAILABLE (saying why) once "
                                     "the plan has been not ready this long (at start the gateway waits for a plan "
                                     "without limit, NOT_SERVING meanwhile)")
    http_port: int = knob(0, "also serve the OpenAI-compatible HTTP API on this port (0: off)")
    metrics_port: int = knob(0, "serve Prometheus /metrics here (0: off)")
    cache_service: str = knob("", "HOST:PORT of cache_service (the global prefix index); empty: local prefix "
                                  "matching only")
    routing: str = knob("cache_aware", "how a request picks its replica", choices=("cache_aware", "round_robin"))
    # 2.0 measured best on the shared-prefix workload (benchmarks/bench_prefix.py): at 1.0 the
    # load term diverts requests from the replica holding their prefix too early.
    routing_weight: float = knob(2.0, "w in cost = w * blocks to prefill + load (higher: follow the cache harder)")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tls: TlsConfig | None = None  # public port TLS (client cert optional unless required); mTLS on links
    coordinator_plaintext: bool = knob(False, "reach the coordinator without TLS even when --tls-* is set")
    # Also from --api-keys-file and $STAGEMESH_API_KEYS (how `stagemesh up` hands them over: not in argv).
    api_keys: tuple[str, ...] = knob((), "accepted API key (repeatable); empty: no key needed", flag="--api-key")
    rate_limit_rps: float = knob(0.0, "Generate requests/s per API key (0: off)")
    rate_limit_burst: float = knob(0.0, "burst per API key (0: max(1, rps))")
    auth_max_failures: int = knob(10, "wrong API keys from one peer within a minute before it is locked out "
                                      "(0: never)")
    auth_lockout_s: float = knob(30.0, "how long a locked-out peer is refused")

    def __post_init__(self):
        if not self.coordinator:
            raise ValueError("the gateway needs --coordinator HOST:PORT")
        if self.routing not in ("cache_aware", "round_robin"):
            raise ValueError(f"--routing must be cache_aware or round_robin, not {self.routing!r}")
        if self.max_model_len < 0:
            raise ValueError("--max-model-len must be >= 0 (0: the model's own)")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.max_prompt_bytes < 1:
            raise ValueError("--max-prompt-bytes must be >= 1")
