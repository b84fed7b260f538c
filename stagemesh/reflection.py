"""gRPC server reflection, so `grpcurl -plaintext HOST:PORT list` works against every service."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection


def enable_reflection(server, file_descriptor, *service_names: str) -> None:
    """Expose `service_names` (short names in a pb2 module's DESCRIPTOR), gRPC health and reflection.

    Names come from the descriptor, so a renamed or re-packaged service cannot drift from what
    reflection advertises.
    """
    names = [file_descriptor.services_by_name[name].full_name for name in service_names]
    names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
