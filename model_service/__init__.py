"""Model service: serves TorchScript models over the Open Inference Protocol, with dynamic batching."""

from infermesh.grpc_engine import import_grpc_on_epoll

import_grpc_on_epoll()  # first, before anything imports grpc: the internal services run gRPC's epoll engine
