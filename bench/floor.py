"""The transport floor: empty grpc.aio servers wired as the mesh is (client → edge → hub → leaf F, then hub →
leaf M), each its own process on uvloop like the services. No auth, validation, Redis or model: whatever the
mesh costs beyond these figures is its own work; these figures are what four Python gRPC hops cost here."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
from dataclasses import dataclass, field

import grpc

METHOD = "/infermesh.bench.Floor/Call"
REPLY = bytes(64)  # about the size of a one-row `fraud` answer


def _serve(downstream: list[str], ports: multiprocessing.Queue, stop: multiprocessing.synchronize.Event) -> None:
    import asyncio

    import uvloop

    async def main() -> None:
        server = grpc.aio.server()
        channels = [grpc.aio.insecure_channel(target) for target in downstream]
        calls = [channel.unary_unary(METHOD) for channel in channels]

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            reply = REPLY
            for downstream_call in calls:  # in sequence, as the router reads features, then calls the model
                reply = await downstream_call(request)
            return reply

        handler = grpc.unary_unary_rpc_method_handler(call)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("infermesh.bench.Floor", {"Call": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await asyncio.to_thread(stop.wait)
        await server.stop(0)

    uvloop.run(main())


@dataclass
class FloorMesh:
    """Four empty servers: edge (gateway), hub (router), two leaves (feature service, model service)."""

    processes: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]] = field(
        default_factory=list
    )
    edge: str = ""
    leaf: str = ""

    def start(self) -> FloorMesh:
        context = multiprocessing.get_context("spawn")

        def launch(downstream: list[str]) -> str:
            ports, stop = context.Queue(), context.Event()
            process = context.Process(target=_serve, args=(downstream, ports, stop), daemon=True)
            process.start()
            self.processes.append((process, stop))
            return f"127.0.0.1:{ports.get(timeout=60)}"

        self.leaf = launch([])
        other_leaf = launch([])
        hub = launch([self.leaf, other_leaf])
        self.edge = launch([hub])
        return self

    def stop(self) -> None:
        # Callers first (edge, hub, then leaves), so no server sees its downstream go away mid-call.
        for process, stop in reversed(self.processes):
            stop.set()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
