"""python -m coordinator --model DIR --stages N [--replicas R] [--port P]"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from stagemesh import config_cli, discovery, security
from stagemesh import log as logging_setup
from stagemesh.errors import CheckpointError
from stagemesh.model_config import ModelConfig

from coordinator.config import CoordinatorConfig
from coordinator.server import serve


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m coordinator")
    p.add_argument("--model", required=True, help="checkpoint directory or .gguf file (its config gives the layer count)")
    config_cli.add_flags(p, CoordinatorConfig)
    discovery.add_arguments(p)
    p.add_argument("--consul-session-ttl-s", type=float, default=discovery.ConsulConfig.session_ttl_s,
                   help="leader session TTL: a standby takes over this long after the leader dies "
                        "(Consul's minimum is its agent's session_ttl_min, 10s by default)")
    security.add_tls_flags(p)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    log = logging_setup.configure("coordinator", args.log_level)
    try:
        model = ModelConfig.from_dir(args.model)
        config = config_cli.from_args(CoordinatorConfig, args, num_layers=model.num_hidden_layers,
                                      tls=security.tls_from_args(args))
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
