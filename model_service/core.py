"""Transport-free dataplane of the model service: health, metadata, validation and batched inference.

The model service serves the SERVED signature of each model: its single `model_input` tensor when the
model has a feature_spec (the router joins the features), else its declared `inputs`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from infermesh import __version__
from infermesh.errors import FailedPrecondition, InvalidInput
from infermesh.model_config import ModelConfig, TensorSpec
from infermesh.tensors import Tensor
from infermesh.validation import validate_inputs as validate_signature
from model_service.batcher import Batcher
from model_service.registry import ModelRegistry
from model_service.settings import ModelServiceSettings

log = logging.getLogger(__name__)

SERVER_NAME = "infermesh-model-service"
EXTENSIONS = ("dynamic_batching", "repository_index", "model_stream_infer")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    name: str
    version: str
    extensions: tuple[str, ...]
    replica_id: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True, slots=True)
class ModelIndexEntry:
    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str


def validate_inputs(config: ModelConfig, tensors: dict[str, Tensor]) -> int:
    """Check names, datatypes and shapes against the served signature; return the batch size (rows)."""
    return validate_signature(config.name, config.served_inputs, config.max_batch_size, tensors)


class ModelServiceCore:
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
        self._loaded = True

    def draining(self) -> None:
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(batcher.close() for batcher in self.batchers.values()))

    # Health ------------------------------------------------------------------------------------------

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        """Ready once every model was loaded or refused, until shutdown. Model readiness is per model."""
        return self._loaded and not self._closing

    def model_ready(self, name: str, version: str = "") -> bool:
        return self._loaded and not self._closing and self.registry.is_ready(name, version)

    # Metadata ----------------------------------------------------------------------------------------

    def server_metadata(self) -> ServerInfo:
        return ServerInfo(SERVER_NAME, __version__, EXTENSIONS, self.settings.replica_id)

    def model_metadata(self, name: str, version: str = "") -> ModelInfo:
        entry = self.registry.entry(name)
        if version:
            self.registry.resolve(name, version)  # NotFound for a version the repository lacks
        config = entry.config
        return ModelInfo(
            name=config.name,
            versions=self.registry.ready_versions(name),
            platform=config.platform,
            inputs=list(config.served_inputs),
            outputs=list(config.outputs),
        )

    def repository_index(self, ready_only: bool = False) -> list[ModelIndexEntry]:
        index: list[ModelIndexEntry] = []
        for name, entry in self.registry.entries.items():
            for version in entry.versions:
                if (name, version) in self.registry.loaded:
                    index.append(ModelIndexEntry(name, version, "READY", ""))
                elif not ready_only:
                    reason = self.registry.failures.get((name, version), "not loaded")
                    index.append(ModelIndexEntry(name, version, "UNAVAILABLE", reason))
        return index

    def output_specs(self, name: str) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.registry.entry(name).config.outputs}

    # Inference ---------------------------------------------------------------------------------------

    async def infer(
        self,
        name: str,
        version: str,
        tensors: dict[str, Tensor],
        deadline: float | None = None,
        outputs: Sequence[str] | None = None,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Validate, queue for a batch, and return (version served, outputs by name).

        `deadline` is absolute, on time.monotonic(). `outputs` names the outputs wanted (default: all, in
        declared order); an unknown name is InvalidInput.
        """
        model = self.registry.get(name, version)
        config = model.config
        declared = [spec.name for spec in config.outputs]
        wanted = list(outputs) if outputs else declared
        for output in wanted:
            if output not in declared:
                raise InvalidInput(f"model '{name}': unknown output '{output}'; available {declared}")
        rows = validate_inputs(config, tensors)
        batcher = self.batchers.get((name, model.version))
        if batcher is None:  # loaded but not started: only between load_all and the end of load()
            raise FailedPrecondition(f"model '{name}' version '{model.version}' is not serving")
        arrays = {spec.name: tensors[spec.name].data for spec in model.input_specs}
        results = await batcher.submit(arrays, rows, deadline)
        return model.version, {output: results[output] for output in wanted}
