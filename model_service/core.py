"""Transport-free dataplane of the model service: health, metadata, validation and batched inference.

The model service serves the SERVED signature of each model: its single `model_input` tensor when the
model has a feature_spec (the router joins the features), else its declared `inputs`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from infermesh import __version__, metrics, timing
from infermesh.dataplane import (
    Call,
    DataplaneBase,
    InferAnswer,
    InferRequest,
    InferResponse,
    ModelIndexEntry,
    ModelInfo,
    ServerInfo,
)
from infermesh.errors import DomainError, NotFound
from infermesh.model_config import ModelConfig
from infermesh.priority import queue_policy
from infermesh.repository import RepositoryState
from infermesh.statistics import ModelStatistics
from infermesh.tensors import Tensor
from infermesh.validation import validate_headers
from model_service.batcher import Batcher
from model_service.lifecycle import ModelLifecycle
from model_service.registry import LoadedModel, ModelRegistry
from model_service.settings import ModelServiceSettings

log = logging.getLogger(__name__)

SERVER_NAME = "infermesh-model-service"
# A request may be this many times the model's max_batch_size (it runs in passes within it): a router's batch
# built under a larger limit, just before a config change shrank it, is served rather than refused.
OVERSIZED_PASSES = 16
EXTENSIONS = ("dynamic_batching", "model_repository", "model_configuration", "statistics", "model_stream_infer")


class ModelServiceCore(DataplaneBase):
    """What every transport of the model service calls."""

    def __init__(self, settings: ModelServiceSettings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(
            settings.model_repository,
            device=settings.device,
            amp=settings.amp,
            torch_threads=settings.torch_threads,
            require_pinned_digest=settings.require_pinned_digest,
        )
        self.lifecycle = ModelLifecycle(self.registry, self._start_batcher, settings.unload_grace_s)
        self._loaded = False
        self._closing = False

    @property
    def batchers(self) -> dict[tuple[str, str], Batcher]:
        return self.lifecycle.batchers

    def _start_batcher(self, model: LoadedModel, statistics: ModelStatistics) -> Batcher:
        batcher = Batcher(
            model.name,
            model.version,
            model.predict,
            model.config.max_batch_size,
            model.config.dynamic_batching,
            device=str(model.device),
            inject_delay_s=self.settings.inject_delay_ms / 1000,
            thread_initializer=self.registry.configure_thread,
            statistics=statistics,
            cold_window_s=self.settings.cold_window_s,
            replica=self.settings.replica_id,
            inline_forward_max_s=self.settings.inline_forward_max_us / 1e6,
        )
        batcher.start()
        return batcher

    async def load(self) -> None:
        """Verify, load and warm up every model (in a thread: the server keeps answering health meanwhile)."""
        await self.lifecycle.load_all()
        self._loaded = True

    def draining(self) -> None:
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        await self.lifecycle.close()

    def repository_state(self) -> RepositoryState:
        """This replica's models and version states (the router reads it: infermesh.repository_service)."""
        return self.registry.state()

    # Health ------------------------------------------------------------------------------------------

    async def server_ready(self, call: Call) -> bool:
        """Ready once every model was loaded or refused, until shutdown. Model readiness is per model."""
        return self._loaded and not self._closing

    async def model_ready(self, call: Call, name: str, version: str) -> bool:
        return self._loaded and not self._closing and self.registry.is_ready(name, version)

    # Metadata ----------------------------------------------------------------------------------------

    async def server_metadata(self, call: Call) -> ServerInfo:
        return ServerInfo(SERVER_NAME, __version__, EXTENSIONS, self.settings.replica_id)

    async def model_metadata(self, call: Call, name: str, version: str) -> ModelInfo:
        config = self._served_config(name, version)
        metrics.label_request(name, version)
        return ModelInfo(
            config.name, self.registry.ready_versions(name), config.platform, config.inputs, config.outputs
        )

    async def model_config(self, call: Call, name: str, version: str) -> ModelConfig:
        return self._served_config(name, version)

    def _served_config(self, name: str, version: str) -> ModelConfig:
        """The model's config as this service serves it: its `inputs` are the served ones."""
        entry = self.registry.entry(name)
        if version:
            entry.resolve_version(version)  # NotFound / Unavailable for a version not served
        config = entry.config
        if config.model_input is None:
            return config
        return config.model_copy(update={"inputs": config.served_inputs, "feature_spec": None, "model_input": None})

    # Repository and statistics ---------------------------------------------------------------------------

    async def repository_index(self, call: Call, ready_only: bool) -> list[ModelIndexEntry]:
        return self.registry.state().index(ready_only)

    async def repository_load(self, call: Call, name: str, config_json: str | None) -> None:
        await self.lifecycle.load(name, config_json)

    async def repository_unload(self, call: Call, name: str) -> None:
        await self.lifecycle.unload(name)

    async def model_statistics(self, call: Call, name: str, version: str) -> list[ModelStatistics]:
        if name:
            entry = self.registry.entry(name)  # NotFound for a model this service does not know
            if version and version not in {status.version for status in entry.statuses}:
                raise NotFound(f"model '{name}' has no version '{version}'")
        return [
            statistics
            for (model, model_version), statistics in sorted(self.lifecycle.statistics.items())
            if (not name or model == name) and (not version or model_version == version)
        ]

    # Inference ---------------------------------------------------------------------------------------

    async def infer(self, call: Call, request: InferRequest) -> InferAnswer:
        """Validate against the served signature, queue for a batch, answer the requested outputs (default:
        all, in declared order) with the version that served them."""
        started_ns = time.perf_counter_ns()
        name = request.model
        self.registry.entry(name)  # NotFound before anything else for an unknown model
        metrics.label_request(name)  # the version once resolved: a client-chosen one is not a label
        model, batcher = self.lifecycle.serving(name, request.version)
        statistics = batcher.statistics
        try:
            config = model.config
            output_specs = config.select_outputs(request.outputs)
            # A router's batch built just before the limit shrank may be larger: it runs in passes within it.
            limit = config.max_batch_size
            rows = validate_headers(
                config.name, config.served_inputs, limit, request.inputs.headers, max_rows=limit * OVERSIZED_PASSES
            )
            tensors = request.inputs.tensors()
            arrays = {spec.name: tensors[spec.name].data for spec in model.input_specs}
            spent: dict[str, float] | None = {} if timing.wanted(request.parameters) else None
            priority, _ = queue_policy(request.parameters)  # the router passes its batch's best priority
            if rows <= limit:
                results = await batcher.submit(arrays, rows, call.deadline, spent, priority)
            else:
                bounds = [(lo, min(lo + limit, rows)) for lo in range(0, rows, limit)]
                passes = await asyncio.gather(
                    *(
                        batcher.submit(
                            {k: a[lo:hi] for k, a in arrays.items()}, hi - lo, call.deadline, spent, priority
                        )
                        for lo, hi in bounds
                    )
                )
                results = {name: np.concatenate([part[name] for part in passes]) for name in passes[0]}
        except DomainError:
            statistics.fail.add(time.perf_counter_ns() - started_ns)
            raise
        statistics.success.add(time.perf_counter_ns() - started_ns)
        metrics.label_request(name, model.version)  # the version actually served, not the (maybe empty) one asked
        replica_id = self.settings.replica_id
        parameters = {"replica_id": replica_id} if replica_id else {}
        if spent is not None:
            parameters[timing.MODEL_QUEUE] = timing.ms(spent["queue"])
            parameters[timing.FORWARD] = timing.ms(spent["forward"])
        return InferResponse(
            name,
            model.version,
            [Tensor(spec.name, spec.datatype, results[spec.name].shape, results[spec.name]) for spec in output_specs],
            request.id,
            parameters,
        )
