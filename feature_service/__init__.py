"""Feature service: batched reads of fresh entity features from Redis, idempotent upserts, over gRPC."""

from infermesh.grpc_engine import import_grpc_on_epoll

import_grpc_on_epoll()  # first, before anything imports grpc: the internal services run gRPC's epoll engine
