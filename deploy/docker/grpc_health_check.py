#!/usr/bin/env python
"""Container health check: exit 0 when the gRPC server at ADDRESS reports SERVING on grpc.health.v1.

    grpc-health-check 127.0.0.1:8031 [--service NAME] [--timeout 2]

Installed in the image as /usr/local/bin/grpc-health-check for docker-compose healthchecks (Kubernetes
uses its native gRPC probes instead). It needs only grpcio and grpcio-health-checking, which the image
already has, so no probe binary is downloaded at build time.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 2.0) -> int:
    """0 when SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable, timeout)."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as error:
        print(f"{address}: {error.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{address}: {status}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="host:port of the gRPC server, e.g. 127.0.0.1:8001")
    parser.add_argument("--service", default="", help="service name to check; empty = the whole server")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds before the check fails")
    args = parser.parse_args(argv)
    return check(args.address, args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
