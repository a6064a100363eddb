"""Gateway: the public Open Inference Protocol endpoint. Authenticates, admits, validates, forwards."""

import infermesh  # noqa: F401  # first: picks gRPC's I/O engine before grpc is imported (infermesh/__init__.py)
