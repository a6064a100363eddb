"""Requests the scenarios send, built ahead of the run (a pool cycled through) so the client spends its CPU on
sending, not on building tensors. Clients: `tritonclient.grpc.aio` for the inference API (what a Triton or
KServe user sees) and the generated feature_store stubs for the feature service.

Entity ids vary over the whole demo world (u0…u9999, m0…m999), so the feature store is not read from one hot key.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import grpc
import numpy as np
import tritonclient.grpc.aio as aioclient
from google.rpc import error_details_pb2, status_pb2
from tritonclient.grpc import service_pb2

from demo import synthetic
from infermesh.features import DEFAULTED_ENTITIES, FEATURES_UNAVAILABLE
from infermesh.proto import feature_store_pb2, feature_store_pb2_grpc

POOL = 2048
CLIENT_TIMEOUT_S = 10.0
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"  # for raw grpc.aio calls of serialized requests
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def response_tag(result: aioclient.InferResult) -> str | None:
    """How the mesh flagged an answer: "features_unavailable", "defaulted", or None for a plain answer."""
    parameters = result.get_response().parameters
    if FEATURES_UNAVAILABLE in parameters and parameters[FEATURES_UNAVAILABLE].string_param.lower() == "true":
        return "features_unavailable"
    if DEFAULTED_ENTITIES in parameters:
        return "defaulted"
    return None


def _entity_draws(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, synthetic.N_USERS, count)
    merchants = rng.integers(0, synthetic.N_MERCHANTS, count)
    amounts = rng.lognormal(3.8, 0.8, count).astype(np.float32)
    return users, merchants, amounts


class FraudViaGateway:
    """`fraud` (or a variant) through the gateway: entity ids + amount, one transaction per request."""

    def __init__(
        self,
        client: aioclient.InferenceServerClient,
        api_key: str,
        model: str = "fraud",
        *,
        batch: int = 1,
        seed: int = 0,
        timeout_s: float = CLIENT_TIMEOUT_S,
        priority: int = 0,
    ) -> None:
        self.client = client
        self.model = model
        self.priority = priority  # Triton's request priority (0: the default level)
        self.headers = {"authorization": f"Bearer {api_key}"}
        self.timeout_s = timeout_s
        users, merchants, amounts = _entity_draws(POOL * batch, seed)
        self.pool: list[list[aioclient.InferInput]] = []
        for k in range(POOL):
            rows = slice(k * batch, (k + 1) * batch)
            tensors = [
                aioclient.InferInput("user_id", [batch], "BYTES"),
                aioclient.InferInput("merchant_id", [batch], "BYTES"),
                aioclient.InferInput("amount", [batch], "FP32"),
            ]
            tensors[0].set_data_from_numpy(np.array([f"u{u}".encode() for u in users[rows]], dtype=object))
            tensors[1].set_data_from_numpy(np.array([f"m{m}".encode() for m in merchants[rows]], dtype=object))
            tensors[2].set_data_from_numpy(amounts[rows])
            self.pool.append(tensors)

    async def __call__(self, i: int) -> str | None:
        result = await self.client.infer(
            self.model, self.pool[i % POOL], headers=self.headers, client_timeout=self.timeout_s, priority=self.priority
        )
        return response_tag(result)


class HttpRefused(Exception):
    """A non-200 answer of the HTTP/REST front; `status()` names it for the load generator's counts."""

    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status

    def status(self) -> str:
        return f"HTTP_{self.http_status}"


class FraudViaHttp:
    """`fraud` through the gateway's HTTP/REST front (aiohttp, kept-alive connections): JSON tensors, or Triton's
    binary tensor extension as tritonclient.http sends it (inputs and the output as bytes after a JSON header)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        binary: bool = False,
        seed: int = 0,
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self.session = session
        self.url = f"{base_url}/v2/models/fraud/infer"
        self.headers = {"authorization": f"Bearer {api_key}"}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        users, merchants, amounts = _entity_draws(POOL, seed)
        self.pool = [
            self._body(f"u{u}", f"m{m}", float(a), binary) for u, m, a in zip(users, merchants, amounts, strict=True)
        ]

    @staticmethod
    def _body(user: str, merchant: str, amount: float, binary: bool) -> tuple[bytes, dict[str, str]]:
        names = [("user_id", "BYTES"), ("merchant_id", "BYTES"), ("amount", "FP32")]
        if not binary:
            values: list[list[str] | list[float]] = [[user], [merchant], [amount]]
            inputs = [
                {"name": n, "datatype": d, "shape": [1], "data": v} for (n, d), v in zip(names, values, strict=True)
            ]
            return json.dumps({"inputs": inputs}).encode(), {"Content-Type": "application/json"}
        blobs = [bytes_elements([user.encode()]), bytes_elements([merchant.encode()]), np.float32(amount).tobytes()]
        header = {
            "inputs": [
                {"name": n, "datatype": d, "shape": [1], "parameters": {"binary_data_size": len(b)}}
                for (n, d), b in zip(names, blobs, strict=True)
            ],
            "outputs": [{"name": "fraud_probability", "parameters": {"binary_data": True}}],
        }
        head = json.dumps(header).encode()
        return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}

    async def __call__(self, i: int) -> str | None:
        body, headers = self.pool[i % POOL]
        async with self.session.post(
            self.url, data=body, headers={**self.headers, **headers}, timeout=self.timeout
        ) as reply:
            content = await reply.read()
            if reply.status != 200:
                raise HttpRefused(reply.status, content[:200].decode(errors="replace"))
        return None


def bytes_elements(items: Sequence[bytes]) -> bytes:
    """BYTES tensor contents as raw_input_contents carries them: each element a 4-byte little-endian length,
    then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def infer_request(model: str, inputs: Sequence[tuple[str, str, Sequence[int], bytes]]) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest of (name, datatype, shape, raw contents) inputs, as declared: nothing is checked."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, _ in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    request.raw_input_contents.extend(raw for *_, raw in inputs)
    return request


