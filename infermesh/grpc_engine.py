"""gRPC core's I/O engine for a service process, chosen before grpc is imported (docs/performance.md).

grpcio 1.80 moved Python onto gRPC core's EventEngine. For the mesh's internal services (router, feature service,
model service) its older epoll engine costs ~30 % less CPU per call here; the public gateway keeps EventEngine, under
which it serves about twice as many requests when flooded at 3x its capacity. gRPC reads GRPC_EXPERIMENTS once,
when grpc is imported: the variable is set for that import only and removed again, so processes this one starts
choose for themselves. A GRPC_EXPERIMENTS the operator set is left alone (an empty one keeps EventEngine).
"""

from __future__ import annotations

import importlib
import os
import sys

EPOLL_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

# What this process chose: "epoll", or None (EventEngine, the operator's GRPC_EXPERIMENTS, or grpc already loaded).
chosen: str | None = None


def import_grpc_on_epoll() -> None:
    """Import grpc on the epoll engine, unless grpc is already imported or the operator chose."""
    global chosen
    if "grpc" in sys.modules or "GRPC_EXPERIMENTS" in os.environ:
        return
    os.environ["GRPC_EXPERIMENTS"] = EPOLL_EXPERIMENTS
    try:
        importlib.import_module("grpc")
    finally:
        del os.environ["GRPC_EXPERIMENTS"]
    chosen = "epoll"
