"""The gateway's transport-free core: authentication, admission, validation against public metadata."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.auth import KeyStore
from infermesh import metrics
from infermesh.errors import InvalidInput, NotFound, Overloaded
from infermesh.model_config import ModelEntry
from infermesh.segments import SEGMENTS
from infermesh.tensors import NUMPY_DTYPE, Tensor, element_count
from infermesh.validation import validate_inputs


def batch_rows_within(entry: ModelEntry, outputs: Iterable[str], max_bytes: int) -> int:
    """Most rows a coalesced batch may hold so that its response stays within `max_bytes`: max_batch_size,
    lowered where the requested outputs' row sizes are known (fixed dims, fixed-size types). Where they are not
    (BYTES, variable dims) only max_batch_size and the coalescer's byte budget for requests bound it."""
    config = entry.config
    wanted = set(outputs)
    row_bytes = 0
    for spec in config.outputs:
        if wanted and spec.name not in wanted:
            continue
        if spec.datatype == "BYTES" or any(d < 0 for d in spec.shape[1:]):
            return config.max_batch_size
        row_bytes += element_count(spec.shape[1:]) * NUMPY_DTYPE[spec.datatype].itemsize
    if row_bytes == 0:
        return config.max_batch_size
    return max(1, min(config.max_batch_size, max_bytes // row_bytes))


class Admission:
    """A bounded number of requests in flight; beyond it refuse at once (never queue)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0

    def __enter__(self) -> Admission:
        if self.inflight >= self.limit:
            metrics.ADMISSION_REJECTED.labels("gateway", "max_inflight").inc()
            raise Overloaded("server is at capacity, retry later")
        self.inflight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.inflight -= 1


class GatewayCore:
    def __init__(self, models: dict[str, ModelEntry], keys: KeyStore, max_inflight: int) -> None:
        self.models = models
        self.keys = keys
        self.admission = Admission(max_inflight)

    def authorized_model(self, authorization: str | None, name: str, version: str = "") -> ModelEntry:
        """The model a caller may use: UNAUTHENTICATED, then NOT_FOUND (unknown model or version, told only
        to an authenticated caller), then PERMISSION_DENIED."""
        tenant = self.keys.authenticate(authorization)
        entry = self.models.get(name)
        if entry is None:
            raise NotFound(f"model '{name}' not found")
        self.keys.authorize(tenant, name)
        entry.resolve_version(version)
        return entry

    @staticmethod
    def validate(entry: ModelEntry, tensors: Mapping[str, Tensor]) -> int:
        config = entry.config
        return validate_inputs(config.name, config.inputs, config.max_batch_size, tensors)

    @staticmethod
    def check_parameters(names: Iterable[str]) -> None:
        """Request parameters the mesh uses between its own services are not for clients to set."""
        if SEGMENTS in names:
            raise InvalidInput(f"request parameter '{SEGMENTS}' is reserved for the mesh's own use")
