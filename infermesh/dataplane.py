"""The Open Inference Protocol as a transport-free dataplane (as MLServer's `handlers/dataplane.py` sits
behind its transports): the domain types of its calls and the protocol that the gateway, router and model
service cores implement. `infermesh.oip_servicer` serves any implementation as
`inference.GRPCInferenceService`; `infermesh.oip` converts between these types and protobuf.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from infermesh.deadline import Deadline
from infermesh.errors import DomainError
from infermesh.model_config import ModelConfig, TensorSpec
from infermesh.statistics import ModelStatistics
from infermesh.tensors import Inputs, Tensor

ParameterValue = bool | int | float | str


@dataclass(frozen=True, slots=True)
class Call:
    """What a core needs to know about the call it serves: its deadline (built once at the service's edge)
    and its credentials (the `authorization` metadata, checked by the gateway)."""

    deadline: Deadline
    authorization: str | None = None
    principal: object = None  # who the caller is, once a core authenticated it (the gateway's Tenant)
    # Behind the gateway: the tenant it authenticated, from the internal `infermesh-tenant` metadata (hops that
    # read it take callers inside the mesh only; the gateway never reads it, it authenticates).
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    name: str
    version: str
    extensions: tuple[str, ...]
    replica_id: str = ""  # sent as response metadata: ServerMetadataResponse has no free-form field


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
    state: str  # READY, LOADING, UNLOADING or UNAVAILABLE
    reason: str = ""


@dataclass(slots=True)
class InferRequest:
    model: str
    version: str
    inputs: Inputs
    id: str = ""
    outputs: list[str] = field(default_factory=list)  # requested output names; empty: all
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    output_parameters: bool = False  # a requested output carries parameters (e.g. classification)
    classes: Mapping[str, int] = field(default_factory=dict)  # outputs asked as classes: {name: how many}
    encoded: bytes = b""  # the request as it arrived, for a hop that forwards it unchanged
    tenant: str = ""  # who sent it, once the gateway authenticated it: never read from the request itself


@dataclass(slots=True)
class InferResponse:
    model: str
    version: str
    outputs: list[Tensor]
    id: str = ""
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EncodedInferResponse:
    """A response already in wire form, from the hop below: passed back to the client byte for byte."""

    data: bytes


InferAnswer = InferResponse | EncodedInferResponse


class Dataplane(Protocol):
    """The Open Inference Protocol, transport-free. Every call gets its `Call`; errors are DomainErrors."""

    def authenticate(self, call: Call) -> Call:
        """Check the caller's credentials before any of its request is parsed (Unauthenticated); the call
        back with its principal. Hops that trust their callers return the call as it is."""
        ...

    async def server_live(self, call: Call) -> bool: ...

    async def server_ready(self, call: Call) -> bool: ...

    async def server_metadata(self, call: Call) -> ServerInfo: ...

    async def model_ready(self, call: Call, name: str, version: str) -> bool: ...

    async def model_metadata(self, call: Call, name: str, version: str) -> ModelInfo: ...

    async def model_config(self, call: Call, name: str, version: str) -> ModelConfig: ...

    async def repository_index(self, call: Call, ready_only: bool) -> list[ModelIndexEntry]: ...

    async def repository_load(self, call: Call, name: str, config_json: str | None) -> None:
        """(Re)load the model from the repository, or with this config (JSON) instead of its own; returns once
        every version it serves is ready."""
        ...

    async def repository_unload(self, call: Call, name: str) -> None: ...

    async def model_statistics(self, call: Call, name: str, version: str) -> list[ModelStatistics]:
        """Triton's statistics per model version; an empty name or version: all of them."""
        ...

    async def infer(self, call: Call, request: InferRequest) -> InferAnswer: ...

    def stream(self, requests: AsyncIterator[tuple[Call, InferRequest]]) -> AsyncIterator[InferAnswer | StreamError]:
        """ModelStreamInfer: an answer per request, in order. A failed request yields its StreamError and
        the stream goes on (Triton's semantics)."""
        ...


@dataclass(frozen=True, slots=True)
class StreamError:
    """A request of a stream that failed: the stream carries the error in a message and stays open."""

    request: InferRequest
    error: DomainError


class DataplaneBase(ABC):
    """What every core does the same way: a live process is live, a stream is its requests served one at a
    time, in order, through `infer`, and callers inside the mesh are trusted (the gateway overrides that)."""

    def authenticate(self, call: Call) -> Call:
        return call

    async def server_live(self, call: Call) -> bool:
        return True

    @abstractmethod
    async def infer(self, call: Call, request: InferRequest) -> InferAnswer: ...

    async def stream(
        self, requests: AsyncIterator[tuple[Call, InferRequest]]
    ) -> AsyncIterator[InferAnswer | StreamError]:
        async for call, request in requests:
            try:
                yield await self.infer(call, request)
            except DomainError as error:
                yield StreamError(request, error)
