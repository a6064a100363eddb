"""The gateway's transport-free core: authentication, admission, validation against public metadata."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.auth import KeyStore
from infermesh import metrics
from infermesh.errors import NotFound, Overloaded
from infermesh.model_config import ModelEntry
from infermesh.tensors import Tensor
from infermesh.validation import validate_inputs


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
