"""Router: joins fresh features into model tensors, coalesces concurrent requests, balances replicas."""

import infermesh  # noqa: F401  # first: picks gRPC's I/O engine before grpc is imported (infermesh/__init__.py)
