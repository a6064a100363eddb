"""Router core with in-memory stand-ins for its two client protocols (pure logic, no network)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import numpy as np
import pytest

from infermesh.breaker import BreakerState, CircuitBreaker
from infermesh.coalescer import Coalescer, Pending
from infermesh.dataplane import Call, InferRequest, InferResponse
from infermesh.deadline import Deadline
from infermesh.errors import DeadlineExceeded, FailedPrecondition, InvalidInput, NotFound, Overloaded, Unavailable
from infermesh.features import FeatureBlock, FeatureQuery, FeatureStatus
from infermesh.hedging import HedgePolicy
from infermesh.model_config import ModelConfig, Traffic, VersionStatus
from infermesh.priority import DEFAULT_PRIORITY
from infermesh.repository import ModelState, RepositoryState
from infermesh.segments import InferBatch, Segment
from infermesh.tensors import DecodedInputs, Tensor
from router.core import MIRROR_PRIORITY, ModelAnswer, RetryPolicy, RouterCore
from router.replicas import ReplicaSet
from router.traffic import ARM

PRESENT, NOT_FOUND, STALE = FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND, FeatureStatus.STALE
USERS = {"u1": [1.0, 2.0], "u2": [3.0, 4.0], "u3": [5.0, 6.0]}
MERCHANTS = {"m1": [10.0]}
DEFAULTS = {"user": [-1.0, -1.0], "merchant": [-9.0]}
FRESH_AGE_MS, STALE_AGE_MS = 1_000, 999_000


def config(on_missing: str = "default", on_stale: str = "serve") -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "fraud",
            "max_batch_size": 64,
            "inputs": [
                {"name": "user_id", "datatype": "BYTES", "shape": [-1]},
                {"name": "merchant_id", "datatype": "BYTES", "shape": [-1]},
                {"name": "amount", "datatype": "FP32", "shape": [-1]},
            ],
            "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1]}],
            "feature_spec": {
                "entities": [
                    {"input": "user_id", "view": "user", "features": ["a", "b"]},
                    {"input": "merchant_id", "view": "merchant", "features": ["c"]},
                ],
                "request_inputs": ["amount"],
                "on_missing": on_missing,
                "on_stale": on_stale,
            },
            "model_input": {"name": "features", "datatype": "FP32", "shape": [-1, 4]},
        }
    )


class Features:
    def __init__(self, stale: set[str] | None = None) -> None:
        self.calls: list[list[FeatureQuery]] = []
        self.stale = stale or set()
        self.fail_times = 0
        self.stalled: asyncio.Event | None = None  # set: every read hangs until the event is set

    async def defaults(self, deadline: Deadline) -> dict[str, dict[str, float]]:
        return {"user": {"a": -1.0, "b": -1.0}, "merchant": {"c": -9.0}}

    async def read(self, queries: Sequence[FeatureQuery], deadline: Deadline) -> list[FeatureBlock]:
        self.calls.append(list(queries))
        if self.stalled is not None:  # as the gRPC client does: the call ends at its deadline
            try:
                await asyncio.wait_for(self.stalled.wait(), deadline.remaining())
            except TimeoutError:
                raise DeadlineExceeded("feature service: DEADLINE_EXCEEDED") from None
        if self.fail_times:
            self.fail_times -= 1
            raise Unavailable("feature store unavailable")
        blocks = []
        for query in queries:
            table = USERS if query.view == "user" else MERCHANTS
            values, statuses = [], []
            for entity_id in query.entity_ids:
                found = table.get(entity_id)
                values.append(found or DEFAULTS[query.view])
                status = (STALE if entity_id in self.stale else PRESENT) if found else NOT_FOUND
                statuses.append([status] * len(query.feature_names))
            shape = (len(values), len(query.feature_names or ()))
            status_array = np.array(statuses, np.uint8).reshape(shape)
            ages = np.where(status_array == STALE, STALE_AGE_MS, np.where(status_array == NOT_FOUND, -1, FRESH_AGE_MS))
            blocks.append(
                FeatureBlock(
                    query.view,
                    tuple(query.feature_names or ()),
                    np.array(values, np.float32),
                    status_array,
                    ages.astype(np.int64),
                )
            )
        return blocks


class Model:
    """Scores a row as the sum of its features; can fail or stall on demand."""

    def __init__(self, name: str, fail_with: Exception | None = None, gate: asyncio.Event | None = None) -> None:
        self.name = name
        self.fail_with = fail_with
        self.gate = gate
        self.batches: list[int] = []
        self.priorities: list[int] = []

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Sequence[Tensor],
        deadline: Deadline,
        timed: bool = False,
        priority: int = DEFAULT_PRIORITY,
    ):
        self.priorities.append(priority)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        features = inputs[0].data
        self.batches.append(len(features))
        score = features.sum(axis=1).astype(np.float32)
        spent = {"infermesh_timing_model_queue_ms": "0.100", "infermesh_timing_forward_ms": "0.200"} if timed else {}
        if timed:
            await asyncio.sleep(0.001)  # at least as long as the parts it reports took
        return ModelAnswer("1", {"score": Tensor("score", "FP32", score.shape, score)}, spent)

    async def close(self) -> None:
        pass


def serving(model_config: ModelConfig, *versions: str) -> RepositoryState:
    """A replica's repository state: these versions of the model READY."""
    statuses = tuple(VersionStatus(version, "READY") for version in versions)
    return RepositoryState(
        "g1", {model_config.name: ModelState(model_config, model_config.model_dump_json(), statuses)}
    )


