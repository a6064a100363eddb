"""Gateway core: API keys (hashed), tenants' models, admission, forwarding and coalescing (pure logic, the
router replaced by an in-memory stand-in)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from gateway.auth import KeyStore, hash_key, new_api_key, write_key_file
from gateway.core import Admission, GatewayCore
from gateway.router_calls import RouterCalls, batch_rows_within
from infermesh.dataplane import Call, EncodedInferResponse, InferRequest
from infermesh.deadline import Deadline
from infermesh.errors import DomainError, InvalidInput, Overloaded, PermissionDenied, Unauthenticated, Unavailable
from infermesh.model_config import ModelConfig, ModelEntry, VersionStatus
from infermesh.repository import ModelState, RepositoryState
from infermesh.segments import InferBatch
from infermesh.statistics import ModelStatistics
from infermesh.tensors import DecodedInputs, Tensor


@pytest.fixture
def keys(tmp_path: Path) -> tuple[KeyStore, str]:
    key = new_api_key()
    path = tmp_path / "keys.json"
    write_key_file(path, key, "acme", ["fraud"])
    return KeyStore.load(path), key


def test_key_file_holds_only_the_hash(tmp_path: Path, keys: tuple[KeyStore, str]) -> None:
    _, key = keys
    text = (tmp_path / "keys.json").read_text()
    assert key not in text
    assert json.loads(text)["keys"][0]["sha256"] == hash_key(key)


def test_authenticate_and_authorize(keys: tuple[KeyStore, str]) -> None:
    store, key = keys
    tenant = store.authenticate(f"Bearer {key}")
    assert tenant.name == "acme" and tenant.role == "user" and not tenant.is_admin
    store.authorize(tenant, "fraud")
    with pytest.raises(PermissionDenied, match="tenant 'acme' may not use model 'other'"):
        store.authorize(tenant, "other")


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer wrong-key", "Bearer ", "Bearer e30.e30.c2ln"])
def test_missing_or_wrong_key_is_unauthenticated(keys: tuple[KeyStore, str], header: str | None) -> None:
    store, _ = keys
    with pytest.raises(Unauthenticated):
        store.authenticate(header)


def test_admission_refuses_beyond_limit_with_a_retry_hint_and_recovers() -> None:
    admission = Admission(2)
    first, second = admission.acquire(), admission.acquire()
    with pytest.raises(Overloaded) as refused:
        admission.acquire()
    assert refused.value.retry_after_s is not None and admission.inflight == 2
    admission.release(first)
    admission.release(second)
    assert admission.inflight == 0
    admission.release(admission.acquire())


def entry_with_outputs(outputs: list[dict[str, object]], max_batch_size: int = 1024) -> ModelEntry:
    config = ModelConfig.model_validate(
        {
            "name": "m",
            "max_batch_size": max_batch_size,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": outputs,
        }
    )
    return ModelEntry(config, ["1"])


def test_coalesced_rows_keep_the_response_within_a_message() -> None:
    entry = entry_with_outputs(
        [
            {"name": "small", "datatype": "FP32", "shape": [-1]},
            {"name": "big", "datatype": "FP64", "shape": [-1, 1000]},
            {"name": "text", "datatype": "BYTES", "shape": [-1]},
        ]
    )
    # Only the small output: 4 bytes a row, max_batch_size is the bound.
    assert batch_rows_within(entry, ["small"], 1_000_000) == 1024
    # The 8,000-byte rows of `big` (and `small`): 1,000,000 // 8,004 rows.
    assert batch_rows_within(entry, ["small", "big"], 1_000_000) == 124
    # A row never needs to be refused: at least one row.
    assert batch_rows_within(entry, ["big"], 10) == 1
    # BYTES (all outputs by default): sizes unknown, the coalescer's byte budget for requests bounds it.
    assert batch_rows_within(entry, [], 1_000_000) == 1024


class Router:
    """Stands in for the router: answers a forwarded request with its bytes, a batch with a line per segment."""

    def __init__(self, repository: RepositoryState | None = None) -> None:
        self.repository = repository
        self.loads: list[tuple[str, str | None]] = []
        self.forwarded: list[bytes] = []
        self.tenants: list[str] = []  # the tenant each forwarded request was sent with
        self.batches: list[InferBatch] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def infer(self, encoded_request: bytes, deadline: Deadline, tenant: str = "") -> bytes:
        self.forwarded.append(encoded_request)
        self.tenants.append(tenant)
        await self.gate.wait()
        return b"answer to " + encoded_request

    async def infer_batch(self, batch: InferBatch, deadline: Deadline) -> list[bytes | DomainError]:
        self.batches.append(batch)
        return [f"segment {s.id} of {s.rows} rows".encode() for s in batch.segments]

    async def ready(self) -> bool:
        return True

    async def model_ready(self, name: str, version: str) -> bool:
        return True

    async def refresh_repository(self, timeout_s: float) -> bool:
        return False

    async def load(self, model: str, config_json: str | None, deadline: Deadline) -> None:
        self.loads.append((model, config_json))

    async def unload(self, model: str, deadline: Deadline) -> None:
        self.loads.append((model, "unload"))

    async def statistics(self, model: str, version: str, deadline: Deadline) -> list[ModelStatistics]:
        return [ModelStatistics(name, "1") for name in ("fraud", "secret") if not model or model == name]

    def flags_of(self, encoded_response: bytes) -> dict[str, str]:
        return {"infermesh_stale_rows": "0"}

    def with_flags(self, encoded_response: bytes, flags: dict[str, str]) -> bytes:
        return encoded_response + b" " + b",".join(sorted(k.encode() for k in flags))


class Undecodable(DecodedInputs):
    """Inputs that must not be decoded (a request refused before any work)."""

    def tensors(self, max_element_bytes: Mapping[str, int] | None = None) -> dict[str, Tensor]:
        raise AssertionError("decoded before the caller was checked")


def fraud_repository() -> RepositoryState:
    entry = entry_with_outputs([{"name": "y", "datatype": "FP32", "shape": [-1]}])
    config = entry.config.model_copy(update={"name": "fraud"})
    ready = (VersionStatus("1", "READY"),)
    return RepositoryState("g1", {"fraud": ModelState(config, config.model_dump_json(), ready)})


def gateway(keys: KeyStore, router: Router, max_inflight: int = 8) -> GatewayCore:
    if router.repository is None:
        router.repository = fraud_repository()
    calls = RouterCalls(router, max_inflight_batches=1, max_pending=64, enabled=True, max_message_bytes=1 << 20)
    return GatewayCore(keys, max_inflight, router, calls)


def x_request(request_id: str, rows: int = 1, encoded: bytes = b"") -> InferRequest:
    x = np.ones((rows, 4), dtype=np.float32)
    inputs = DecodedInputs({"x": Tensor("x", "FP32", x.shape, x)})
    return InferRequest("fraud", "", inputs, id=request_id, encoded=encoded or request_id.encode())


async def test_the_caller_is_checked_before_the_request_is_decoded(keys: tuple[KeyStore, str]) -> None:
    store, key = keys
    core = gateway(store, Router())
    request = InferRequest("fraud", "", Undecodable({}), encoded=b"x")
    with pytest.raises(Unauthenticated):
        await core.infer(Call(Deadline.after(5), "Bearer nope"), request)
    with pytest.raises(PermissionDenied, match="may not use model 'other'"):
        await core.infer(Call(Deadline.after(5), f"Bearer {key}"), InferRequest("other", "", Undecodable({})))


async def test_a_request_alone_is_forwarded_byte_for_byte(keys: tuple[KeyStore, str]) -> None:
    store, key = keys
    router = Router()
    answer = await gateway(store, router).infer(Call(Deadline.after(5), f"Bearer {key}"), x_request("r1"))
    assert answer == EncodedInferResponse(b"answer to r1")
    assert router.forwarded == [b"r1"] and router.batches == []
    assert router.tenants == ["acme"]  # the authenticated tenant travels with it (the prediction log records it)


async def test_concurrent_requests_share_one_batch_and_keep_their_own_answers(keys: tuple[KeyStore, str]) -> None:
    store, key = keys
    router = Router()
    router.gate.clear()
    core = gateway(store, router)
    call = Call(Deadline.after(5), f"Bearer {key}")
    first = asyncio.create_task(core.infer(call, x_request("first")))
    await asyncio.sleep(0)  # the first request is alone: forwarded, and holds the one router call in flight
    rest = [asyncio.create_task(core.infer(call, x_request(f"r{i}", rows=i))) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    router.gate.set()
    answers = await asyncio.gather(first, *rest)
    assert [a.data for a in answers if isinstance(a, EncodedInferResponse)] == [
        b"answer to first",
        b"segment r1 of 1 rows",
        b"segment r2 of 2 rows",
        b"segment r3 of 3 rows",
    ]
    (batch,) = router.batches
    assert [h.shape for h in batch.inputs.headers] == [(6, 4)]
    assert [s.tenant for s in batch.segments] == ["acme"] * 3


async def test_bad_input_and_overload_are_refused_at_the_gateway(keys: tuple[KeyStore, str]) -> None:
    store, key = keys
    router = Router()
    core = gateway(store, router, max_inflight=1)
    call = Call(Deadline.after(5), f"Bearer {key}")
    wrong = np.ones((1, 3), dtype=np.float32)
    with pytest.raises(InvalidInput, match="input 'x': shape"):
        await core.infer(call, InferRequest("fraud", "", DecodedInputs({"x": Tensor("x", "FP32", (1, 3), wrong)})))
    router.gate.clear()
    held = asyncio.create_task(core.infer(call, x_request("held")))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await core.infer(call, x_request("refused"))
    router.gate.set()
    await held
    assert router.forwarded == [b"held"]


async def test_the_repository_api_is_for_admins_and_statistics_for_the_tenant_s_models(tmp_path: Path) -> None:
    user, admin = new_api_key(), new_api_key()
    write_key_file(tmp_path / "user.json", user, "acme", ["fraud"])
    write_key_file(tmp_path / "admin.json", admin, "ops", ["*"], role="admin")
    router = Router()
    as_user = gateway(KeyStore.load(tmp_path / "user.json"), router)
    as_admin = gateway(KeyStore.load(tmp_path / "admin.json"), router)
    user_call, admin_call = Call(Deadline.after(5), f"Bearer {user}"), Call(Deadline.after(5), f"Bearer {admin}")
    for refused in (
        as_user.repository_index(user_call, False),
        as_user.repository_load(user_call, "fraud", None),
        as_user.repository_unload(user_call, "fraud"),
    ):
        with pytest.raises(PermissionDenied, match="admin"):
            await refused
    assert router.loads == []
    index = await as_admin.repository_index(admin_call, False)
    assert [(e.name, e.version, e.state) for e in index] == [("fraud", "1", "READY")]
    await as_admin.repository_load(admin_call, "fraud", None)
    await as_admin.repository_unload(admin_call, "fraud")
    assert router.loads == [("fraud", None), ("fraud", "unload")]
    with pytest.raises(InvalidInput, match="invalid config"):
        await as_admin.repository_load(admin_call, "fraud", "{not json")
    with pytest.raises(InvalidInput, match="names model 'other'"):
        await as_admin.repository_load(
            admin_call, "fraud", fraud_repository().models["fraud"].config_json.replace('"fraud"', '"other"')
        )
    # Statistics: only the tenant's models, and a model it may not see is PERMISSION_DENIED, never NOT_FOUND.
    assert [s.name for s in await as_user.model_statistics(user_call, "", "")] == ["fraud"]
    with pytest.raises(PermissionDenied):
        await as_user.model_statistics(user_call, "secret", "")
    with pytest.raises(PermissionDenied):
        await as_user.model_metadata(user_call, "secret", "")


async def test_before_the_router_told_the_models_requests_are_unavailable(tmp_path: Path) -> None:
    key = new_api_key()
    write_key_file(tmp_path / "keys.json", key, "acme", ["fraud"])
    router = Router()
    core = gateway(KeyStore.load(tmp_path / "keys.json"), router)
    router.repository = None
    with pytest.raises(Unavailable, match="does not know the mesh's models yet"):
        await core.infer(Call(Deadline.after(5), f"Bearer {key}"), x_request("early"))


async def test_the_table_of_coalescing_groups_is_bounded_and_makes_room_from_idle_groups() -> None:
    router = Router()
    calls = RouterCalls(router, max_inflight_batches=1, max_pending=64, enabled=True, max_message_bytes=1 << 20)
    calls.MAX_GROUPS = 2
    entry = entry_with_outputs(
        [{"name": "y", "datatype": "FP32", "shape": [-1]}, {"name": "z", "datatype": "FP32", "shape": [-1]}]
    )
    for outputs in (["y"], ["z"], ["y", "z"], ["z", "y"]):  # four groups over time
        request = InferRequest("m", "", x_request("r").inputs, id="r", outputs=outputs, encoded=b"r")
        assert (await calls.infer(entry, request, 1, Deadline.after(5))).data == b"answer to r"
        assert len(calls._coalescers) <= 2
    assert ("m", entry.config.max_batch_size, "", ("z", "y"), (("x", "FP32", (4,)),)) in calls._coalescers


async def test_a_sampled_access_log_line_says_who_what_and_how_it_went_and_nothing_secret(
    keys: tuple[KeyStore, str], caplog: pytest.LogCaptureFixture
) -> None:
    store, key = keys
    core = gateway(store, Router())
    core.access_log_rate = 1.0
    with caplog.at_level(logging.INFO, logger="infermesh.access"):
        await core.infer(Call(Deadline.after(5), f"Bearer {key}"), x_request("r1"))
        with pytest.raises(Unauthenticated):
            await core.infer(Call(Deadline.after(5), "Bearer wrong"), x_request("r2"))
        with pytest.raises(PermissionDenied):
            await core.infer(
                Call(Deadline.after(5), f"Bearer {key}"), InferRequest("secret-model", "", Undecodable({}))
            )
    served, refused, denied = (record.fields for record in caplog.records)  # type: ignore[attr-defined]
    assert served["tenant"] == "acme" and served["model"] == "fraud" and served["version"] == "1"
    assert served["status"] == "OK" and served["infermesh_stale_rows"] == "0" and served["latency_ms"] >= 0
    assert refused["status"] == "UNAUTHENTICATED" and refused["tenant"] == "" and refused["version"] == ""
    assert denied["status"] == "PERMISSION_DENIED" and denied["model"] == ""  # a made-up name is not logged
    assert key not in caplog.text and "wrong" not in caplog.text


async def test_the_access_log_is_off_when_its_rate_is_zero(
    keys: tuple[KeyStore, str], caplog: pytest.LogCaptureFixture
) -> None:
    store, key = keys
    core = gateway(store, Router())
    core.access_log_rate = 0.0
    with caplog.at_level(logging.INFO, logger="infermesh.access"):
        await core.infer(Call(Deadline.after(5), f"Bearer {key}"), x_request("r1"))
    assert caplog.records == []
