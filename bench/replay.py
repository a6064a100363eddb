"""`make replay` (`python -m bench.replay`): the demo's labelled synthetic transactions through the gateway, then
their labels through label feedback, so the online accuracy of `fraud` (M4) shows a real curve.

By default it starts a local mesh of its own with the prediction log on and `fraud` logging every prediction
(monitoring.log_sample_rate 1); `--gateway ADDR --api-key KEY` replays into a running mesh instead (its `fraud`
must log predictions: only logged ones can be labelled). It prints the gateway's online gauges next to the same
figures computed here from the scores it got back, which must agree.

`python -m bench.replay labels --gateway ADDR --api-key KEY --labels JSON` reports labels
([[request_id, label, event_time_ms], ...]) and prints the answer as JSON: the small client the end-to-end tests
run as a process of its own (tritonclient and the mesh's protobuf modules cannot share one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from infermesh.proto import feedback_pb2, inference_pb2

INFER = "/inference.GRPCInferenceService/ModelInfer"
REPORT_LABELS = "/infermesh.feedback.v1.Feedback/ReportLabels"
LABEL_BATCH = 500
THRESHOLD = 0.5
REPLAY_KEY = "im_replay-key-0123456789abcdef"  # only for the mesh the replay starts itself, on loopback


def _bytes(*items: str) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item.encode() for item in items)


def fraud_request(request_id: str, user: str, merchant: str, amount: float) -> bytes:
    request = inference_pb2.ModelInferRequest(model_name="fraud", id=request_id)
    for name, datatype in (("user_id", "BYTES"), ("merchant_id", "BYTES"), ("amount", "FP32")):
        request.inputs.add(name=name, datatype=datatype, shape=[1])
    request.raw_input_contents.extend([_bytes(user), _bytes(merchant), np.float32(amount).tobytes()])
    return request.SerializeToString()


async def report_labels(
    channel: grpc.aio.Channel, api_key: str, labels: Sequence[tuple[str, float, int]]
) -> dict[str, Any]:
    """One ReportLabels call; its answer (or status) as a plain dict."""
    call = channel.unary_unary(
        REPORT_LABELS,
        request_serializer=feedback_pb2.ReportLabelsRequest.SerializeToString,
        response_deserializer=feedback_pb2.ReportLabelsResponse.FromString,
    )
    request = feedback_pb2.ReportLabelsRequest()
    for request_id, label, event_time_ms in labels:
        request.labels.add(request_id=request_id, label=label, event_time_ms=event_time_ms)
    try:
        response = await call(request, metadata=(("authorization", f"Bearer {api_key}"),), timeout=10)
    except grpc.aio.AioRpcError as error:
        return {"code": error.code().name, "details": error.details()}
    results = [{"code": r.code, "message": r.message, "model": r.model, "version": r.version} for r in response.results]
    return {"code": "OK", "joined": response.joined, "results": results}


async def replay(gateway: str, api_key: str, transactions: int, seed: int, concurrency: int = 16) -> dict[str, Any]:
    """Send `transactions` labelled transactions, then their labels; the figures computed from what came back."""
    from demo.synthetic import make_world, merchant_id, sample_transactions, user_id

    sample = sample_transactions(make_world(), transactions, seed=seed)
    scores = np.full(transactions, np.nan)
    sent_ms = np.zeros(transactions, dtype=np.int64)
    async with grpc.aio.insecure_channel(gateway) as channel:
        infer = channel.unary_unary(INFER, response_deserializer=inference_pb2.ModelInferResponse.FromString)
        metadata = (("authorization", f"Bearer {api_key}"),)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(transactions):
            queue.put_nowait(index)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                encoded = fraud_request(
                    f"replay-{seed}-{i}",
                    user_id(int(sample.user_index[i])),
                    merchant_id(int(sample.merchant_index[i])),
                    float(sample.amount[i]),
                )
                sent_ms[i] = int(time.time() * 1000)
                response = await infer(encoded, metadata=metadata, timeout=10)
                scores[i] = float(np.frombuffer(response.raw_output_contents[0], dtype="<f4")[0])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        # Labels arrive later than predictions: a simulated delay per transaction (minutes to days).
        rng = np.random.default_rng(seed)
        delays_ms = (np.exp(rng.normal(np.log(3600), 1.5, transactions)) * 1000).astype(np.int64)
        labels = [
            (f"replay-{seed}-{i}", float(sample.label[i]), int(sent_ms[i] + delays_ms[i])) for i in range(transactions)
        ]
        joined, missing = await _report_all(channel, api_key, labels)
    predicted = scores >= THRESHOLD
    truth = sample.label >= 0.5
    return {
        "transactions": transactions,
        "labels_joined": joined,
        "labels_not_found": missing,
        "expected": {
            "accuracy": round(float((predicted == truth).mean()), 4),
            "brier_score": round(float(((scores - truth) ** 2).mean()), 4),
            "fraud_rate": round(float(truth.mean()), 4),
        },
    }


async def _report_all(channel: grpc.aio.Channel, api_key: str, labels: list[tuple[str, float, int]]) -> tuple[int, int]:
    """Every label in batches; ids the log has not written yet are sent again for a few seconds."""
    joined, pending = 0, labels
    deadline = time.monotonic() + 10
    while pending:
        retry: list[tuple[str, float, int]] = []
        for start in range(0, len(pending), LABEL_BATCH):
            batch = pending[start : start + LABEL_BATCH]
            answer = await report_labels(channel, api_key, batch)
            if answer["code"] == "NOT_FOUND":
                retry.extend(batch)
                continue
            if answer["code"] != "OK":
                raise SystemExit(f"feedback refused: {answer['code']}: {answer['details']}")
            joined += answer["joined"]
            retry.extend(label for label, result in zip(batch, answer["results"], strict=True) if result["code"] == 5)
        if not retry or time.monotonic() > deadline:
            return joined, len(retry)
        pending = retry
        await asyncio.sleep(0.2)
    return joined, 0


def online_gauges(metrics_port: int) -> dict[str, float]:
    """The gateway's online gauges of fraud (any version), from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("infermesh_online_accuracy", "infermesh_online_brier_score", "infermesh_online_auc"):
            if line.startswith(name + "{") and 'model="fraud"' in line:
                found[line.split("{", 1)[0] + "{" + line.split("{", 1)[1].split("}")[0] + "}"] = float(line.split()[-1])
        if line.startswith("infermesh_online_labels{") and 'model="fraud"' in line:
            found["infermesh_online_labels"] = found.get("infermesh_online_labels", 0.0) + float(line.split()[-1])
    return found