def make_core(
    replicas: dict[str, Model],
    features: Features,
    on_missing: str = "default",
    timeout_ms: float = 100,
    on_stale: str = "serve",
    **kwargs,
) -> RouterCore:
    replica_set = ReplicaSet(lambda address: replicas[address], eject_s=60, seed=1)
    replica_set.update(replicas)
    model_config = config(on_missing, on_stale)
    assert model_config.feature_spec is not None
    model_config.feature_spec.timeout_ms = timeout_ms
    for replica in replica_set.replicas.values():
        replica_set.set_repository(replica, serving(model_config, "1"))
    return RouterCore(replica_set, features, RetryPolicy(3, 0.0001, 0.001), **kwargs)


def request(users: list[str], merchants: list[str], amounts: list[float]) -> dict[str, Tensor]:
    ids = np.array([u.encode() for u in users], dtype=object)
    merchant_ids = np.array([m.encode() for m in merchants], dtype=object)
    amount = np.array(amounts, np.float32)
    return {
        "user_id": Tensor("user_id", "BYTES", ids.shape, ids),
        "merchant_id": Tensor("merchant_id", "BYTES", merchant_ids.shape, merchant_ids),
        "amount": Tensor("amount", "FP32", amount.shape, amount),
    }


def deadline(seconds: float = 5.0) -> Deadline:
    return Deadline.after(seconds)


async def infer(
    core: RouterCore, name: str, version: str, tensors: dict[str, Tensor], outputs: list[str], until: Deadline
) -> InferResponse:
    response = await core.infer(Call(until), InferRequest(name, version, DecodedInputs(tensors), outputs=outputs))
    assert isinstance(response, InferResponse)
    return response


async def test_joins_features_in_declared_order() -> None:
    model = Model("a")
    core = make_core({"a": model}, Features())
    result = await infer(core, "fraud", "", request(["u2", "u1"], ["m1", "m1"], [0.5, 100.0]), [], deadline())
    # u2: 3+4, m1: 10, amount 0.5 → 17.5 ; u1: 1+2+10+100
    assert result.outputs[0].data.tolist() == [17.5, 113.0]
    assert result.version == "1"
    assert result.parameters == {}


