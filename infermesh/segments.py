"""Segmented ModelInfer between the gateway and the router: several clients' requests travel as one call.

The gateway coalesces concurrent requests for one model into one `ModelInferRequest` whose inputs are the
requests' rows, concatenated, and names the rows of each request in the parameter `infermesh_segments`
("1,1,4"). The router answers each segment on its own (its own result, flags, or error) and returns one
response: the successful segments' output rows, concatenated in order, and in the same parameter a JSON
report per segment. This module is the protocol's pure part; `infermesh.oip` builds the messages.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infermesh import errors
from infermesh.tensors import Tensor

SEGMENTS = "infermesh_segments"
MAX_SEGMENTS = 4096

# Domain errors by name, so a segment's error crosses the hop with its class (and so its status code).
ERRORS: dict[str, type[errors.DomainError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidInput,
        errors.NotFound,
        errors.Unauthenticated,
        errors.PermissionDenied,
        errors.Overloaded,
        errors.QueueFull,
        errors.DeadlineExceeded,
        errors.Unavailable,
        errors.FailedPrecondition,
    )
}


@dataclass(slots=True)
class SegmentResult:
    """A segment's answer: its output rows and flags, or the domain error it failed with."""

    rows: int
    outputs: list[Tensor] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    error: errors.DomainError | None = None


def parse_rows(text: str, batch_rows: int) -> list[int]:
    """The rows of each segment, from the request parameter's value."""
    try:
        rows = [int(part) for part in text.split(",")]
    except ValueError:
        raise errors.InvalidInput(f"parameter '{SEGMENTS}' must be comma-separated row counts") from None
    if not rows or len(rows) > MAX_SEGMENTS or any(r < 1 for r in rows) or sum(rows) != batch_rows:
        raise errors.InvalidInput(f"parameter '{SEGMENTS}' does not add up to the batch of {batch_rows} rows")
    return rows


def split_tensors(tensors: Mapping[str, Tensor], rows: Sequence[int]) -> list[dict[str, Tensor]]:
    """Each segment's rows of the merged inputs (views, no copies)."""
    bounds = np.cumsum([0, *rows])
    return [
        {name: Tensor(name, t.datatype, (hi - lo, *t.shape[1:]), t.data[lo:hi]) for name, t in tensors.items()}
        for lo, hi in itertools.pairwise(bounds)
    ]


def report(results: Sequence[SegmentResult]) -> str:
    """The response parameter: per segment its rows and flags, or its error's class and message."""
    reports: list[dict[str, object]] = []
    for result in results:
        if result.error is not None:
            reports.append({"error": type(result.error).__name__, "message": str(result.error)})
        elif result.parameters:
            reports.append({"rows": result.rows, "parameters": result.parameters})
        else:
            reports.append({"rows": result.rows})
    return json.dumps(reports, separators=(",", ":"))


def read_report(text: str, segments: int) -> list[dict[str, Any]]:
    try:
        reports = json.loads(text)
    except ValueError:
        reports = None
    if not isinstance(reports, list) or len(reports) != segments:
        raise errors.Unavailable("the router's answer per segment is malformed")
    return reports


def error_of(report: Mapping[str, Any]) -> errors.DomainError | None:
    name = report.get("error")
    if name is None:
        return None
    return ERRORS.get(name, errors.Unavailable)(str(report.get("message", "")))
