"""`python -m stagemesh.healthcheck HOST:PORT`: exit 0 when the server's gRPC health is SERVING.

The probe behind every container health check in compose/ (Docker reads exit 0 as healthy and 1 as
unhealthy). Every stagemesh service serves the standard `grpc.health.v1.Health` service, so this is
the same check that `grpc_health_probe -addr HOST:PORT` makes, without a binary in the image.
Any answer but SERVING, and any failure to get one in time, exits 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving, what was seen) for one Health.Check call to `address`."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stagemesh.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument("--service", default="", help="service name to ask about ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    serving, seen = check(args.address, args.service, args.timeout)
    if not serving:
        print(f"{args.address}: {seen}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.address}: {seen}")


if __name__ == "__main__":
    main()