def retry_delay_s(trailing_metadata: Sequence[tuple[str, str | bytes]] | None) -> float | None:
    """The google.rpc.RetryInfo hint of a refused call (its `grpc-status-details-bin` trailer), None if none."""
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.ToNanoseconds() / 1e9
    return None


class FraudViaGatewayRaw:
    """`fraud` through the gateway as raw grpc.aio calls of pre-serialized requests, answers left undecoded:
    the cheapest client, for a tenant flooding the gateway from the same cores. Counts its refusals
    (RESOURCE_EXHAUSTED) and the retry hints they carried (google.rpc.RetryInfo), warm-up included."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        api_key: str,
        model: str = "fraud",
        *,
        seed: int = 0,
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self.call = channel.unary_unary(MODEL_INFER)
        self.model = model
        self.metadata = (("authorization", f"Bearer {api_key}"),)
        self.timeout_s = timeout_s
        users, merchants, amounts = _entity_draws(POOL, seed)
        self.pool = [
            infer_request(
                model,
                [
                    ("user_id", "BYTES", [1], bytes_elements([f"u{u}".encode()])),
                    ("merchant_id", "BYTES", [1], bytes_elements([f"m{m}".encode()])),
                    ("amount", "FP32", [1], np.float32(a).tobytes()),
                ],
            ).SerializeToString()
            for u, m, a in zip(users, merchants, amounts, strict=True)
        ]
        self.refused = 0
        self.retry_hints_s: list[float] = []

    async def __call__(self, i: int) -> str | None:
        try:
            await self.call(self.pool[i % POOL], metadata=self.metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                self.refused += 1
                hint = retry_delay_s(error.trailing_metadata())
                if hint is not None:
                    self.retry_hints_s.append(hint)
            raise
        return None


@dataclass(frozen=True)
class Malformed:
    """A request the gateway must refuse with INVALID_ARGUMENT, serialized (sent as is by a raw call)."""

    kind: str
    what: str
    payload: bytes


ONE_BYTE_ELEMENT = struct.pack("<I", 1) + b"u"  # a BYTES element of one byte, as raw contents carry it
SMALL_MALFORMED_BYTES = 1024
OVERFLOW_SHAPE = (2**62, 2**62, 1)
BIG_BATCH = 4_000_000


def _fill(
    model: str, inputs: list[tuple[str, str, Sequence[int], bytes]], index: int, size: int, *, one_byte: bool
) -> service_pb2.ModelInferRequest:
    """`inputs` with input `index`'s raw contents grown so that the serialized request is `size` bytes or a
    few less: one-byte BYTES elements or zero bytes."""
    base = infer_request(model, inputs).ByteSize()
    room = max(0, size - base - 8)  # 8: the field's tag and length prefix grow with it
    name, datatype, shape, raw = inputs[index]
    extra = ONE_BYTE_ELEMENT * (room // len(ONE_BYTE_ELEMENT)) if one_byte else bytes(room)
    grown = list(inputs)
    grown[index] = (name, datatype, shape, raw + extra)
    return infer_request(model, grown)


def malformed_requests(max_message_bytes: int, *, margin: int = 96 * 1024) -> list[Malformed]:
    """`fraud` requests of just under `max_message_bytes` (the gateway's largest accepted message, less
    `margin`) that are each malformed in one way, and a small one as a reference for the fixed cost of a
    refusal. Each declares shapes the gateway can refuse before decoding any data."""
    size = max_message_bytes - margin
    user = ("user_id", "BYTES", [1], bytes_elements([b"u1"]))
    merchant = ("merchant_id", "BYTES", [1], bytes_elements([b"m1"]))
    amount = ("amount", "FP32", [1], np.float32(42.0).tobytes())
    model = "fraud"
    count_mismatch = _fill(model, [user, merchant, amount], 0, size, one_byte=True)
    small = _fill(model, [user, merchant, amount], 0, SMALL_MALFORMED_BYTES, one_byte=True)
    overflow = _fill(model, [("user_id", "BYTES", OVERFLOW_SHAPE, b""), merchant, amount], 0, size, one_byte=False)
    big = [
        ("user_id", "BYTES", [BIG_BATCH], b""),
        ("merchant_id", "BYTES", [BIG_BATCH], bytes_elements([b"m1"])),
        ("amount", "FP32", [BIG_BATCH], bytes(4 * BIG_BATCH)),  # consistent with the shape: 4 bytes each
    ]
    over_batch = _fill(model, big, 0, size, one_byte=True)

    def elements(request: service_pb2.ModelInferRequest) -> int:
        return len(request.raw_input_contents[0]) // len(ONE_BYTE_ELEMENT)

    return [
        Malformed(
            "count mismatch",
            f"`user_id` BYTES shape [1], raw contents {elements(count_mismatch):,} one-byte elements",
            count_mismatch.SerializeToString(),
        ),
        Malformed(
            "shape overflow",
            "`user_id` shape [2**62, 2**62, 1] (its element count overflows int64), "
            f"{len(overflow.raw_input_contents[0]):,} raw bytes",
            overflow.SerializeToString(),
        ),
        Malformed(
            "batch over max",
            f"every input shape [{BIG_BATCH:,}] (far above `fraud`'s max_batch_size), `amount` {4 * BIG_BATCH:,} raw "
            f"bytes, `user_id` {elements(over_batch):,} one-byte elements",
            over_batch.SerializeToString(),
        ),
        Malformed(
            "reference: small",
            f"as `count mismatch`, {elements(small)} one-byte elements: {small.ByteSize():,} bytes in all",
            small.SerializeToString(),
        ),
    ]


class FraudDirect:
    """`fraud` straight to one model service replica: the assembled feature rows, FP32 [batch, 13]."""

    def __init__(
        self, client: aioclient.InferenceServerClient, *, batch: int = 1, seed: int = 0, timeout_s: float = 10.0
    ) -> None:
        self.client = client
        self.timeout_s = timeout_s
        world = synthetic.make_world()
        users, merchants, amounts = _entity_draws(POOL * batch, seed)
        matrix = synthetic.feature_matrix(world, users, merchants, amounts)
        self.pool = []
        for k in range(POOL):
            tensor = aioclient.InferInput("features", [batch, matrix.shape[1]], "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(matrix[k * batch : (k + 1) * batch]))
            self.pool.append([tensor])

    async def __call__(self, i: int) -> str | None:
        await self.client.infer("fraud", self.pool[i % POOL], client_timeout=self.timeout_s)
        return None


class BenchMLPDirect:
    """`bench_mlp` (compute-bound, x FP32 [batch, 256]) straight to a model service, or via the gateway."""

    def __init__(
        self,
        client: aioclient.InferenceServerClient,
        *,
        width: int = 256,
        batch: int = 1,
        api_key: str | None = None,
        seed: int = 0,
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        rng = np.random.default_rng(seed)
        self.pool = []
        for _ in range(64):
            tensor = aioclient.InferInput("x", [batch, width], "FP32")
            tensor.set_data_from_numpy(rng.standard_normal((batch, width), dtype=np.float32))
            self.pool.append([tensor])

    async def __call__(self, i: int) -> str | None:
        await self.client.infer(
            "bench_mlp", self.pool[i % len(self.pool)], headers=self.headers, client_timeout=self.timeout_s
        )
        return None


class FeatureRead:
    """`BatchReadFeatures` of `entities` random entities x the given features of one view (as the router asks)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        view: str,
        feature_names: Sequence[str],
        entities: int,
        *,
        population: int,
        id_prefix: str,
        seed: int = 0,
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self.stub = feature_store_pb2_grpc.FeatureStoreStub(channel)
        self.timeout_s = timeout_s
        self.width = len(feature_names)
        rng = np.random.default_rng(seed)
        self.pool = []
        for _ in range(512):
            ids = [f"{id_prefix}{k}" for k in rng.choice(population, size=entities, replace=False)]
            read = feature_store_pb2.ReadFeaturesRequest(
                feature_view=view, entity_ids=ids, feature_names=list(feature_names)
            )
            self.pool.append(feature_store_pb2.BatchReadFeaturesRequest(reads=[read]))
        self.entities = entities

    async def __call__(self, i: int) -> str | None:
        response = await self.stub.BatchReadFeatures(self.pool[i % len(self.pool)], timeout=self.timeout_s)
        result = response.results[0]
        if len(result.values) != self.entities * self.width:
            raise RuntimeError(f"expected {self.entities * self.width} values, got {len(result.values)}")
        if feature_store_pb2.NOT_FOUND in result.statuses:
            return "not_found"
        return None
