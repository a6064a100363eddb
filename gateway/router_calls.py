"""Router calls of the gateway: concurrent requests for one model share one segmented call
(infermesh.segments). Transport-free: the router is reached through `RouterForwarder`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.core import batch_rows_within
from infermesh.coalescer import Coalescer, Pending
from infermesh.errors import DomainError
from infermesh.model_config import ModelEntry
from infermesh.oip import merge_requests, split_segmented_response
from infermesh.proto import inference_pb2 as pb
from infermesh.tensors import Tensor


class RouterForwarder(Protocol):
    async def infer(self, raw_request: bytes, timeout_s: float) -> bytes:
        """The router's serialised ModelInferResponse for a serialised ModelInferRequest."""
        ...


@dataclass(slots=True)
class _Request:
    message: pb.ModelInferRequest
    raw: bytes
    tensors: Mapping[str, Tensor]


class RouterCalls:
    """Forwards requests to the router, coalescing concurrent ones for the same model into one call.

    A request alone is forwarded byte for byte. While `max_inflight_batches` router calls for a model are
    in flight, arriving requests queue (bounded) and leave together as one segmented request
    (infermesh.segments); each client still gets its own answer or error. So under load the router, the
    busiest process, handles one call per batch instead of one per client request.
    """

    MAX_GROUPS = 1024  # distinct (model, inputs, outputs) groups; beyond it requests are forwarded alone

    def __init__(
        self,
        router: RouterForwarder,
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

    async def infer(
        self,
        entry: ModelEntry,
        message: pb.ModelInferRequest,
        raw: bytes,
        tensors: Mapping[str, Tensor],
        rows: int,
        timeout_s: float,
    ) -> bytes:
        coalescer = self._coalescer(entry, message) if self._enabled else None
        if coalescer is None:
            return await self.router.infer(raw, timeout_s)
        pending = Pending(_Request(message, raw, tensors), rows, time.monotonic() + timeout_s, size=len(raw))
        return await coalescer.submit(pending)

    def _coalescer(self, entry: ModelEntry, message: pb.ModelInferRequest) -> Coalescer | None:
        config = entry.config
        # Request or output parameters (priority, sequences, classification…) apply to one request: alone.
        if config.max_batch_size <= 0 or message.parameters or any(o.parameters for o in message.outputs):
            return None
        key = (
            config.name,
            message.model_version,
            tuple(o.name for o in message.outputs),
            tuple((i.name, i.datatype, tuple(i.shape[1:])) for i in message.inputs),
        )
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            if len(self._coalescers) >= self.MAX_GROUPS:
                return None
            coalescer = self._coalescers[key] = Coalescer(
                "gateway",
                config.name,
                self._batch_runner(config.name, message.model_version),
                max_rows=batch_rows_within(entry, [o.name for o in message.outputs], self._max_message_bytes // 2),
                max_inflight=self._max_inflight_batches,
                max_pending=self._max_pending,
                max_size=self._max_message_bytes // 2,  # headroom for the merged message's own framing
            )
        return coalescer

    def _batch_runner(self, model: str, version: str):
        async def run(batch: list[Pending]) -> None:
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                return
            timeout_s = max(0.0, max(p.deadline for p in batch) - time.monotonic())
            if len(batch) == 1:  # alone: the client's bytes as they came
                answer = await self.router.infer(batch[0].payload.raw, timeout_s)
                if not batch[0].future.done():
                    batch[0].future.set_result(answer)
                return
            requests: list[_Request] = [p.payload for p in batch]
            merged = merge_requests(
                model, version, [r.message for r in requests], [r.tensors for r in requests], [p.rows for p in batch]
            )
            response = pb.ModelInferResponse.FromString(await self.router.infer(merged.SerializeToString(), timeout_s))
            answers = split_segmented_response(response, [r.message.id for r in requests])
            for pending, answer in zip(batch, answers, strict=True):
                if pending.future.done():
                    continue
                if isinstance(answer, DomainError):
                    pending.future.set_exception(answer)
                else:
                    pending.future.set_result(answer)

        return run

    async def close(self) -> None:
        for coalescer in self._coalescers.values():
            await coalescer.close()
