"""Model service: serves TorchScript models over the Open Inference Protocol, with dynamic batching."""

import infermesh  # noqa: F401  # first: picks gRPC's I/O engine before grpc is imported (infermesh/__init__.py)
