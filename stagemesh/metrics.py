"""Every Prometheus metric of stagemesh, defined once, and the /metrics HTTP server.

Each process (gateway, stage worker, coordinator, cache_service) imports the metrics it updates
from here and serves the default registry on `--metrics-port` (0: off). The names and labels are
what compose/prometheus.yml and compose/grafana/stagemesh-dashboard.json query; change them
together. Metrics a process never touches are still exported (at zero), so every dashboard panel
resolves against every target.

Units are in the names (`_seconds`, `_total`). Gauges carry a `replica` label (index in the plan)
because one gateway may drive several replicas; the dashboard sums over it.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Latency buckets: CPU test meshes are in the 1-100 ms range, big GPU models at 10 ms-10 s.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_E2E = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# -- gateway: per request --------------------------------------------------------------------------
TTFT = Histogram("stagemesh_ttft_seconds", "Time from a request's arrival to its first output token.",
                 buckets=_LATENCY)
ITL = Histogram("stagemesh_itl_seconds", "Time between consecutive output tokens of one request.", buckets=_LATENCY)
E2E = Histogram("stagemesh_e2e_seconds", "Time from a request's arrival to its last response.", buckets=_E2E)
PROMPT_TOKENS = Counter("stagemesh_prompt_tokens", "Prompt tokens of finished requests.")
PREFIX_HIT_TOKENS = Counter("stagemesh_prefix_hit_tokens",
                            "Prompt tokens of finished requests served from the prefix cache (not recomputed).")

# -- gateway: per replica, updated every step ------------------------------------------------------
QUEUE_DEPTH = Gauge("stagemesh_queue_depth", "Sequences waiting for admission.", ["replica"])
RUNNING = Gauge("stagemesh_running_sequences", "Sequences holding KV blocks (admitted, unfinished).", ["replica"])
KV_USED = Gauge("stagemesh_kv_blocks_used", "KV blocks referenced by live sequences.", ["replica"])
KV_FREE = Gauge("stagemesh_kv_blocks_free", "KV blocks free for allocation (prefix-cached ones included).",
                ["replica"])
HOP = Histogram("stagemesh_hop_seconds",
                "Mean network and relay time per stage hop of one micro-batch: (Forward round trip "
                "minus the stages' compute) / stages.", buckets=_FAST)
TURNAROUND = Histogram("stagemesh_step_turnaround_seconds",
                       "Gateway time from applying a returned micro-batch to issuing the Forward that takes its "
                       "slot (sequences updated, the next step scheduled and built): with one micro-batch in "
                       "flight the stages wait this long; with more, it uses up the time the queued ones cover.",
                       buckets=_FAST)
REPLAYS = Counter("stagemesh_replays",
                  "Sequences recomputed from their token history: re-queued by a new plan or preempted.")

# -- stage worker ----------------------------------------------------------------------------------
STAGE_STEP = Histogram("stagemesh_stage_step_seconds", "Compute time of one micro-batch on one stage.",
                       ["stage"], buckets=_FAST)

# -- coordinator -----------------------------------------------------------------------------------
REBALANCES = Counter("stagemesh_rebalances", "Plan changes after the first plan (new epoch: rebalance or failover).")


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    """Serve the default registry at http://host:port/metrics from a daemon thread; port 0: off.

    Raises OSError when the port is taken, so a misconfigured service fails at start-up.
    """
    if port:
        start_http_server(port, addr=host)
