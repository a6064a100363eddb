"""Triton's per-model-version statistics (the statistics extension: `ModelStatistics`), transport-free.

The model services count what they do; the router adds up its replicas' figures; the gateway shows each tenant
the models it may use. Sizes are bounded: a model version has at most one batch entry per batch size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    """How many times something happened and how long it took in all (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns * count

    def merge(self, other: Duration) -> None:
        self.count += other.count
        self.ns += other.ns


@dataclass(slots=True)
class BatchStatistics:
    """The forward passes of one batch size: each counted once."""

    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def merge(self, other: BatchStatistics) -> None:
        self.compute_input.merge(other.compute_input)
        self.compute_infer.merge(other.compute_infer)
        self.compute_output.merge(other.compute_output)


@dataclass(slots=True)
class ModelStatistics:
    """One model version's activity since its service started. Per request: success (whole time in the service),
    fail, queue, and the compute parts of the batch it ran in; per batch: the batch statistics."""

    name: str
    version: str
    last_inference_ms: int = 0  # milliseconds since the epoch; 0: never
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # forward passes
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStatistics] = field(default_factory=dict)

    def record_batch(self, requests: int, rows: int, input_ns: int, infer_ns: int, output_ns: int, at_ms: int) -> None:
        """A forward pass over `rows` rows of `requests` requests."""
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = max(self.last_inference_ms, at_ms)
        self.compute_input.add(input_ns, requests)
        self.compute_infer.add(infer_ns, requests)
        self.compute_output.add(output_ns, requests)
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStatistics(rows)
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def merge(self, other: ModelStatistics) -> None:
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        for mine, theirs in (
            (self.success, other.success),
            (self.fail, other.fail),
            (self.queue, other.queue),
            (self.compute_input, other.compute_input),
            (self.compute_infer, other.compute_infer),
            (self.compute_output, other.compute_output),
        ):
            mine.merge(theirs)
        for size, batch in other.batches.items():
            known = self.batches.get(size)
            if known is None:
                known = self.batches[size] = BatchStatistics(size)
            known.merge(batch)


def add_up(parts: Iterable[ModelStatistics]) -> list[ModelStatistics]:
    """Several services' statistics as one figure per model version, sorted by model and version."""
    total: dict[tuple[str, str], ModelStatistics] = {}
    for part in parts:
        key = (part.name, part.version)
        known = total.get(key)
        if known is None:
            known = total[key] = ModelStatistics(part.name, part.version)
        known.merge(part)
    return [total[key] for key in sorted(total, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else 0, k[1]))]
