"""Router: joins fresh features into model tensors, coalesces concurrent requests, balances replicas."""

from infermesh.grpc_engine import import_grpc_on_epoll

import_grpc_on_epoll()  # first, before anything imports grpc: the internal services run gRPC's epoll engine
