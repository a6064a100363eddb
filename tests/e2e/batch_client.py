"""`python -m tests.e2e.batch_client ROUTER_ADDRESS`: sends a few InferBatch calls to a router and prints what
came back as JSON. A separate process because tritonclient (in the test process) and the mesh's own
`inference` protobuf modules cannot be imported together."""

from __future__ import annotations

import json
import struct
import sys

import grpc
import numpy as np

from infermesh.proto import router_pb2, router_pb2_grpc


def _bytes(*items: str) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item.encode() for item in items)


def batch(users: list[str], amounts: list[float], rows: list[int], short: bool = False) -> router_pb2.InferBatchRequest:
    request = router_pb2.InferBatchRequest(model_name="fraud")
    count = len(users)
    request.inputs.add(name="user_id", datatype="BYTES", shape=[count])
    request.inputs.add(name="merchant_id", datatype="BYTES", shape=[count])
    request.inputs.add(name="amount", datatype="FP32", shape=[count])
    amount = np.array(amounts, dtype="<f4").tobytes()
    request.raw_input_contents.extend([_bytes(*users), _bytes(*["m1"] * count), amount[:4] if short else amount])
    for index, row_count in enumerate(rows):
        request.segments.add(rows=row_count, id=f"s{index}")
    return request


def main(address: str) -> None:
    cases = {
        "good": batch(["u1", "u2"], [1.0, 2.0], [1, 1]),
        "rows do not add up": batch(["u1", "u2"], [1.0, 2.0], [1, 2]),
        "no segments": batch(["u1", "u2"], [1.0, 2.0], []),
        "zero rows": batch(["u1", "u2"], [1.0, 2.0], [0, 2]),
        "short raw input": batch(["u1", "u2"], [1.0, 2.0], [1, 1], short=True),
        "one bad segment": batch(["u1", "u2"], [float("nan"), 2.0], [1, 1]),
    }
    answers: dict[str, object] = {}
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for name, request in cases.items():
            try:
                response = stub.InferBatch(request, timeout=10)
            except grpc.RpcError as error:
                answers[name] = {"code": error.code().name, "details": error.details()}
            else:
                rows = response.outputs[0].shape[0] if response.outputs else 0
                answers[name] = {"code": "OK", "segments": [s.code for s in response.segments], "rows": rows}
    print(json.dumps(answers))


if __name__ == "__main__":
    main(sys.argv[1])
