"""The gateway's HTTP/REST front: the Open Inference Protocol's REST form (KServe v2, Triton's HTTP API) on its
own port, serving the same core as the gRPC port (gateway.core). Thin like a servicer: HTTP ↔ domain types
(gateway.rest_codec), and the one place domain errors become HTTP statuses, answered as `{"error": "..."}`.

Everything a request's head decides is checked before its body is read (`_check_head`: the credentials, the
model in the path, sizes, encoding, the bytes held at once), and answers `Expect: 100-continue` too, so a
refused body need not even be sent; compressed bodies are refused, never inflated. The front runs its own
listener on aiohttp's protocol factory to bound connections and the wait for a first request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiohttp import HttpVersion11, web
from aiohttp.web_protocol import RequestHandler

from gateway import rest_codec
from gateway.rest_codec import TooLarge
from infermesh import errors, metrics, telemetry
from infermesh.dataplane import Call, EncodedInferResponse, InferAnswer, InferResponse
from infermesh.deadline import Deadline
from infermesh.model_config import ModelConfig
from infermesh.repository import REPOSITORY_TIMEOUT_S, load_config_of
from infermesh.statistics import ModelStatistics
from infermesh.tls import ServerTls

log = logging.getLogger(__name__)

HTTP_STATUS: dict[errors.Code, int] = {
    errors.Code.INVALID_ARGUMENT: 400,
    errors.Code.FAILED_PRECONDITION: 400,
    errors.Code.OUT_OF_RANGE: 400,
    errors.Code.UNAUTHENTICATED: 401,
    errors.Code.PERMISSION_DENIED: 403,
    errors.Code.NOT_FOUND: 404,
    errors.Code.ALREADY_EXISTS: 409,
    errors.Code.RESOURCE_EXHAUSTED: 429,
    errors.Code.CANCELLED: 499,
    errors.Code.UNIMPLEMENTED: 501,
    errors.Code.UNAVAILABLE: 503,
    errors.Code.DEADLINE_EXCEEDED: 504,
}
# Triton answers health and readiness as status codes: 200 for true, 400 for false (KServe v2: "a 4xx status").
NOT_READY = 400
SERVICE = "gateway"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_body_bytes: int
    max_json_bytes: int
    max_body_bytes_in_flight: int  # request bodies held at once (more: 429 at once)
    max_connections: int = 1024
    first_request_timeout_s: float = 10.0  # a connection silent this long (at most twice) is closed
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this


class _Refused(asyncio.Protocol):
    """A connection over the limit: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]  # every stream transport has abort()


async def _close_silent_connections(server: web.Server, interval_s: float) -> None:
    """Close connections that have not sent one whole request head in [interval, 2 x interval] (aiohttp times
    only the idle wait between requests): an opened and never used connection holds a slot for no longer."""
    silent: set[RequestHandler] = set()
    while True:
        await asyncio.sleep(interval_s)
        # A private counter of aiohttp's; should it go, nothing is closed (and the test of this fails).
        now_silent = {handler for handler in server.connections if getattr(handler, "_request_count", 1) == 0}
        for handler in now_silent & silent:
            handler.force_close()
        silent = now_silent - silent


class WireForms(Protocol):
    """What the front needs of the protocol's protobuf forms (infermesh.oip, passed in as a module)."""

    def decoded_response(self, encoded: bytes) -> InferResponse:
        """A hop's answer in wire form → the domain response."""
        ...

    def model_config_json(self, config: ModelConfig) -> dict[str, Any]: ...

    def model_statistics_json(self, entries: Iterable[ModelStatistics]) -> dict[str, Any]: ...


