"""The mesh's own repository-state API (protos/repository.proto) over gRPC: served by the model services (each
its own loaded state) and the router (its replicas' merged), read by the router and the gateway."""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from infermesh import oip
from infermesh.channels import client_channel
from infermesh.deadline import Deadline
from infermesh.method_handlers import error_from_rpc
from infermesh.model_config import VersionStatus
from infermesh.proto import inference_pb2, inference_pb2_grpc, repository_pb2, repository_pb2_grpc
from infermesh.repository import CONFIG_PARAMETER, ModelState, RepositoryState
from infermesh.statistics import ModelStatistics
from infermesh.tls import ClientTls

SERVICE = repository_pb2.DESCRIPTOR.services_by_name["ModelRepository"].full_name


class RepositorySource(Protocol):
    def repository_state(self) -> RepositoryState: ...


def snapshot_message(state: RepositoryState, known_generation: str) -> repository_pb2.RepositorySnapshot:
    if known_generation and known_generation == state.generation:
        return repository_pb2.RepositorySnapshot(generation=state.generation, unchanged=True)
    return repository_pb2.RepositorySnapshot(
        generation=state.generation,
        models=[
            repository_pb2.ModelState(
                name=name,
                config_json=model.config_json,
                versions=[
                    repository_pb2.VersionState(
                        version=s.version, state=s.state, reason=s.reason, profile_json=s.profile
                    )
                    for s in model.versions
                ],
            )
            for name, model in sorted(state.models.items())
        ],
    )


def state_of(message: repository_pb2.RepositorySnapshot) -> RepositoryState:
    return RepositoryState(
        message.generation,
        {
            model.name: ModelState.of(
                model.config_json, (VersionStatus(v.version, v.state, v.reason, v.profile_json) for v in model.versions)
            )
            for model in message.models
        },
    )


class RepositoryServicer(repository_pb2_grpc.ModelRepositoryServicer):
    def __init__(self, source: RepositorySource) -> None:
        self.source = source

    async def Snapshot(self, request: repository_pb2.SnapshotRequest, context: grpc.aio.ServicerContext) -> Any:
        return snapshot_message(self.source.repository_state(), request.known_generation)


def add_to_server(source: RepositorySource, server: Any) -> None:
    repository_pb2_grpc.add_ModelRepositoryServicer_to_server(RepositoryServicer(source), server)


class RepositoryClient:
    """A hop's model repository, from the hop above: its state (an unchanged state costs one small message), and
    Triton's load, unload and statistics calls (not retried: a load is not idempotent in time)."""

    def __init__(self, channel: grpc.aio.Channel, peer: str) -> None:
        self._stub = repository_pb2_grpc.ModelRepositoryStub(channel)
        self._inference = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._peer = peer
        self.state: RepositoryState | None = None

    @staticmethod
    def connect(target: str, max_message_bytes: int, tls: ClientTls | None = None) -> RepositoryClient:
        return RepositoryClient(client_channel(target, max_message_bytes, tls), target)

    async def refresh(self, timeout_s: float) -> bool:
        """Fetch the state if it changed; True when it did. Raises the hop's error as a DomainError."""
        known = self.state.generation if self.state is not None else ""
        try:
            reply = await self._stub.Snapshot(repository_pb2.SnapshotRequest(known_generation=known), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, self._peer) from None
        if reply.unchanged:
            return False
        self.state = state_of(reply)
        return True

    async def load(self, model: str, config_json: str | None, deadline: Deadline) -> None:
        request = inference_pb2.RepositoryModelLoadRequest(model_name=model)
        if config_json is not None:
            request.parameters[CONFIG_PARAMETER].string_param = config_json
        await self._call(self._inference.RepositoryModelLoad, request, deadline)

    async def unload(self, model: str, deadline: Deadline) -> None:
        request = inference_pb2.RepositoryModelUnloadRequest(model_name=model)
        await self._call(self._inference.RepositoryModelUnload, request, deadline)

    async def statistics(self, model: str, version: str, deadline: Deadline) -> list[ModelStatistics]:
        request = inference_pb2.ModelStatisticsRequest(name=model, version=version)
        return oip.statistics_of(await self._call(self._inference.ModelStatistics, request, deadline))

    async def _call(self, method: Any, request: Any, deadline: Deadline) -> Any:
        try:
            return await method(request, timeout=deadline.remaining())
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, self._peer) from None
