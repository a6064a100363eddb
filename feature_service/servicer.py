"""gRPC servicer of infermesh.features.v1.FeatureStore: protobuf ↔ core types, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from feature_service.store import FeatureStore
from feature_service.writers import WriterPolicy
from infermesh.deadline import Deadline
from infermesh.errors import DomainError, Unavailable
from infermesh.features import FeatureBlock, FeatureQuery
from infermesh.method_handlers import deadline_of, status_for, stream_messages
from infermesh.metrics import label_request
from infermesh.proto import feature_store_pb2 as pb
from infermesh.proto import feature_store_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureStore"].full_name

_LENGTH_DELIMITED = 2
_VALUES_TAG = bytes([pb.ReadFeaturesResponse.VALUES_FIELD_NUMBER << 3 | _LENGTH_DELIMITED])
_STATUSES_TAG = bytes([pb.ReadFeaturesResponse.STATUSES_FIELD_NUMBER << 3 | _LENGTH_DELIMITED])


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _packed(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload if payload else b""


def fill_read_response(message: pb.ReadFeaturesResponse, block: FeatureBlock) -> None:
    """Copy a block into a response.

    Packed `float` is little-endian float32 and packed enum values below 128 are one byte each, so the
    numpy buffers are already the wire format: parsing them is ~10x faster than `extend(arr.tolist())`
    (10 x 50: ~6 µs instead of ~45 µs). Ages are varints of any length; `extend` is the fastest for them.
    """
    message.feature_view = block.view
    message.feature_names.extend(block.feature_names)
    message.MergeFromString(
        _packed(_VALUES_TAG, block.values.astype("<f4", copy=False).tobytes())
        + _packed(_STATUSES_TAG, block.statuses.astype("u1", copy=False).tobytes())
    )
    message.ages_ms.extend(block.ages_ms.ravel().tolist())


_IDENTITY_PROPERTIES = ("x509_common_name", "x509_subject_alternative_name")


def peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The names of the caller's client certificate that the TLS handshake verified against the mesh CA (its
    subject's CN and its SANs); none on a plaintext connection or without a client certificate."""
    auth = context.auth_context()
    return [
        value.decode(errors="replace")
        for name in _IDENTITY_PROPERTIES
        for value in auth.get(name, ())
        if isinstance(value, bytes)
    ]


def _query(read: pb.ReadFeaturesRequest) -> FeatureQuery:
    # Repeated fields are sequences already; copying them to lists would only cost time.
    return FeatureQuery(read.feature_view, read.entity_ids, read.feature_names)


class FeatureStoreServicer(pb_grpc.FeatureStoreServicer):
    """Serves a FeatureStore once the service has set `store` (after warm-up)."""

    def __init__(
        self, store: FeatureStore | None = None, default_timeout_s: float = 10.0, writers: WriterPolicy | None = None
    ) -> None:
        self.store = store
        self.default_timeout_s = default_timeout_s
        self.writers = writers or WriterPolicy()

    def _deadline(self, context: grpc.aio.ServicerContext[Any, Any]) -> Deadline:
        return deadline_of(context, self.default_timeout_s)

    def _store(self) -> FeatureStore:
        if self.store is None:
            raise Unavailable("feature service is starting")
        return self.store

    async def ReadFeatures(
        self,
        request: pb.ReadFeaturesRequest,
        context: grpc.aio.ServicerContext[pb.ReadFeaturesRequest, pb.ReadFeaturesResponse],
    ) -> pb.ReadFeaturesResponse:
        store = self._store()
        if request.feature_view in store.views:
            label_request(request.feature_view)  # only known views: bounded metric labels
        block = (await store.read_many([_query(request)], self._deadline(context)))[0]
        response = pb.ReadFeaturesResponse()
        fill_read_response(response, block)
        return response

    async def BatchReadFeatures(
        self,
        request: pb.BatchReadFeaturesRequest,
        context: grpc.aio.ServicerContext[pb.BatchReadFeaturesRequest, pb.BatchReadFeaturesResponse],
    ) -> pb.BatchReadFeaturesResponse:
        store = self._store()
        known = sorted({read.feature_view for read in request.reads if read.feature_view in store.views})
        if known:
            label_request("+".join(known))  # the set of views a caller joins: one label per model, not per call
        blocks = await store.read_many([_query(read) for read in request.reads], self._deadline(context))
        response = pb.BatchReadFeaturesResponse()
        for block in blocks:
            fill_read_response(response.results.add(), block)
        return response

    async def WriteFeatures(
        self,
        request: pb.WriteFeaturesRequest,
        context: grpc.aio.ServicerContext[pb.WriteFeaturesRequest, pb.WriteFeaturesResponse],
    ) -> pb.WriteFeaturesResponse:
        self._authorize_writer(context)
        return await self._write(request, self._deadline(context))

    def _authorize_writer(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Before anything of the request is looked at: the caller's verified certificate names and its token."""
        authorization = next(
            (str(value) for key, value in context.invocation_metadata() or () if key == "authorization"), None
        )
        self.writers.authorize(peer_identities(context), authorization)

    async def _write(self, request: pb.WriteFeaturesRequest, deadline: Deadline) -> pb.WriteFeaturesResponse:
        store = self._store()
        if request.feature_view in store.views:
            label_request(request.feature_view)
        rows = [(row.entity_id, row.values, row.event_time_ms) for row in request.rows]
        result = await store.write(request.feature_view, rows, deadline)
        return pb.WriteFeaturesResponse(written=result.written, skipped_older=result.skipped_older)

    async def StreamWriteFeatures(
        self,
        request_iterator: AsyncIterator[pb.WriteFeaturesRequest],
        context: grpc.aio.ServicerContext[pb.WriteFeaturesRequest, pb.WriteFeaturesResponse],
    ) -> AsyncIterator[pb.WriteFeaturesResponse]:
        """Each message is written in turn (one at a time: answers keep the order of the requests) within
        `default_timeout_s` of its arrival; a stream lives longer than any one deadline would allow."""
        self._authorize_writer(context)  # before the first message is read
        messages = stream_messages.get()
        async for request in request_iterator:
            started = messages.begin() if messages is not None else 0.0
            code = "OK"
            try:
                response = await self._write(request, Deadline.after(self.default_timeout_s))
            except DomainError as error:
                code = status_for(error).name
                raise
            finally:
                if messages is not None:
                    messages.end(started, code)
            yield response

    async def ListFeatureViews(
        self,
        request: pb.ListFeatureViewsRequest,
        context: grpc.aio.ServicerContext[pb.ListFeatureViewsRequest, pb.ListFeatureViewsResponse],
    ) -> pb.ListFeatureViewsResponse:
        views = [
            pb.FeatureView(
                name=view.name,
                entity_key=view.entity_key,
                max_age_ms=view.max_age_ms,
                features=[
                    pb.FeatureSpec(name=feature.name, default_value=feature.default, description=feature.description)
                    for feature in view.features
                ],
            )
            for view in self._store().list_views()
        ]
        return pb.ListFeatureViewsResponse(views=views)