async def test_concurrent_requests_share_one_feature_read_and_model_call() -> None:
    gate = asyncio.Event()
    model = Model("a", gate=gate)
    features = Features()
    core = make_core({"a": model}, features, max_inflight_batches=1)
    first = asyncio.create_task(infer(core, "fraud", "", request(["u1"], ["m1"], [1]), [], deadline()))
    await asyncio.sleep(0)  # let the first batch leave and block on the gate
    rest = [
        asyncio.create_task(infer(core, "fraud", "", request([u], ["m1"], [i]), [], deadline()))
        for i, u in enumerate(["u1", "u2", "u3", "u2"])
    ]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(first, *rest)
    assert model.batches == [1, 4]  # the four waiting requests left together
    assert len(features.calls) == 2
    assert features.calls[1][0].entity_ids == ["u1", "u2", "u3"]  # de-duplicated ids, one read
    assert [r.outputs[0].data.tolist() for r in results] == [[14.0], [13.0], [18.0], [23.0], [20.0]]


async def test_unknown_entity_default_policy_flags_response() -> None:
    core = make_core({"a": Model("a")}, Features())
    result = await infer(core, "fraud", "", request(["u1", "nobody"], ["m1", "m1"], [0, 0]), [], deadline())
    assert result.outputs[0].data.tolist() == [13.0, 8.0]  # defaults -1 -1 for the unknown user
    assert result.parameters["infermesh_defaulted_entities"] == "user_id=nobody"


async def test_unknown_entity_reject_policy_names_entity_and_spares_others() -> None:
    core = make_core({"a": Model("a")}, Features(), on_missing="reject", max_inflight_batches=1)
    bad = infer(core, "fraud", "", request(["ghost"], ["m1"], [0]), [], deadline())
    good = infer(core, "fraud", "", request(["u1"], ["m1"], [0]), [], deadline())
    outcomes = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(outcomes[0], NotFound) and "user_id=ghost" in str(outcomes[0])
    assert outcomes[1].outputs[0].data.tolist() == [13.0]


async def test_stale_values_replaced_by_defaults_under_on_stale_default() -> None:
    core = make_core({"a": Model("a")}, Features(stale={"u2"}), on_stale="default")
    await core.load_feature_defaults()
    result = await infer(core, "fraud", "", request(["u1", "u2"], ["m1", "m1"], [0.0, 0.0]), [], deadline())
    # u1: 1+2+10 ; u2 stale → its defaults -1, -1 (+10), not its stored 3+4
    assert result.outputs[0].data.tolist() == [13.0, 8.0]
    assert result.parameters == {"infermesh_stale_defaulted_rows": "1"}


async def test_stale_values_refused_under_on_stale_reject_without_failing_neighbours() -> None:
    core = make_core({"a": Model("a")}, Features(stale={"u2"}), on_stale="reject")
    with pytest.raises(FailedPrecondition, match="user_id=u2"):
        await infer(core, "fraud", "", request(["u1", "u2"], ["m1", "m1"], [0.0, 0.0]), [], deadline())
    fresh = await infer(core, "fraud", "", request(["u1"], ["m1"], [0.0]), [], deadline())
    assert fresh.outputs[0].data.tolist() == [13.0]


async def test_feature_ages_returned_when_asked() -> None:
    core = make_core({"a": Model("a")}, Features(stale={"u2"}), on_stale="default")
    await core.load_feature_defaults()
    tensors = request(["u1", "u2", "nobody"], ["m1", "m1", "m1"], [0.0, 0.0, 0.0])
    asked = InferRequest("fraud", "", DecodedInputs(tensors), parameters={"infermesh_feature_ages": True})
    response = await core.infer(Call(deadline()), asked)
    assert isinstance(response, InferResponse)
    ages = json.loads(response.parameters["infermesh_feature_ages_ms"])
    # u2's stale vector was replaced by defaults, "nobody" has none: neither has an age
    assert ages == {"user_id": [FRESH_AGE_MS, -1, -1], "merchant_id": [FRESH_AGE_MS] * 3}
    plain = await infer(core, "fraud", "", request(["u1"], ["m1"], [0.0]), [], deadline())
    assert "infermesh_feature_ages_ms" not in plain.parameters


async def test_stale_rows_are_flagged() -> None:
    core = make_core({"a": Model("a")}, Features(stale={"u2"}))
    result = await infer(core, "fraud", "", request(["u1", "u2"], ["m1", "m1"], [0, 0]), [], deadline())
    assert result.parameters["infermesh_stale_rows"] == "1"


