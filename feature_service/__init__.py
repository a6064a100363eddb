"""Feature service: batched reads of fresh entity features from Redis, idempotent upserts, over gRPC."""

import infermesh  # noqa: F401  # first: picks gRPC's I/O engine before grpc is imported (infermesh/__init__.py)
