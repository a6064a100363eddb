"""The transport floor: empty grpc.aio servers wired as the mesh is (client → edge → hub → leaf F, then hub →
leaf M), each its own process on uvloop like the services. No auth, validation, Redis or model: whatever the
mesh costs beyond these figures is its own work; these figures are what four Python gRPC hops cost here.

Both ways the mesh can make its internal calls: one unary call each, or messages on hop streams
(infermesh.hop_streams, `streams` per peer). The client's own hop to the edge is a unary call either way, as a
client's call to the gateway is."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
from dataclasses import dataclass, field

import grpc

METHOD = "/infermesh.bench.Floor/Call"
REPLY = bytes(64)  # about the size of a one-row `fraud` answer


def _serve(
    downstream: list[str], streams: int, ports: multiprocessing.Queue, stop: multiprocessing.synchronize.Event
) -> None:
    import asyncio

    import uvloop

    from infermesh.channels import HopChannel
    from infermesh.hop_streams import HopStreamEndpoint

    async def main() -> None:
        server = grpc.aio.server()
        hops = [HopChannel(target, streams=streams) for target in downstream]
        calls = [hop.internal(METHOD) for hop in hops]

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            reply = REPLY
            for downstream_call in calls:  # in sequence, as the router reads features, then calls the model
                reply = await downstream_call(request)
            return reply

        handler = grpc.unary_unary_rpc_method_handler(call)
        endpoint = HopStreamEndpoint({METHOD: handler}.get, 256)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("infermesh.bench.Floor", {"Call": handler}),
                endpoint.generic_handler(),
            )
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
    streams: int = 0  # hop streams per peer for the internal hops; 0: unary calls

    def start(self) -> FloorMesh:
        context = multiprocessing.get_context("spawn")

        def launch(downstream: list[str]) -> str:
            ports, stop = context.Queue(), context.Event()
            process = context.Process(target=_serve, args=(downstream, self.streams, ports, stop), daemon=True)
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