async def test_unavailable_replica_is_retried_on_another_and_ejected() -> None:
    dead, alive = Model("dead", fail_with=Unavailable("gone")), Model("alive")
    core = make_core({"dead": dead, "alive": alive}, Features())
    for _ in range(6):
        result = await infer(core, "fraud", "", request(["u1"], ["m1"], [0]), [], deadline())
        assert result.outputs[0].data.tolist() == [13.0]
    assert core.replicas.replicas["dead"].failures >= 1
    assert core.replicas.up_count == 1


async def test_queue_full_replica_is_retried_elsewhere() -> None:
    full, free = Model("full", fail_with=Overloaded("queue is full")), Model("free")
    core = make_core({"full": full, "free": free}, Features())
    for _ in range(4):
        await infer(core, "fraud", "", request(["u1"], ["m1"], [0]), [], deadline())
    assert sum(free.batches) == 4


async def test_feature_read_retried_then_succeeds() -> None:
    features = Features()
    features.fail_times = 1
    core = make_core({"a": Model("a")}, features)
    result = await infer(core, "fraud", "", request(["u1"], ["m1"], [0]), [], deadline())
    assert result.outputs[0].data.tolist() == [13.0]
    assert len(features.calls) == 2


async def test_feature_store_outage_default_policy_answers_flagged() -> None:
    features = Features()
    core = make_core({"a": Model("a")}, features)
    assert await core.load_feature_defaults()
    features.fail_times = 100
    result = await infer(core, "fraud", "", request(["u1"], ["m1"], [2.0]), [], deadline())
    assert result.outputs[0].data.tolist() == [-9.0]  # -1 -1 -9 defaults + amount 2
    assert result.parameters["infermesh_features_unavailable"] == "true"
    assert result.parameters["infermesh_defaulted_entities"] == "user_id=u1,merchant_id=m1"


async def test_a_stalled_feature_store_costs_one_budget_then_the_breaker_answers_at_once() -> None:
    features = Features()
    breaker = CircuitBreaker(failure_threshold=3, open_s=0.2)
    core = make_core({"a": Model("a")}, features, timeout_ms=30, feature_breaker=breaker)
    assert await core.load_feature_defaults()
    features.stalled = asyncio.Event()  # reads hang, as against a paused Redis
    for _ in range(3):  # each waits out the model's 30 ms budget, then answers from the defaults
        result = await infer(core, "fraud", "", request(["u1"], ["m1"], [2.0]), [], deadline())
        assert result.parameters["infermesh_features_unavailable"] == "true"
    assert breaker.state == BreakerState.OPEN and len(features.calls) == 3
    started = time.monotonic()
    result = await infer(core, "fraud", "", request(["u2"], ["m1"], [2.0]), [], deadline())
    assert time.monotonic() - started < 0.025  # open: not even tried
    assert result.parameters["infermesh_features_unavailable"] == "true" and len(features.calls) == 3
    # The store answers again: after open_s one read probes it, and its success closes the breaker.
    features.stalled.set()
    features.stalled = None
    await asyncio.sleep(0.25)
    result = await infer(core, "fraud", "", request(["u1"], ["m1"], [2.0]), [], deadline())
    assert "infermesh_features_unavailable" not in result.parameters
    assert breaker.state == BreakerState.CLOSED


async def test_a_stalled_feature_store_fails_reject_models_within_the_budget_not_the_deadline() -> None:
    features = Features()
    core = make_core({"a": Model("a")}, features, on_missing="reject", timeout_ms=30)
    features.stalled = asyncio.Event()
    started = time.monotonic()
    with pytest.raises(Unavailable, match="features for model 'fraud' are unavailable"):
        await infer(core, "fraud", "", request(["u1"], ["m1"], [2.0]), [], deadline(5.0))
    assert time.monotonic() - started < 1.0


