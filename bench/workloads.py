"""Requests the scenarios send, built ahead of the run (a pool cycled through) so the client spends its CPU on
sending, not on building tensors. Clients: `tritonclient.grpc.aio` for the inference API (what a Triton or
KServe user sees) and the generated feature_store stubs for the feature service.

Entity ids vary over the whole demo world (u0…u9999, m0…m999), so the feature store is not read from one hot key.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as aioclient

from demo import synthetic
from infermesh.features import DEFAULTED_ENTITIES, FEATURES_UNAVAILABLE
from infermesh.proto import feature_store_pb2, feature_store_pb2_grpc

POOL = 2048
CLIENT_TIMEOUT_S = 10.0


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
    ) -> None:
        self.client = client
        self.model = model
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
            self.model, self.pool[i % POOL], headers=self.headers, client_timeout=self.timeout_s
        )
        return response_tag(result)


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
