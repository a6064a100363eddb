"""Router calls of the gateway: concurrent requests for one model share one batch call (infermesh.segments).
Transport-free: the router is reached through the `RouterPort` protocol (`gateway.router_client`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from infermesh.coalescer import Coalescer, Pending
from infermesh.dataplane import InferRequest
from infermesh.deadline import Deadline
from infermesh.errors import DomainError
from infermesh.model_config import ModelEntry
from infermesh.priority import queue_policy
from infermesh.repository import RepositoryState
from infermesh.segments import InferBatch, Segment, merge
from infermesh.statistics import ModelStatistics
from infermesh.tensors import NUMPY_DTYPE, element_count


class RouterPort(Protocol):
    async def infer(self, encoded_request: bytes, deadline: Deadline, tenant: str = "") -> bytes:
        """The router's serialised ModelInferResponse for a serialised ModelInferRequest (sent by `tenant`)."""
        ...

    async def infer_batch(self, batch: InferBatch, deadline: Deadline) -> list[bytes | DomainError]:
        """Per segment: the serialised ModelInferResponse its client would have got alone, or its error."""
        ...

    async def ready(self) -> bool: ...

    async def model_ready(self, name: str, version: str) -> bool: ...

    @property
    def repository(self) -> RepositoryState | None:
        """The mesh's models as the router last said (None until it first did)."""
        ...

    async def refresh_repository(self, timeout_s: float) -> bool:
        """Read the router's repository state again; True when it changed."""
        ...

    async def load(self, model: str, config_json: str | None, deadline: Deadline) -> None: ...

    async def unload(self, model: str, deadline: Deadline) -> None: ...

    async def statistics(self, model: str, version: str, deadline: Deadline) -> list[ModelStatistics]: ...

    def flags_of(self, encoded_response: bytes) -> dict[str, str]:
        """The response parameters (infermesh_* flags) of a serialised ModelInferResponse."""
        ...

    def with_flags(self, encoded_response: bytes, flags: dict[str, str]) -> bytes:
        """A serialised ModelInferResponse with these response parameters added."""
        ...

    def classified(
        self, encoded_response: bytes, classes: Mapping[str, int], batched: bool, labels: Mapping[str, Sequence[str]]
    ) -> bytes:
        """A serialised ModelInferResponse with these outputs as classes (infermesh.classification)."""
        ...


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


def _group_name(key: tuple[object, ...]) -> str:
    """A short stable name for a coalescing group (requested outputs and input signature), for metric labels."""
    return hashlib.blake2s(repr(key).encode(), digest_size=4).hexdigest()


@dataclass(frozen=True, slots=True)
class Routed:
    """A request's answer from the router, and how long the router call that carried it took."""

    data: bytes  # the serialised ModelInferResponse, as the client gets it
    router_s: float


class RouterCalls:
    """Forwards requests to the router, coalescing concurrent ones for the same model into one batch call.

    A request alone is forwarded byte for byte. While `max_inflight_batches` router calls for a model are in
    flight, arriving requests queue (bounded) and leave together as one `InferBatch`; each client still gets
    its own answer or error. So under load the router, the busiest process, handles one call per batch
    instead of one per client request.
    """

    MAX_GROUPS = 1024  # distinct (model, inputs, outputs) groups; idle ones make room, else requests go alone

    def __init__(
        self,
        router: RouterPort,
        max_inflight_batches: int,
        max_pending: int,
        enabled: bool,
        max_message_bytes: int,
    ) -> None:
        self.router = router
        self._max_inflight_batches = max_inflight_batches
        self._max_pending = max_pending
        self._enabled = enabled
        # A merged request, and its response where the outputs' sizes are known, stay within one message.
        self._max_message_bytes = max_message_bytes
        self._coalescers: dict[tuple[object, ...], Coalescer] = {}

    async def infer(self, entry: ModelEntry, request: InferRequest, rows: int, deadline: Deadline) -> Routed:
        coalescer = self._coalescer(entry, request) if self._enabled else None
        if coalescer is None:
            return await self._alone(request, rows, deadline)
        # Triton's `priority` and `timeout` order and bound the wait here too (the router's queue checks them again).
        priority, queue_until = queue_policy(request.parameters)
        pending = Pending(
            request, rows, deadline, size=len(request.encoded), priority=priority, queue_until=queue_until
        )
        answer: Routed = await coalescer.submit(pending)
        return answer

    async def _alone(self, request: InferRequest, rows: int, deadline: Deadline) -> Routed:
        started = time.perf_counter()
        if request.encoded:  # the client's bytes as they came
            forwarded = await self.router.infer(request.encoded, deadline, request.tenant)
            return Routed(forwarded, time.perf_counter() - started)
        batch = InferBatch(
            request.model,
            request.version,
            request.inputs,
            request.outputs,
            [Segment(rows, request.id, request.parameters, request.tenant)],
        )
        (answer,) = await self.router.infer_batch(batch, deadline)
        if isinstance(answer, DomainError):
            raise answer
        return Routed(answer, time.perf_counter() - started)

    def _coalescer(self, entry: ModelEntry, request: InferRequest) -> Coalescer | None:
        config = entry.config
        # Output parameters (classification…) shape one request's answer: it goes alone.
        if config.max_batch_size <= 0 or request.output_parameters:
            return None
        key = (
            config.name,
            config.max_batch_size,  # a config with another limit gets a coalescer of its own (the old one drains)
            request.version,
            tuple(request.outputs),
            tuple((h.name, h.datatype, h.shape[1:]) for h in request.inputs.headers),
        )
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            if len(self._coalescers) >= self.MAX_GROUPS and not self._forget_an_idle_group():
                return None
            coalescer = self._coalescers[key] = Coalescer(
                "gateway",
                config.name,
                self._batch_runner(config.name, request.version),
                max_rows=batch_rows_within(entry, request.outputs, self._max_message_bytes // 2),
                max_inflight=self._max_inflight_batches,
                max_pending=self._max_pending,
                max_size=self._max_message_bytes // 2,  # headroom for the merged message's own framing
                version=entry.resolve_version(request.version),
                group=_group_name(key),
            )
        return coalescer

    def _forget_an_idle_group(self) -> bool:
        """Make room in the bounded table (variable dims or output lists can make many groups over time)."""
        for key, coalescer in self._coalescers.items():  # oldest first
            if coalescer.idle:
                del self._coalescers[key]
                coalescer.forget_metrics()
                return True
        return False

    def _batch_runner(self, model: str, version: str) -> Callable[[list[Pending]], Awaitable[None]]:
        async def run(batch: list[Pending]) -> None:
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                return
            deadline = Deadline.latest([p.deadline for p in batch])
            if len(batch) == 1:
                answer = await self._alone(batch[0].payload, batch[0].rows, deadline)
                if not batch[0].future.done():
                    batch[0].future.set_result(answer)
                return
            merged = merge(model, version, [p.payload for p in batch], [p.rows for p in batch])
            started = time.perf_counter()
            answers = await self.router.infer_batch(merged, deadline)
            router_s = time.perf_counter() - started
            for pending, result in zip(batch, answers, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, DomainError):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(Routed(result, router_s))

        return run

    async def close(self) -> None:
        for coalescer in self._coalescers.values():
            await coalescer.close()