async def test_feature_store_outage_reject_policy_fails_fast() -> None:
    features = Features()
    core = make_core({"a": Model("a")}, features, on_missing="reject")
    assert await core.load_feature_defaults()
    features.fail_times = 100
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await infer(core, "fraud", "", request(["u1"], ["m1"], [2.0]), [], deadline())
    assert time.monotonic() - started < 0.5
    assert len(features.calls) == 3  # max_attempts, then give up


async def test_all_replicas_down_gives_unavailable_within_deadline() -> None:
    core = make_core(
        {"a": Model("a", fail_with=Unavailable("x")), "b": Model("b", fail_with=Unavailable("y"))}, Features()
    )
    with pytest.raises(Unavailable):
        await infer(core, "fraud", "", request(["u1"], ["m1"], [0]), [], deadline())


async def test_deadline_expires_while_model_is_stuck() -> None:
    core = make_core({"a": Model("a", gate=asyncio.Event())}, Features())
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await infer(core, "fraud", "", request(["u1"], ["m1"], [0]), [], deadline(0.05))
    assert time.monotonic() - started < 1.0


async def test_validation_and_lookup_errors() -> None:
    core = make_core({"a": Model("a")}, Features())
    with pytest.raises(NotFound, match="model 'nope' not found"):
        await infer(core, "nope", "", request(["u1"], ["m1"], [0]), [], deadline())
    with pytest.raises(NotFound, match="no version '7'"):
        await infer(core, "fraud", "7", request(["u1"], ["m1"], [0]), [], deadline())
    with pytest.raises(InvalidInput, match="requested output 'x'"):
        await infer(core, "fraud", "", request(["u1"], ["m1"], [0]), ["x"], deadline())
    with pytest.raises(InvalidInput, match="input 'amount': element 0 is NaN"):
        await infer(core, "fraud", "", request(["u1"], ["m1"], [float("nan")]), [], deadline())


