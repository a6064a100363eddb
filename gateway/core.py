"""The gateway's transport-free core: authentication, admission, validation against public metadata."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.auth import KeyStore, Tenant
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

    def authorize(self, authorization: str | None, model: str) -> Tenant:
        tenant = self.keys.authenticate(authorization)
        self.keys.authorize(tenant, model)
        return tenant

    def model(self, name: str, version: str = "") -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise NotFound(f"model '{name}' not found")
        entry.resolve_version(version)
        return entry

    def validate(self, name: str, version: str, tensors: Mapping[str, Tensor]) -> int:
        config = self.model(name, version).config
        return validate_inputs(config.name, config.inputs, config.max_batch_size, tensors)
