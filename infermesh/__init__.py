"""Shared package of the infermesh services: settings base, errors, telemetry, gRPC helpers, stubs."""

import os

__version__ = "0.1.0"

# gRPC's I/O engine, chosen before grpc is first imported (it reads this once, at import): grpcio 1.80 moved Python
# onto EventEngine, and here its legacy epoll engine costs ~30 % less CPU per call and answers ~25 % sooner
# (docs/performance.md). A GRPC_EXPERIMENTS the operator sets wins (an empty one keeps EventEngine). Every service
# package imports this package first, so `python -m <service>` gets it.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
