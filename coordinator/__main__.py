"""python -m coordinator --model DIR --stages N [--replicas R] [--port P]"""

from __future__ import annotations

import argparse
import asyncio
import sys

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
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    log = logging_setup.configure("coordinator", args.log_level)
    try:
        model = ModelConfig.from_dir(args.model)
        config = CoordinatorConfig(
            num_layers=model.num_hidden_layers, stages=args.stages, replicas=args.replicas,
            metrics_port=args.metrics_port,
            block_size=args.block_size, host=args.host, port=args.port, dead_after_s=args.dead_after_s,
            state_file=args.state_file,
        )
    except (CheckpointError, ValueError) as exc:
        sys.exit(f"coordinator: {exc}")
    asyncio.run(serve(config, log))


if __name__ == "__main__":
    main()
