"""The HTTP/REST front in-process, on a stub core: its own bounds (connections, silent connections, the JSON
part), the mapping of domain errors to HTTP statuses, and draining. (tests/e2e/test_rest.py runs it on a real
mesh.)"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import numpy as np
import pytest

from gateway import rest_codec
from gateway.rest import HttpLimits, RestFront
from infermesh import errors
from infermesh.dataplane import Call, InferRequest, InferResponse, ServerInfo
from infermesh.tensors import Tensor


class StubCore:
    """Answers `infer` with the first input doubled, or raises what a test sets."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.release = asyncio.Event()
        self.release.set()

    def authenticate(self, call: Call) -> Call:
        if call.authorization != "Bearer good":
            raise errors.Unauthenticated("missing or unknown credentials")
        return call

    def authorized_model(self, call: Call, name: str, version: str = "") -> None:
        if name != "m":
            raise errors.PermissionDenied(f"tenant may not use model '{name}'")

    async def server_live(self, call: Call) -> bool:
        return True

    async def server_ready(self, call: Call) -> bool:
        return True

    async def server_metadata(self, call: Call) -> ServerInfo:
        return ServerInfo("stub", "0", ())

    async def infer(self, call: Call, request: InferRequest) -> InferResponse:
        await self.release.wait()
        if self.error is not None:
            raise self.error
        (tensor,) = request.inputs.tensors().values()
        return InferResponse("m", "1", [Tensor("y", tensor.datatype, tensor.shape, tensor.data * 2)])


LIMITS = HttpLimits(
    max_body_bytes=64 * 1024,
    max_json_bytes=4096,
    max_connections=4,
    first_request_timeout_s=0.2,
    max_body_bytes_in_flight=130_000,
)


@pytest.fixture
async def front() -> AsyncIterator[tuple[RestFront, StubCore]]:
    core = StubCore()
    wire = SimpleNamespace(decoded_response=lambda data: pytest.fail("only domain answers here"))
    rest = RestFront(core, wire, 5.0, LIMITS)  # type: ignore[arg-type]  # the one form infer needs
    await rest.start("127.0.0.1", 0, None, grace_s=5.0)
    yield rest, core
    await rest.stop()


def infer_body(values: list[float]) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(values)], "data": values}]}


async def post(rest: RestFront, document: Any, **headers: str) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{rest.port}/v2/models/m/infer",
            json=document,
            headers={"Authorization": "Bearer good", **headers},
        ) as reply,
    ):
        return reply.status, await reply.json(), reply.headers


async def test_inference_round_trip(front: tuple[RestFront, StubCore]) -> None:
    rest, _ = front
    status, document, _ = await post(rest, infer_body([1.0, 2.5]))
    assert status == 200
    assert document["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2], "data": [2.0, 5.0]}]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.InvalidInput("input 'x': bad"), 400),
        (errors.NotFound("unknown model"), 404),
        (errors.Unavailable("no replica"), 503),
        (errors.DeadlineExceeded("deadline passed"), 504),
        (errors.FailedPrecondition("version failed to load"), 400),
    ],
)
async def test_domain_errors_become_http_statuses(
    front: tuple[RestFront, StubCore], error: errors.DomainError, status: int
) -> None:
    rest, core = front
    core.error = error
    answered, document, _ = await post(rest, infer_body([1.0]))
    assert (answered, document) == (status, {"error": str(error)})


async def test_a_refusal_with_a_retry_hint_says_when_in_retry_after(front: tuple[RestFront, StubCore]) -> None:
    rest, core = front
    core.error = errors.Overloaded("tenant 'flood' is over its rate", retry_after_s=2.2)
    status, _, headers = await post(rest, infer_body([1.0]))
    assert status == 429 and headers["Retry-After"] == "3"


async def test_an_unexpected_error_is_500_without_its_text(front: tuple[RestFront, StubCore]) -> None:
    rest, core = front
    core.error = RuntimeError("secret internal detail")
    status, document, _ = await post(rest, infer_body([1.0]))
    assert (status, document) == (500, {"error": "internal error"})


async def test_a_json_part_over_its_limit_is_413_before_it_is_parsed(front: tuple[RestFront, StubCore]) -> None:
    rest, _ = front
    status, document, _ = await post(rest, infer_body([1.0] * 2000))
    assert status == 413 and "binary data" in document["error"]
    status, document, _ = await post(rest, "x" * 70_000)  # over the body limit
    assert status == 413 and "65536 bytes limit" in document["error"]


async def test_a_chunked_body_is_read_up_to_the_limit(front: tuple[RestFront, StubCore]) -> None:
    """Without a Content-Length (chunked transfer) the body is read as it comes, and no further than the limit."""
    rest, _ = front

    async def chunks(data: bytes) -> Any:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{rest.port}/v2/models/m/infer"
        headers = {"Authorization": "Bearer good"}
        async with session.post(url, data=chunks(json.dumps(infer_body([3.0])).encode()), headers=headers) as reply:
            assert reply.status == 200 and (await reply.json())["outputs"][0]["data"] == [6.0]
        head = json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}
        ).encode()
        oversized = head + bytes(LIMITS.max_body_bytes)
        headers[rest_codec.HEADER_LENGTH] = str(len(head))
        async with session.post(url, data=chunks(oversized), headers=headers) as reply:
            assert reply.status == 413


