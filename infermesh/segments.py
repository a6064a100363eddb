"""A batch of several clients' requests for one model: what the gateway's coalesced call carries to the router
(`infermesh.router.v1.Router/InferBatch`), and how the router answers it. Pure logic, no transport.

Each request is a segment: a run of the batch's rows with its own id and parameters. The router answers every
segment on its own, as if it had been sent alone (its rows and flags, or its own error), so one bad request
never fails its neighbours. A plain request is a batch of one segment.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from infermesh import errors
from infermesh.dataplane import InferRequest, ParameterValue
from infermesh.tensors import InputHeader, Inputs, RawInputs, Tensor

MAX_SEGMENTS = 4096


@dataclass(slots=True)
class Segment:
    """One client request inside a batch."""

    rows: int
    id: str = ""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    tenant: str = ""  # the tenant the gateway authenticated: the prediction log records it for label feedback


@dataclass(slots=True)
class InferBatch:
    model: str
    version: str
    inputs: Inputs  # the segments' rows concatenated; shapes are the whole batch's
    outputs: list[str]  # requested output names; empty: all
    segments: list[Segment]


@dataclass(slots=True)
class SegmentResult:
    """A segment's answer: its output rows and flags, or the domain error it failed with."""

    rows: int
    outputs: list[Tensor] = field(default_factory=list)
    flags: dict[str, str] = field(default_factory=dict)
    error: errors.DomainError | None = None
    version: str = ""  # the version that answered it, when not the batch's


@dataclass(slots=True)
class BatchResult:
    model: str
    version: str  # the version that served the batch
    output_names: list[str]  # the outputs every successful segment has, in order
    segments: list[SegmentResult]


def check_segments(segments: Sequence[Segment], batch_rows: int) -> None:
    """The segments must cover the batch's rows exactly."""
    if not segments or len(segments) > MAX_SEGMENTS:
        raise errors.InvalidInput(f"a batch needs 1 to {MAX_SEGMENTS} segments, got {len(segments)}")
    if any(s.rows < 1 for s in segments) or sum(s.rows for s in segments) != batch_rows:
        raise errors.InvalidInput(f"the segments' rows do not add up to the batch of {batch_rows} rows")


def merge(model: str, version: str, requests: Sequence[InferRequest], rows: Sequence[int]) -> InferBatch:
    """One batch carrying every request's rows in order. The requests were validated one by one and have the
    same inputs (name, datatype, shape after the batch dimension) and requested outputs. Raw inputs are joined
    as they came; typed ones are encoded once."""
    first = requests[0]
    raws = [request.inputs.raw() for request in requests]
    headers = [
        InputHeader(header.name, header.datatype, (sum(rows), *header.shape[1:])) for header in first.inputs.headers
    ]
    data = [b"".join(raw[index] for raw in raws) for index in range(len(headers))]
    segments = [
        Segment(count, request.id, request.parameters, request.tenant)
        for request, count in zip(requests, rows, strict=True)
    ]
    return InferBatch(model, version, RawInputs(headers, data), list(first.outputs), segments)


def split_tensors(tensors: Mapping[str, Tensor], rows: Sequence[int]) -> list[dict[str, Tensor]]:
    """Each segment's rows of the batch's inputs (views, no copies)."""
    bounds = np.cumsum([0, *rows])
    return [{name: slice_rows(t, lo, hi) for name, t in tensors.items()} for lo, hi in itertools.pairwise(bounds)]


def slice_rows(tensor: Tensor, lo: int, hi: int) -> Tensor:
    """Rows [lo, hi) of a tensor (a view)."""
    return Tensor(tensor.name, tensor.datatype, (hi - lo, *tensor.shape[1:]), tensor.data[lo:hi])
