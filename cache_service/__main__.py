"""`python -m cache_service --port P --redis redis://127.0.0.1:6379/0`: run the prefix index.

Prints `cache_service ready port=<P>` on stdout once serving (launchers and tests wait for it),
logs as JSON lines on stderr, and exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from stagemesh import config_cli, discovery
from stagemesh import log as logging_setup
from stagemesh.membership import REDIS_URL_ENV
from stagemesh.security import add_tls_flags, tls_from_args

from cache_service.config import CacheServiceConfig, IndexConfig
from cache_service.server import serve


def parse_config(argv: list[str] | None = None) -> tuple[CacheServiceConfig, str]:
    """The validated config and the log level (logging is process set-up, not service config)."""
    default_redis = config_cli.default_of(IndexConfig, "redis_url")
    parser = argparse.ArgumentParser(prog="python -m cache_service", description=__doc__.splitlines()[0])
    config_cli.add_flags(parser, CacheServiceConfig)
    parser.add_argument("--redis", default="",
                        help="Redis URL of the index; password and TLS: rediss://:PASSWORD@HOST:PORT/DB "
                             f"(default: ${REDIS_URL_ENV}, keeping a password off the command line, "
                             f"else {default_redis})")
    config_cli.add_flags(parser, IndexConfig)
    parser.add_argument("--log-level", default="info")
    add_tls_flags(parser)
    discovery.add_arguments(parser)
    args = parser.parse_args(argv)
    index = config_cli.from_args(IndexConfig, args,
                                 redis_url=args.redis or os.environ.get(REDIS_URL_ENV) or default_redis)
    config = config_cli.from_args(CacheServiceConfig, args, index=index, tls=tls_from_args(args))
    return config, args.log_level, discovery.config_from_args(args)


def main(argv: list[str] | None = None) -> None:
    try:
        config, log_level, consul = parse_config(argv)
    except ValueError as exc:
        sys.exit(f"cache_service: invalid configuration: {exc}")
    logging_setup.configure("cache_service", log_level)  # JSON lines on stderr; stdout keeps the ready line
    asyncio.run(serve(config, consul))


if __name__ == "__main__":
    main()