def _own_mesh(demo_dir: Path, run_dir: Path) -> Any:
    from demo.mesh import ApiKey, LocalMesh, MeshOptions

    repository = run_dir / "model_repository"
    shutil.copytree(demo_dir / "model_repository", repository, dirs_exist_ok=True)
    config_path = repository / "fraud" / "config.json"
    config = json.loads(config_path.read_text())
    config["monitoring"] = {"log_sample_rate": 1.0, "threshold": THRESHOLD}
    config_path.write_text(json.dumps(config))
    options = MeshOptions(
        demo_dir=demo_dir,
        run_dir=run_dir,
        api_keys=[ApiKey(REPLAY_KEY, "replay", ["fraud"])],
        replicas=1,
        model_repository=repository,
        prediction_log=True,
        gateway={"online_min_labels": 1},
    )
    return LocalMesh(options).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("replay", "labels"), default="replay")
    parser.add_argument("--gateway", help="a running gateway (host:port); default: start a local mesh")
    parser.add_argument("--api-key", default=REPLAY_KEY)
    parser.add_argument("--metrics-port", type=int, help="the running gateway's metrics port (to print its gauges)")
    parser.add_argument("--demo-dir", type=Path, default=Path(".run/demo"))
    parser.add_argument("--transactions", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--labels", help="labels mode: JSON [[request_id, label, event_time_ms], ...]")
    args = parser.parse_args(argv)
    if args.mode == "labels":
        if not args.gateway or args.labels is None:
            parser.error("labels needs --gateway and --labels")

        async def send() -> dict[str, Any]:
            async with grpc.aio.insecure_channel(args.gateway) as channel:
                return await report_labels(channel, args.api_key, [tuple(label) for label in json.loads(args.labels)])

        print(json.dumps(asyncio.run(send())))
        return 0
    if args.gateway:
        summary = asyncio.run(replay(args.gateway, args.api_key, args.transactions, args.seed))
        if args.metrics_port:
            summary["gateway"] = online_gauges(args.metrics_port)
        print(json.dumps(summary, indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="infermesh-replay-") as folder:
        mesh = _own_mesh(args.demo_dir, Path(folder))
        try:
            print(f"mesh up: gateway {mesh.gateway_address}, metrics :{mesh.gateway.metrics_port}", file=sys.stderr)
            summary = asyncio.run(replay(mesh.gateway_address, args.api_key, args.transactions, args.seed))
            summary["gateway"] = online_gauges(mesh.gateway.metrics_port)
            print(json.dumps(summary, indent=2))
        finally:
            mesh.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
