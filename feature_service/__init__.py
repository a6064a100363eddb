"""Feature service: batched reads of fresh entity features from Redis, idempotent upserts, over gRPC."""