@pytest.mark.parametrize(("authorization", "first_line"), [("Bearer bad", b"401"), ("Bearer good", b"100 Continue")])
async def test_expect_100_continue_asks_for_the_body_only_once_its_head_passed(
    front: tuple[RestFront, StubCore], authorization: str, first_line: bytes
) -> None:
    """curl sends `Expect: 100-continue` before a large body: a refused one is never sent at all."""
    rest, _ = front
    body = json.dumps(infer_body([2.0])).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", rest.port)
    writer.write(
        f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    status = await asyncio.wait_for(reader.readline(), timeout=5)  # answered with no byte of the body sent
    assert first_line in status
    if first_line.startswith(b"100"):
        await reader.readline()  # the blank line after 100 Continue
        writer.write(body)
        assert b"200" in await asyncio.wait_for(reader.readline(), timeout=5)
    writer.close()


async def test_a_compressed_body_is_refused_not_inflated(front: tuple[RestFront, StubCore]) -> None:
    rest, _ = front
    status, document, _ = await post(rest, infer_body([1.0]), **{"Content-Encoding": "gzip"})
    assert status == 400 and "Content-Encoding gzip" in document["error"]


async def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def open_connections(rest: RestFront) -> int:
    assert rest._runner is not None and rest._runner.server is not None
    return len(rest._runner.server.connections)


async def test_connections_past_the_limit_are_closed_at_once(front: tuple[RestFront, StubCore]) -> None:
    rest, _ = front
    held = [await asyncio.open_connection("127.0.0.1", rest.port) for _ in range(LIMITS.max_connections)]
    await wait_for(lambda: open_connections(rest) == LIMITS.max_connections)
    reader, writer = await asyncio.open_connection("127.0.0.1", rest.port)
    writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed, unanswered
    for _, held_writer in held:
        held_writer.close()
    await wait_for(lambda: open_connections(rest) == 0)
    status, _, _ = await post(rest, infer_body([1.0]))  # room again
    assert status == 200


async def test_a_connection_that_sends_no_whole_request_is_closed(front: tuple[RestFront, StubCore]) -> None:
    rest, _ = front
    reader, writer = await asyncio.open_connection("127.0.0.1", rest.port)
    writer.write(b"GET /v2/health/live HT")  # a request head that never ends
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    assert time.monotonic() - started >= LIMITS.first_request_timeout_s
    writer.close()


async def test_stop_lets_requests_in_flight_finish_and_refuses_new_connections(
    front: tuple[RestFront, StubCore],
) -> None:
    rest, core = front
    core.release.clear()
    in_flight = asyncio.create_task(post(rest, infer_body([4.0])))
    await wait_for(lambda: open_connections(rest) == 1)
    port = rest.port
    stopping = asyncio.create_task(rest.stop())
    await asyncio.sleep(0)  # the listener closes first
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    core.release.set()
    status, document, _ = await in_flight
    await stopping
    assert status == 200 and np.allclose(document["outputs"][0]["data"], [8.0])


async def test_the_bodies_held_at_once_are_bounded_in_bytes(front: tuple[RestFront, StubCore]) -> None:
    """Two 60 kB requests wait in the core; a third is refused at once (429, retry hint) until one is answered."""
    rest, core = front
    head = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [15_000], "parameters": {"binary_data_size": 60_000}}]}
    ).encode()
    payload = head + np.ones(15_000, dtype="<f4").tobytes()

    async def send(session: aiohttp.ClientSession) -> tuple[int, str | None]:
        async with session.post(
            f"http://127.0.0.1:{rest.port}/v2/models/m/infer",
            data=payload,
            headers={"Authorization": "Bearer good", "Inference-Header-Content-Length": str(len(head))},
        ) as reply:
            await reply.read()
            return reply.status, reply.headers.get("Retry-After")

    core.release.clear()
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(send(session)) for _ in range(2)]
        await wait_for(lambda: rest._body_bytes == 2 * len(payload))
        assert await send(session) == (429, "1")
        core.release.set()
        assert [status for status, _ in await asyncio.gather(*held)] == [200, 200]
        assert (await send(session))[0] == 200
    assert rest._body_bytes == 0


async def test_a_body_that_does_not_arrive_within_the_deadline_is_refused_and_let_go() -> None:
    """A client sending its body slower than the call's deadline (here 0.3 s, the front's default) gets 504 and
    holds the bytes it claimed no longer; without the bound it would hold them for as long as it trickles."""
    rest = RestFront(StubCore(), SimpleNamespace(), 0.3, LIMITS)  # type: ignore[arg-type]
    await rest.start("127.0.0.1", 0, None, grace_s=1.0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", rest.port)
        writer.write(
            b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"inputs": ['
        )
        status = await asyncio.wait_for(reader.readline(), timeout=5)
        assert b" 504 " in status
        await wait_for(lambda: rest._body_bytes == 0)
        writer.close()
        status_code, _, _ = await post(rest, infer_body([1.0]))
        assert status_code == 200
    finally:
        await rest.stop()
