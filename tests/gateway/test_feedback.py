"""Label feedback (gateway.feedback) on the index the router's prediction log writes, in a real redis-server:
records written by router.prediction_log, labels joined, refused and counted as the gateway does."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest
import redis

from demo.redis_server import RedisServer
from gateway.auth import Tenant
from gateway.feedback import Feedback, LabelReport, RedisLabelIndex
from gateway.online_accuracy import OnlineAccuracy
from infermesh import prediction_index
from infermesh.dataplane import Call
from infermesh.deadline import Deadline
from infermesh.errors import Code, InvalidInput, NotFound, PermissionDenied
from infermesh.model_config import ModelConfig, ModelEntry
from infermesh.tensors import Tensor
from router.prediction_log import LoggedRequest, PredictionLog

STREAM = "fb"
SCORES = [0.9, 0.2, 0.4, 0.6, 0.8]
CONFIG = ModelConfig.model_validate(
    {
        "name": "m",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1]}],
        "monitoring": {"log_sample_rate": 1.0, "threshold": 0.5},
    }
)


@dataclass
class Gateway:
    """The gateway core as feedback sees it: the caller's tenant (authenticated already) and the models."""

    def tenant(self, call: Call) -> Tenant:
        assert isinstance(call.principal, Tenant)
        return call.principal

    def router_models(self) -> dict[str, ModelEntry]:
        return {"m": ModelEntry(CONFIG, ["1"])}


def call(tenant: str, models: tuple[str, ...] = ("m",)) -> Call:
    return Call(Deadline.after(5), principal=Tenant(tenant, frozenset(models)))


@pytest.fixture
async def feedback(redis_server: RedisServer) -> AsyncIterator[Feedback]:
    redis.Redis.from_url(redis_server.url).flushall()
    log = PredictionLog(prediction_index.connect(redis_server.url), b"k" * 32, stream=STREAM, index_ttl_s=60)
    data = np.array([*SCORES, 0.5, 0.5, 0.5], dtype=np.float32)
    sampled = [LoggedRequest(f"a{i}", (i, i + 1), {}, tenant="acme") for i in range(5)]
    sampled.append(LoggedRequest("b0", (5, 6), {}, tenant="bravo"))
    sampled.append(LoggedRequest("wide", (6, 8), {}, tenant="acme"))  # two rows
    log.record(CONFIG, "1", sampled, {"p": Tensor("p", "FP32", data.shape, data)})
    await log.flush()
    await log.close()
    index = RedisLabelIndex(prediction_index.connect(redis_server.url), STREAM)
    yield Feedback(Gateway(), index, OnlineAccuracy(60, 6, min_labels=1), max_labels=10)
    await index.close()


async def test_labels_join_and_accuracy_matches_a_hand_computation(feedback: Feedback) -> None:
    labels = [LabelReport(f"a{i}", label) for i, label in enumerate([1, 0, 1, 0, 1])]
    joined, outcomes = await feedback.report_labels(call("acme"), labels)
    assert joined == 5 and all(o.code == Code.OK and (o.model, o.version) == ("m", "1") for o in outcomes)
    summary = feedback.accuracy.version("m", "1", 0).summary(time.time())
    assert summary["accuracy"] == pytest.approx(3 / 5)  # 0.4 (1) and 0.6 (0) are wrong at 0.5
    assert summary["brier"] == pytest.approx(0.81 / 5, abs=1e-6)
    # Again: counted once.
    joined, outcomes = await feedback.report_labels(call("acme"), labels[:2])
    assert joined == 0 and [o.code for o in outcomes] == [Code.ALREADY_EXISTS] * 2
    assert feedback.accuracy.version("m", "1", 0).summary(time.time())["labels"] == 5


async def test_unknown_ids_are_not_found_alone_and_reported_per_label_beside_known_ones(feedback: Feedback) -> None:
    with pytest.raises(NotFound, match="'nope'"):
        await feedback.report_labels(call("acme"), [LabelReport("nope", 1)])
    joined, outcomes = await feedback.report_labels(call("acme"), [LabelReport("nope", 1), LabelReport("a0", 1)])
    assert joined == 1 and [o.code for o in outcomes] == [Code.NOT_FOUND, Code.OK]


async def test_another_tenants_request_is_refused_and_nothing_is_recorded(feedback: Feedback) -> None:
    with pytest.raises(PermissionDenied, match="'b0' is not a request of tenant 'acme'"):
        await feedback.report_labels(call("acme"), [LabelReport("a0", 1), LabelReport("b0", 1)])
    with pytest.raises(PermissionDenied):  # the tenant's own request, of a model its key may not use
        await feedback.report_labels(call("acme", models=("other",)), [LabelReport("a0", 1)])
    joined, _ = await feedback.report_labels(call("acme"), [LabelReport("a0", 1)])
    assert joined == 1  # a0 was not marked by the refused calls


async def test_bad_labels_are_invalid_and_batches_are_bounded(feedback: Feedback) -> None:
    with pytest.raises(InvalidInput, match="must be 0 or 1"):
        await feedback.report_labels(call("acme"), [LabelReport("a0", 0.5)])
    with pytest.raises(InvalidInput, match="1 to 10 labels"):
        await feedback.report_labels(call("acme"), [LabelReport(f"a{i}", 1) for i in range(11)])
    with pytest.raises(InvalidInput, match="1 to 256 characters"):
        await feedback.report_labels(call("acme"), [LabelReport("x" * 300, 1)])
    _, outcomes = await feedback.report_labels(call("acme"), [LabelReport("a1", 0), LabelReport("a1", 0)])
    assert [o.code for o in outcomes] == [Code.OK, Code.INVALID_ARGUMENT]  # repeated in one call
    with pytest.raises(InvalidInput, match="single-row"):
        await feedback.report_labels(call("acme"), [LabelReport("wide", 1)])
