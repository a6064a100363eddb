"""Shared package of the infermesh services: settings base, errors, telemetry, gRPC helpers, stubs."""

__version__ = "0.1.0"