async def test_coalescer_refuses_at_once_when_queue_is_full() -> None:
    gate = asyncio.Event()

    async def stuck(batch: list[Pending]) -> None:
        await gate.wait()
        for pending in batch:
            pending.future.set_result("ok")

    coalescer = Coalescer("router", "m", stuck, max_rows=10, max_inflight=1, max_pending=2)
    running = [asyncio.create_task(coalescer.submit(Pending(None, 1, deadline()))) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await coalescer.submit(Pending(None, 1, deadline()))
    gate.set()
    assert await asyncio.gather(*running) == ["ok", "ok", "ok"]


def test_power_of_two_choices_prefers_less_loaded() -> None:
    replicas = ReplicaSet(lambda address: None, seed=3)
    replicas.update(["a", "b"])
    replicas.replicas["a"].inflight = 5
    assert {replicas.choose().address for _ in range(20)} == {"b"}
    replicas.set_health(replicas.replicas["b"], False)
    assert replicas.choose().address == "a"
    with pytest.raises(Unavailable):
        replicas.choose(exclude={"a", "b"})


def test_latency_aware_choice_avoids_a_slow_replica_at_low_load() -> None:
    replicas = ReplicaSet(lambda address: None, seed=5, latency_decay_s=60)
    replicas.update(["fast", "slow"])
    replicas.report_success(replicas.replicas["fast"], 0.001)
    replicas.report_success(replicas.replicas["slow"], 0.025)
    # Both idle (in-flight 0): in-flight counts alone would split traffic evenly.
    assert {replicas.choose().address for _ in range(20)} == {"fast"}
    # Load still counts: the fast replica with many calls in flight costs more than the idle slow one.
    replicas.replicas["fast"].inflight = 40
    assert replicas.choose().address == "slow"


def test_a_slow_estimate_decays_so_the_replica_is_tried_again() -> None:
    replicas = ReplicaSet(lambda address: None, seed=5, latency_decay_s=0.01)
    replicas.update(["a", "b"])
    replicas.report_success(replicas.replicas["a"], 0.5)
    slow = replicas.replicas["a"]
    slow.latency_at -= 1.0  # a second ago: 100 decay constants
    assert slow.cost(time.monotonic(), 0.01) < 1e-9


async def test_a_batch_answers_each_segment_on_its_own() -> None:
    """A gateway batch: one segment with a bad number, one unknown entity (reject), two good ones; the good ones
    get their own rows in one feature read and one model call, the bad ones their own errors."""
    model, features = Model("a"), Features()
    core = make_core({"a": model}, features, on_missing="reject")
    merged = request(["u1", "u2", "ghost", "u2", "u3"], ["m1"] * 5, [1.0, float("nan"), 0.0, 2.0, 3.0])
    segments = [Segment(1, "a"), Segment(1, "b"), Segment(1, "c"), Segment(2, "d")]
    batch = InferBatch("fraud", "", DecodedInputs(merged), [], segments)
    result = await core.infer_batch(Call(deadline()), batch)
    assert (result.model, result.version, result.output_names) == ("fraud", "1", ["score"])
    first, nan, ghost, last = result.segments
    assert first.error is None and first.outputs[0].data.tolist() == [14.0]
    assert isinstance(nan.error, InvalidInput) and "input 'amount'" in str(nan.error)
    assert isinstance(ghost.error, NotFound) and "user_id=ghost" in str(ghost.error)
    assert last.error is None and last.outputs[0].data.tolist() == [19.0, 24.0]
    assert model.batches == [3] and len(features.calls) == 1


async def test_a_batch_whose_segments_do_not_cover_its_rows_is_refused() -> None:
    core = make_core({"a": Model("a")}, Features())
    batch = InferBatch("fraud", "", DecodedInputs(request(["u1", "u2"], ["m1"] * 2, [0, 0])), [], [Segment(1)])
    with pytest.raises(InvalidInput, match="do not add up to the batch of 2 rows"):
        await core.infer_batch(Call(deadline()), batch)


async def test_a_request_that_asks_gets_the_time_each_part_took_and_others_get_nothing() -> None:
    core = make_core({"a": Model("a")}, Features())
    asked = InferRequest(
        "fraud", "", DecodedInputs(request(["u1"], ["m1"], [0])), parameters={"infermesh_timing": True}
    )
    started = time.perf_counter()
    timed = await core.infer(Call(deadline()), asked)
    elapsed_ms = (time.perf_counter() - started) * 1000
    parts = {
        "infermesh_timing_router_wait_ms",
        "infermesh_timing_router_ms",
        "infermesh_timing_feature_read_ms",
        "infermesh_timing_model_queue_ms",
        "infermesh_timing_forward_ms",
        "infermesh_timing_transport_ms",
    }
    assert isinstance(timed, InferResponse) and set(timed.parameters) == parts
    assert timed.parameters["infermesh_timing_forward_ms"] == "0.200"  # as the model service said
    assert sum(float(v) for v in timed.parameters.values()) <= elapsed_ms
    plain = await infer(core, "fraud", "", request(["u1"], ["m1"], [0]), [], deadline())
    assert plain.parameters == {}


async def test_a_call_stuck_on_one_replica_is_hedged_on_another_and_the_loser_cancelled() -> None:
    stuck = Model("stuck", gate=asyncio.Event())  # never answers
    fast = Model("fast")
    hedging = HedgePolicy(max_ratio=1.0, min_samples=1)
    for _ in range(32):
        hedging.observe(0.005)  # recent calls took 5 ms: a call still out after that gets a copy
    core = make_core({"stuck": stuck, "fast": fast}, Features(), hedging=hedging)
    features = Tensor("features", "FP32", (1, 4), np.ones((1, 4), np.float32))
    started = time.monotonic()
    for _ in range(6):
        answer = await core.call_model("fraud", "1", [features], deadline(5.0))
        assert answer.outputs["score"].data.tolist() == [4.0]
    assert time.monotonic() - started < 1.0  # none waited for the stuck replica
    assert len(fast.batches) == 6
    await asyncio.sleep(0)  # let the cancelled calls unwind
    assert all(replica.inflight == 0 for replica in core.replicas.replicas.values())


async def test_hedges_stay_within_their_share_of_the_calls() -> None:
    policy = HedgePolicy(max_ratio=0.05, min_samples=1, max_tokens=1.0)
    for _ in range(32):
        policy.observe(0.005)
    hedged = 0
    for _ in range(200):
        assert policy.delay() == 0.005
        hedged += policy.spend()  # as if every call were slow
    assert hedged == 10  # 5 % of 200


def test_no_hedge_before_enough_calls_were_seen() -> None:
    policy = HedgePolicy(min_samples=64)
    for _ in range(63):
        policy.observe(0.001)
    assert policy.delay() is None


async def test_a_request_s_priority_travels_to_the_model_service_and_a_bad_one_is_refused() -> None:
    model = Model("a")
    core = make_core({"a": model}, Features())
    urgent = InferRequest("fraud", "", DecodedInputs(request(["u1"], ["m1"], [1.0])), parameters={"priority": 1})
    await core.infer(Call(deadline()), urgent)
    plain = InferRequest("fraud", "", DecodedInputs(request(["u2"], ["m1"], [1.0])))
    await core.infer(Call(deadline()), plain)
    assert model.priorities == [1, DEFAULT_PRIORITY]
    bad = InferRequest("fraud", "", DecodedInputs(request(["u1"], ["m1"], [1.0])), parameters={"timeout": -5})
    with pytest.raises(InvalidInput, match="parameter 'timeout' must be a non-negative integer"):
        await core.infer(Call(deadline()), bad)


async def test_drift_of_served_traffic_against_the_version_s_profile() -> None:
    """PSI per profiled feature and of the prediction, by hand: each profile splits its column in two halves."""
    from infermesh.drift import Profile, ReferenceHistogram
    from router.drift import DriftSettings

    halves = (0.5, 0.5)
    profile = Profile(
        {"a": ReferenceHistogram((2.5,), halves), "amount": ReferenceHistogram((50.0,), halves)},
        {"score": ReferenceHistogram((10.0,), halves)},
        prediction="score",
    )
    model = Model("m")
    core = make_core({"m": model}, Features(), drift=DriftSettings(60.0, 6, min_rows=4, export_interval_s=0.0))
    replica = core.replicas.replicas["m"]
    state = serving(config(), "1")
    held = state.models["fraud"]
    versions = (VersionStatus("1", "READY", profile=profile.to_json()),)
    core.replicas.set_repository(
        replica, RepositoryState("g2", {"fraud": ModelState(held.config, held.config_json, versions)})
    )
    # a: 1 and 5 (u1, u3): half on each side of 2.5, as trained. amount: all 100, above 50. score > 10: all above.
    await infer(core, "fraud", "", request(["u1", "u3", "u1", "u3"], ["m1"] * 4, [100.0] * 4), [], deadline())

    def value(name: str, **labels: str) -> float | None:
        from prometheus_client import REGISTRY

        return REGISTRY.get_sample_value(name, {"model": "fraud", "version": "1", **labels})

    # amount: served [0, 1] against [.5, .5], the empty bin floored at 1e-4
    shifted = (1e-4 - 0.5) * np.log(1e-4 / 0.5) + (1 - 0.5) * np.log(1 / 0.5)
    assert value("infermesh_feature_drift_psi", feature="a") == pytest.approx(0.0)
    assert value("infermesh_feature_drift_psi", feature="amount") == pytest.approx(shifted)
    assert value("infermesh_feature_drift_psi", feature="b") is None  # not profiled: no series
    assert value("infermesh_prediction_drift_psi") == value("infermesh_feature_drift_psi", feature="amount")
    assert value("infermesh_drift_window_rows") == 4
    # The version leaves: its series go with it.
    core.replicas.set_repository(replica, RepositoryState("g3", {}))
    core.drift.export()
    assert value("infermesh_prediction_drift_psi") is None
    assert value("infermesh_feature_drift_psi", feature="amount") is None


class ShadowedModel(Model):
    """Answers version 1 at once; calls to version 2 (the shadow) wait for `release`."""

    def __init__(self) -> None:
        super().__init__("a")
        self.release = asyncio.Event()
        self.called = asyncio.Event()  # a shadow call is in flight
        self.shadow_batches: list[int] = []

    async def infer(self, model, version, inputs, deadline, timed=False, priority=DEFAULT_PRIORITY):  # type: ignore[no-untyped-def]
        if version == "2":
            self.called.set()
            await self.release.wait()
            self.shadow_batches.append(len(inputs[0].data))
        return await super().infer(model, version, inputs, deadline, timed, priority)


async def test_mirrors_of_batches_served_while_one_is_in_flight_leave_together() -> None:
    model = ShadowedModel()
    core = make_core({"a": model}, Features())
    shadowed = config().model_copy(update={"traffic": Traffic(baseline="1", shadow=["2"])})
    (replica,) = core.replicas.replicas.values()
    core.replicas.set_repository(replica, serving(shadowed, "1", "2"))
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        response = await infer(core, "fraud", "", request([user], ["m1"], [1.0]), [], deadline())
        assert response.version == "1" and response.parameters[ARM] == "baseline"
        await asyncio.wait_for(model.called.wait(), 5)  # the first mirror is in flight (and waits)
    assert model.shadow_batches == []  # the other five queued behind it
    model.release.set()
    await asyncio.wait_for(asyncio.gather(*core._mirror_tasks), 5)  # the one task sending to the shadow
    assert model.shadow_batches == [1, 5]  # one call for the five served meanwhile
    assert model.priorities[-1] == MIRROR_PRIORITY


class VersionedModel(Model):
    """Counts the rows of each call per version, and answers with the version it was asked for."""

    def __init__(self) -> None:
        super().__init__("a")
        self.calls: list[tuple[str, int]] = []

    async def infer(self, model, version, inputs, deadline, timed=False, priority=DEFAULT_PRIORITY):  # type: ignore[no-untyped-def]
        self.calls.append((version, len(inputs[0].data)))
        answer = await super().infer(model, version, inputs, deadline, timed, priority)
        answer.version = version
        return answer


async def test_segments_split_between_versions_share_one_feature_read() -> None:
    model, features = VersionedModel(), Features()
    core = make_core({"a": model}, features)
    split = config().model_copy(
        update={"traffic": Traffic(baseline="1", split={"1": 50, "2": 50}, sticky_input="user_id")}
    )
    (replica,) = core.replicas.replicas.values()
    core.replicas.set_repository(replica, serving(split, "1", "2"))
    users = [f"u{i}" for i in range(12)]
    segments = [Segment(1, user) for user in users]
    batch = InferBatch("fraud", "", DecodedInputs(request(users, ["m1"] * 12, [1.0] * 12)), [], segments)
    result = await core.infer_batch(Call(deadline()), batch)
    versions = [segment.version for segment in result.segments]
    assert set(versions) == {"1", "2"} and all(segment.error is None for segment in result.segments)
    assert len(features.calls) == 1  # one feature read for the whole batch
    assert sorted(model.calls) == sorted((v, versions.count(v)) for v in ("1", "2"))  # a model call per version
    assert [s.flags[ARM] for s in result.segments] == ["baseline" if v == "1" else "canary" for v in versions]


async def test_a_split_without_sticky_input_sends_each_batch_whole_to_one_version_drawn_by_weight() -> None:
    model, features = VersionedModel(), Features()
    core = make_core({"a": model}, features)
    split = config().model_copy(update={"traffic": Traffic(baseline="1", split={"1": 50, "2": 50})})
    (replica,) = core.replicas.replicas.values()
    core.replicas.set_repository(replica, serving(split, "1", "2"))
    users = [f"u{i}" for i in range(8)]
    drawn = []
    for _ in range(40):
        batch = InferBatch(
            "fraud", "", DecodedInputs(request(users, ["m1"] * 8, [1.0] * 8)), [], [Segment(1, u) for u in users]
        )
        result = await core.infer_batch(Call(deadline()), batch)
        versions = {segment.version for segment in result.segments}
        assert len(versions) == 1 and all(segment.error is None for segment in result.segments)
        drawn.append(versions.pop())
    assert [rows for _, rows in model.calls] == [8] * 40  # one model call per batch, never one per version
    assert 8 <= drawn.count("2") <= 32  # each batch drawn at 50 %: both versions serve (p of failing ~1e-4)
