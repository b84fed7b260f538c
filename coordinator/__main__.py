"""python -m coordinator --model DIR --stages N [--replicas R] [--port P]"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from stagemesh import discovery, security
from stagemesh import log as logging_setup
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig

from coordinator.config import CoordinatorConfig
from coordinator.server import serve


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m coordinator")
    p.add_argument("--model", required=True)
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dead-after-s", type=float, default=1.5, help="silence after which a worker is dead")
    p.add_argument("--state-file", default="", help="persist the plan here (survives a coordinator restart)")
    p.add_argument("--restore-grace-s", type=float, default=3.0,
                   help="after a restart from the state file, probe the slots whose worker has not re-registered "
                        "by then; an unreachable one fails over")
    p.add_argument("--restore-wait-s", type=float, default=30.0,
                   help="a restored slot whose worker answers but never re-registers fails over after this")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    p.add_argument("--plan", default="measured", choices=["measured", "uniform"],
                   help="measured: split layers by the workers' profiles to minimise the slowest stage")
    p.add_argument("--split", default="", help="explicit layer counts per stage, e.g. 10,12,10")
    p.add_argument("--no-rebalance", action="store_true", help="never move layer boundaries while serving")
    p.add_argument("--rebalance-threshold", type=float, default=1.25, help="max/mean stage time that triggers a move")
    p.add_argument("--rebalance-window-s", type=float, default=5.0)
    p.add_argument("--rebalance-min-interval-s", type=float, default=60.0)
    p.add_argument("--rebalance-load-timeout-s", type=float, default=120.0,
                   help="undo a move whose new layers are not loaded on every stage within this time")
    discovery.add_arguments(p)
    p.add_argument("--consul-session-ttl-s", type=float, default=10.0,
                   help="leader session TTL: a standby takes over this long after the leader dies "
                        "(Consul's minimum is its agent's session_ttl_min, 10s by default)")
    security.add_tls_flags(p)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    log = logging_setup.configure("coordinator", args.log_level)
    try:
        model = ModelConfig.from_dir(args.model)
        config = CoordinatorConfig(
            num_layers=model.num_hidden_layers, stages=args.stages, replicas=args.replicas,
            metrics_port=args.metrics_port,
            block_size=args.block_size, host=args.host, port=args.port, dead_after_s=args.dead_after_s,
            state_file=args.state_file, restore_grace_s=args.restore_grace_s, restore_wait_s=args.restore_wait_s,
            plan=args.plan, tls=security.tls_from_args(args),
            split=tuple(int(x) for x in args.split.split(",") if x.strip()),
            rebalance=not args.no_rebalance, rebalance_threshold=args.rebalance_threshold,
            rebalance_window_s=args.rebalance_window_s, rebalance_min_interval_s=args.rebalance_min_interval_s,
            rebalance_load_timeout_s=args.rebalance_load_timeout_s,
        )
        consul = discovery.config_from_args(args)
        if consul is not None:
            consul = dataclasses.replace(consul, session_ttl_s=args.consul_session_ttl_s)
    except (CheckpointError, ValueError) as exc:
        sys.exit(f"coordinator: {exc}")
    if consul is None:
        asyncio.run(serve(config, log))  # the embedded registry (default)
    else:
        from coordinator.leader import serve_with_consul  # leader lock, or hot standby behind it

        asyncio.run(serve_with_consul(config, consul, log))


if __name__ == "__main__":
    main()