class RestFront:
    def __init__(
        self,
        core: Any,
        wire: WireForms,
        default_timeout_s: float,
        limits: HttpLimits,
    ) -> None:
        self.core = core  # the gateway's dataplane (GatewayCore)
        self.wire = wire  # the protocol's protobuf forms (infermesh.oip): no protobuf imported here
        self.default_timeout_s = default_timeout_s
        self.limits = limits
        self._counters = metrics.RequestCounters(SERVICE)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._body_bytes = 0  # bytes of request bodies read or being read, not yet answered
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes)
        get, post = web.get, web.post
        routes = [
            get("/v2/health/live", self._route("ServerLive", self.server_live)),
            get("/v2/health/ready", self._route("ServerReady", self.server_ready)),
            get("/v2", self._route("ServerMetadata", self.server_metadata)),
            # Triton's extensions: statistics of every model the caller may see, and the repository (admin).
            get("/v2/models/stats", self._route("ModelStatistics", self.model_statistics)),
            post("/v2/repository/index", self._route("RepositoryIndex", self.repository_index)),
            post("/v2/repository/models/{model}/load", self._route("RepositoryModelLoad", self.repository_load)),
            post("/v2/repository/models/{model}/unload", self._route("RepositoryModelUnload", self.repository_unload)),
        ]
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [
                get(prefix, self._route("ModelMetadata", self.model_metadata)),
                get(prefix + "/ready", self._route("ModelReady", self.model_ready)),
                get(prefix + "/config", self._route("ModelConfig", self.model_config)),
                get(prefix + "/stats", self._route("ModelStatistics", self.model_statistics)),
                post(
                    prefix + "/infer", self._route("ModelInfer", self.infer), expect_handler=self._continue_if_admitted
                ),
            ]
        app.add_routes(routes)
        app.middlewares.append(_json_http_errors)
        app.on_response_prepare.append(_without_server_header)
        return app

    async def start(self, host: str, port: int, tls: ServerTls | None, grace_s: float) -> int:
        limits = self.limits
        runner = web.AppRunner(
            self.app(),
            access_log=None,  # the gateway's own access log (sampled, no inputs) covers both ports
            shutdown_timeout=grace_s,
            auto_decompress=False,  # a small compressed body must not become a large one here
            max_field_size=8190,
            max_headers=128,
            keepalive_timeout=limits.keepalive_timeout_s,
        )
        await runner.setup()
        server = runner.server
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) >= limits.max_connections:
                return _Refused()
            return server()

        # Our own listener on aiohttp's protocol factory: aiohttp bounds neither connections nor the wait for a
        # first request.
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(connection, host, port, ssl=_ssl_context(tls), backlog=128)
        self._runner = runner
        self._sweeper = asyncio.create_task(_close_silent_connections(server, limits.first_request_timeout_s))
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """New connections are refused at once; requests in flight finish within the grace given at start."""
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Each route: counted and timed like a gRPC call (method labelled "HTTP <method>"), errors as JSON.

    def _route(
        self, method: str, behavior: Callable[[web.Request, Call], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        label = f"HTTP {method}"

        async def handle(request: web.Request) -> web.StreamResponse:
            labels = metrics.RequestLabels()
            metrics.request_labels.set(labels)
            started = time.perf_counter()
            code = "OK"
            self._counters.inflight.inc()
            try:
                call = self._new_call(request)
                with telemetry.server_span(label, request.headers):
                    return await behavior(request, call)
            except errors.DomainError as error:
                code = error.code.name
                return _error_response(error)
            except asyncio.CancelledError:  # the client went away, or the server is stopping
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("unhandled error in %s", label)
                return _json({"error": "internal error"}, status=500)
            finally:
                self._counters.inflight.dec()
                self._counters.record(label, labels.model, labels.version, code, time.perf_counter() - started)

        return handle

    def _new_call(self, request: web.Request) -> Call:
        return Call(Deadline.from_remaining(None, self.default_timeout_s), request.headers.get("Authorization"))

    async def server_live(self, request: web.Request, call: Call) -> web.StreamResponse:
        return _truth("live", await self.core.server_live(call))

    async def server_ready(self, request: web.Request, call: Call) -> web.StreamResponse:
        return _truth("ready", await self.core.server_ready(call))

    async def server_metadata(self, request: web.Request, call: Call) -> web.StreamResponse:
        return _json(rest_codec.server_metadata(await self.core.server_metadata(call)))

    async def model_metadata(self, request: web.Request, call: Call) -> web.StreamResponse:
        model, version = _model_of(request)
        info = await self.core.model_metadata(call, model, version)
        return _json(rest_codec.model_metadata(info))

    async def model_ready(self, request: web.Request, call: Call) -> web.StreamResponse:
        model, version = _model_of(request)
        return _truth("ready", await self.core.model_ready(call, model, version))

    async def model_config(self, request: web.Request, call: Call) -> web.StreamResponse:
        model, version = _model_of(request)
        config = await self.core.model_config(call, model, version)
        return _json(self.wire.model_config_json(config))

    async def model_statistics(self, request: web.Request, call: Call) -> web.StreamResponse:
        model, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        entries = await self.core.model_statistics(call, model, version)
        return _json(self.wire.model_statistics_json(entries))

    async def repository_index(self, request: web.Request, call: Call) -> web.StreamResponse:
        document = await self._small_json(request, call)
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise errors.InvalidInput("repository index: 'ready' must be a boolean")
        entries = await self.core.repository_index(call, ready)
        return _json(rest_codec.repository_index(entries))

    async def repository_load(self, request: web.Request, call: Call) -> web.StreamResponse:
        call = replace(call, deadline=Deadline.from_remaining(None, REPOSITORY_TIMEOUT_S))
        document = await self._small_json(request, call)
        parameters = rest_codec.parameters_of(document.get("parameters"), "load")
        await self.core.repository_load(call, request.match_info["model"], load_config_of(parameters))
        return web.Response(status=200)

    async def repository_unload(self, request: web.Request, call: Call) -> web.StreamResponse:
        call = replace(call, deadline=Deadline.from_remaining(None, REPOSITORY_TIMEOUT_S))
        await self._small_json(request, call)  # its parameters (unload_dependents) change nothing here
        await self.core.repository_unload(call, request.match_info["model"])
        return web.Response(status=200)

    async def _small_json(self, request: web.Request, call: Call) -> dict[str, Any]:
        """An administration call's JSON body (none: {}), read once the caller is known, within the JSON bound."""
        self.core.authenticate(call)
        length = request.content_length
        if length is not None and length > self.limits.max_json_bytes:
            raise TooLarge(rest_codec.json_limit_message(length, self.limits.max_json_bytes))
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.limits.max_json_bytes:  # sent without a Content-Length: read no further than the bound
                raise TooLarge(rest_codec.json_limit_message(size, self.limits.max_json_bytes))
            chunks.append(chunk)
        body = b"".join(chunks)
        return rest_codec.json_object(body) if body.strip() else {}

    async def _infer_body(
        self, request: web.Request, call: Call, model: str, version: str, header_length: str | None
    ) -> tuple[InferAnswer, rest_codec.OutputForm]:
        body = await self._body(request, call.deadline)
        infer_request, form = rest_codec.infer_request(model, version, body, header_length, self.limits.max_json_bytes)
        del body
        return await self.core.infer(call, infer_request), form

    async def _body(self, request: web.Request, deadline: Deadline) -> bytes | bytearray:
        """The request's body, read within the call's deadline: a body sent slower than that (or never) holds its
        connection and its share of the bytes in flight no longer."""
        try:
            async with asyncio.timeout(deadline.remaining()):
                return await self._read_body(request)
        except TimeoutError:
            raise errors.DeadlineExceeded("the request body did not arrive within the deadline") from None

    async def _read_body(self, request: web.Request) -> bytes | bytearray:
        length = request.content_length
        if length is None:  # chunked: aiohttp's reader, which stops past client_max_size
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise TooLarge(f"request body exceeds the {self.limits.max_body_bytes} bytes limit") from None
        # Its length known: each chunk copied once, into a buffer of that size (aiohttp's read() grows a buffer and
        # copies it again; readexactly() joins twice).
        body = bytearray(length)
        view, offset = memoryview(body), 0
        while offset < length:
            chunk = await request.content.readany()
            if not chunk:
                raise errors.InvalidInput(f"request body ended before its Content-Length of {length} bytes")
            view[offset : offset + len(chunk)] = chunk
            offset += len(chunk)
        return body

    def _check_head(self, request: web.Request, call: Call) -> Call:
        """Everything an `infer` request's head decides, before a byte of its body is read: who asks, whether they
        may use the model in the path, and whether its body is one this front takes. The caller back, known."""
        call = self.core.authenticate(call)
        model, version = _model_of(request)
        self.core.authorized_model(call, model, version)
        length = request.content_length
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":  # inflating is work (and size) the sender controls: not taken
            raise errors.InvalidInput(f"compressed request bodies (Content-Encoding {encoding[:32]}) are not accepted")
        if length is not None and length > self.limits.max_body_bytes:
            raise TooLarge(f"request body of {length} bytes exceeds the {self.limits.max_body_bytes} bytes limit")
        if (
            length is not None
            and rest_codec.HEADER_LENGTH not in request.headers
            and length > self.limits.max_json_bytes
        ):
            raise TooLarge(rest_codec.json_limit_message(length, self.limits.max_json_bytes))
        if self._body_bytes + self._reserved(request) > self.limits.max_body_bytes_in_flight:
            raise errors.Overloaded("the gateway holds too many request bytes now; retry shortly", retry_after_s=1.0)
        return call

    def _reserved(self, request: web.Request) -> int:
        """What a body counts against the bytes held at once: its length, the largest when it has none."""
        length = request.content_length
        return length if length is not None else self.limits.max_body_bytes

    async def _continue_if_admitted(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue` (curl's habit for bodies over 1 MiB): the body is asked for only once its head
        passed, so a refused body is never even sent. A refusal here is answered and counted as the route's."""
        if request.version != HttpVersion11:
            return None
        expect = request.headers.get("Expect", "").lower()
        if expect != "100-continue":
            return _json({"error": f"unknown Expect: {expect[:32]}"}, status=417)
        started = time.perf_counter()
        try:
            self._check_head(request, self._new_call(request))
        except errors.DomainError as error:
            self._counters.record("HTTP ModelInfer", "", "", error.code.name, time.perf_counter() - started)
            return _error_response(error)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the answer's size starts after this line
        return None

    async def infer(self, request: web.Request, call: Call) -> web.StreamResponse:
        call = self._check_head(request, call)
        model, version = _model_of(request)
        header_length = request.headers.get(rest_codec.HEADER_LENGTH)
        reserved = self._reserved(request)  # checked against the bound with the head; held until answered
        self._body_bytes += reserved
        try:
            answer, form = await self._infer_body(request, call, model, version, header_length)
        finally:
            self._body_bytes -= reserved
        response = self.wire.decoded_response(answer.data) if isinstance(answer, EncodedInferResponse) else answer
        content, json_length = rest_codec.infer_response(response, form)
        if json_length is None:
            return web.Response(body=content, content_type="application/json")
        return web.Response(
            body=content,
            content_type="application/octet-stream",
            headers={rest_codec.HEADER_LENGTH: str(json_length)},
        )


def _model_of(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _json(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly `application/json` (no charset parameter): KServe's REST client reads error bodies only then.
    return web.Response(
        body=json.dumps(document).encode(), status=status, headers=headers, content_type="application/json"
    )


def _truth(name: str, value: bool) -> web.StreamResponse:
    """Triton reads the status (200 true, 400 false), KServe's REST client the body ({"ready": true})."""
    return _json({name: value}, status=200 if value else NOT_READY)


def _error_response(error: errors.DomainError) -> web.Response:
    headers = {}
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:  # HTTP's retry hint: whole seconds, at least one
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    status = 413 if isinstance(error, TooLarge) else HTTP_STATUS.get(error.code, 500)
    return _json({"error": errors.client_message(error)}, status=status, headers=headers)


@web.middleware
async def _json_http_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, wrong method) in the protocol's error form too."""
    try:
        return await handler(request)
    except web.HTTPException as exception:
        if exception.status < 400:
            raise
        return _json({"error": exception.reason}, status=exception.status)


async def _without_server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.pop("Server", None)  # no library and version for a scanner to match


def _ssl_context(tls: ServerTls | None) -> ssl.SSLContext | None:
    """The gRPC port's certificate on the HTTP port too (read at start), with client certificates required when
    the gateway requires them."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file is not None and tls.require_client_cert:
        context.load_verify_locations(tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
