"""Transport-free dataplane of the model service: health, metadata, validation and batched inference.

The model service serves the SERVED signature of each model: its single `model_input` tensor when the
model has a feature_spec (the router joins the features), else its declared `inputs`.
"""

from __future__ import annotations

import asyncio
import logging

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
from infermesh.errors import FailedPrecondition
from infermesh.model_config import ModelConfig
from infermesh.tensors import Tensor
from infermesh.validation import validate_headers
from model_service.batcher import Batcher
from model_service.registry import ModelRegistry
from model_service.settings import ModelServiceSettings

log = logging.getLogger(__name__)

SERVER_NAME = "infermesh-model-service"
EXTENSIONS = ("dynamic_batching", "repository_index", "model_stream_infer")


class ModelServiceCore(DataplaneBase):
    """What every transport of the model service calls."""

    def __init__(self, settings: ModelServiceSettings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(
            settings.model_repository, device=settings.device, amp=settings.amp, torch_threads=settings.torch_threads
        )
        self.batchers: dict[tuple[str, str], Batcher] = {}
        self._loaded = False
        self._closing = False

    async def load(self) -> None:
        """Verify, load and warm up every model (in a thread: the server keeps answering health meanwhile)."""
        await asyncio.to_thread(self.registry.load_all)
        inject_delay_s = self.settings.inject_delay_ms / 1000
        for (name, version), model in self.registry.loaded.items():
            batcher = Batcher(
                name,
                version,
                model.predict,
                model.config.max_batch_size,
                model.config.dynamic_batching,
                device=str(model.device),
                inject_delay_s=inject_delay_s,
                thread_initializer=self.registry.configure_thread,
            )
            batcher.start()
            self.batchers[(name, version)] = batcher
            metrics.MODEL_LOADED.labels(name, version).set(1)
        self._loaded = True

    def draining(self) -> None:
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(batcher.close() for batcher in self.batchers.values()))

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
            self.registry.resolve(name, version)  # NotFound for a version the repository lacks
        config = entry.config
        if config.model_input is None:
            return config
        return config.model_copy(update={"inputs": config.served_inputs, "feature_spec": None, "model_input": None})

    async def repository_index(self, call: Call, ready_only: bool) -> list[ModelIndexEntry]:
        index: list[ModelIndexEntry] = []
        for name, entry in self.registry.entries.items():
            for version in entry.versions:
                if (name, version) in self.registry.loaded:
                    index.append(ModelIndexEntry(name, version, "READY", ""))
                elif not ready_only:
                    reason = self.registry.failures.get((name, version), "not loaded")
                    index.append(ModelIndexEntry(name, version, "UNAVAILABLE", reason))
        return index

    # Inference ---------------------------------------------------------------------------------------

    async def infer(self, call: Call, request: InferRequest) -> InferAnswer:
        """Validate against the served signature, queue for a batch, answer the requested outputs (default:
        all, in declared order) with the version that served them."""
        name = request.model
        self.registry.entry(name)  # NotFound before anything else for an unknown model
        metrics.label_request(name)  # the version once resolved: a client-chosen one is not a label
        model = self.registry.get(name, request.version)
        config = model.config
        output_specs = config.select_outputs(request.outputs)
        rows = validate_headers(config.name, config.served_inputs, config.max_batch_size, request.inputs.headers)
        tensors = request.inputs.tensors()
        batcher = self.batchers.get((name, model.version))
        if batcher is None:  # loaded but not started: only between load_all and the end of load()
            raise FailedPrecondition(f"model '{name}' version '{model.version}' is not serving")
        arrays = {spec.name: tensors[spec.name].data for spec in model.input_specs}
        spent: dict[str, float] | None = {} if timing.wanted(request.parameters) else None
        results = await batcher.submit(arrays, rows, call.deadline, spent)
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
