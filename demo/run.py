"""`make run`: the whole mesh on this machine until Ctrl-C.

Uses the Redis at $REDIS_URL when set (one primary, any node of a Redis Cluster, or redis+sentinel://...), else
starts a private redis-server with its data under .run/ ($REDIS_CLUSTER_SHARDS=3: a private three-master Redis
Cluster instead).
The demo API key (tenant 'demo': scores with `fraud` and `bench_mlp`) comes from $INFERMESH_DEMO_API_KEY, the
admin key (tenant 'ops', role admin: may also list, load, unload and inspect the models with the `infermesh` CLI
or tritonclient) from $INFERMESH_DEMO_ADMIN_KEY; either is generated when unset, and both are printed.
The private Redis requires a generated password (in <run-dir>/redis/password, 0600); feature writes through the
feature service's API need the generated write token (<run-dir>/feature_write_token, 0600). With --tls-dir (`TLS=1 make
run`) every hop is TLS with the development certificates there, made when missing (`make certs`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
from pathlib import Path

from demo.mesh import ApiKey, LocalMesh, MeshOptions
from demo.redis_server import RedisServer
from demo.supervisor import Supervisor
from gateway.auth import new_api_key

DEFAULT_HTTP_PORT = 8000  # Triton's HTTP port


def _free_or_any(port: int) -> int:
    """`port` when nothing on this machine holds it, else 0 (a free one): the HTTP/REST front is a convenience of
    `make run`, which must not fail because another local server (a Triton, a dev server) has 8000."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no holder
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            print(f"port {port} is taken: the HTTP/REST front takes a free port instead", flush=True)
            return 0
    return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo-dir", type=Path, default=Path(".run/demo"))
    parser.add_argument("--run-dir", type=Path, default=Path(".run/mesh"))
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GATEWAY_PORT", "8001")), help="gateway port; 0: a free one"
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="gateway HTTP/REST port; 0: a free one; -1: gRPC only (default $GATEWAY_HTTP_PORT, else Triton's 8000, "
        "or a free port when something else holds 8000)",
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--tls-dir", type=Path, default=None, help="TLS on every hop with the certificates here (made if missing)"
    )
    args = parser.parse_args()
    if args.http_port is None:
        chosen = os.environ.get("GATEWAY_HTTP_PORT")
        args.http_port = int(chosen) if chosen else _free_or_any(DEFAULT_HTTP_PORT)

    api_key = os.environ.get("INFERMESH_DEMO_API_KEY") or new_api_key()
    admin_key = os.environ.get("INFERMESH_DEMO_ADMIN_KEY") or new_api_key()
    redis_url = os.environ.get("REDIS_URL") or None
    cluster_shards = int(os.environ.get("REDIS_CLUSTER_SHARDS") or 0)
    # The prediction log (and label feedback on it) goes to the private single Redis, with its password (and TLS).
    prediction_log = redis_url is None and cluster_shards == 0
    if not prediction_log:
        print(
            "prediction log and label feedback off: they run on make run's private single Redis "
            f"(not with {'$REDIS_URL' if redis_url else 'a Redis Cluster'})",
            flush=True,
        )
    options = MeshOptions(
        demo_dir=args.demo_dir,
        run_dir=args.run_dir,
        api_keys=[ApiKey(api_key, "demo", ["fraud", "bench_mlp"]), ApiKey(admin_key, "ops", ["*"], role="admin")],
        gateway_port=args.port,
        gateway={"http_port": args.http_port},
        replicas=args.replicas,
        redis_url=redis_url,
        redis_cluster_shards=cluster_shards,
        persist_redis=True,
        tls_dir=args.tls_dir,
        prediction_log=prediction_log,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print("starting redis, feature service, 2 model replicas, router and gateway…", flush=True)
    with LocalMesh(options) as mesh:
        endpoint = mesh.gateway_address
        features_url = mesh.feature_service_address()
        if isinstance(mesh.redis, RedisServer):
            redis = f"{mesh.redis.url} (password in {mesh.redis.password_file})"
        elif mesh.redis is not None:  # a private Redis Cluster: no password, any node's URL
            redis = f"Redis Cluster of {len(mesh.redis.nodes)} shards at {mesh.redis.url}"
        else:
            redis = "$REDIS_URL"
        if mesh.ca_file is None:
            transport, score_tls, grpcurl_tls, features_tls = "plaintext", "", "-plaintext", ""
        else:
            transport = f"TLS (CA {mesh.ca_file}; mutual TLS between the services)"
            score_tls = f" --ca {mesh.ca_file}"
            # The feature service admits only mesh certificates: the CLI presents make certs' `client` one.
            client = mesh.ca_file.parent / "client"
            features_tls = f" \\\n    --ca {mesh.ca_file} --cert {client}.pem --key {client}.key"
            grpcurl_tls = f"-cacert {mesh.ca_file}"
        tritonclient_tls = f', ssl=True,\n    root_certificates="{mesh.ca_file}"' if mesh.ca_file is not None else ""
        http = ""
        if mesh.gateway is not None and mesh.gateway.http_port > 0:
            scheme, curl_tls = ("http", "") if mesh.ca_file is None else ("https", f" --cacert {mesh.ca_file}")
            http_url = f"{scheme}://127.0.0.1:{mesh.gateway.http_port}"
            http = f"""
The same API over HTTP/REST (KServe v2 REST, Triton's HTTP API) on {http_url}:
  curl{curl_tls} -H 'authorization: Bearer {api_key}' {http_url}/v2/models/fraud/infer \\
    -d '{{"inputs":[{{"name":"user_id","datatype":"BYTES","shape":[1],"data":["u42"]}},
    {{"name":"merchant_id","datatype":"BYTES","shape":[1],"data":["m7"]}},
    {{"name":"amount","datatype":"FP32","shape":[1],"data":[129.99]}}]}}'
"""
        if prediction_log:
            labels = f"""
Label feedback (`fraud` logs every prediction to the Redis stream infermesh:predictions; label a request by the
id it was sent with: infermesh.feedback.v1.Feedback/ReportLabels, protos/feedback.proto):
  grpcurl {grpcurl_tls} -H 'authorization: Bearer {api_key}' \\
    -d '{{"labels":[{{"request_id":"txn-0001","label":1}}]}}' {endpoint} infermesh.feedback.v1.Feedback/ReportLabels
"""
            if mesh.ca_file is None and mesh.gateway is not None:  # make replay's client speaks plaintext
                labels += (
                    '  make replay REPLAY_ARGS="--gateway '
                    f'{endpoint} --api-key {api_key} --metrics-port {mesh.gateway.metrics_port}"\n'
                )
        else:
            labels = ""
        print(
            f"""
infermesh is serving the Open Inference Protocol on {endpoint} ({transport})
  API key (tenant 'demo'): {api_key}
  admin key (tenant 'ops', manages models): {admin_key}
  logs: {args.run_dir}/*.log   redis: {redis}

Score a transaction (tritonclient):
  INFERMESH_API_KEY={api_key} .venv/bin/python -m examples.score --url {endpoint}{score_tls} \\
    --user u42 --merchant m7 --amount 129.99

With grpcurl (server reflection is on):
  grpcurl {grpcurl_tls} -H 'authorization: Bearer {api_key}' -d '{{"model_name":"fraud","inputs":[
    {{"name":"user_id","datatype":"BYTES","shape":[1],"contents":{{"bytes_contents":["dTQy"]}}}},
    {{"name":"merchant_id","datatype":"BYTES","shape":[1],"contents":{{"bytes_contents":["bTc="]}}}},
    {{"name":"amount","datatype":"FP32","shape":[1],"contents":{{"fp32_contents":[129.99]}}}}]}}' \\
    {endpoint} inference.GRPCInferenceService/ModelInfer
{http}
Inspect and load features (the feature service at {features_url}; writes need the write token):
  .venv/bin/infermesh features get user u42 --url {features_url}{features_tls}
  INFERMESH_FEATURE_WRITE_TOKEN=$(cat {mesh.write_token_file}) \\
    .venv/bin/infermesh features ingest user users.parquet --url {features_url}{features_tls}

Manage the models (admin key):
  INFERMESH_API_KEY={admin_key} .venv/bin/infermesh models list --url {endpoint}{score_tls}
  INFERMESH_API_KEY={admin_key} .venv/bin/infermesh models stats fraud --url {endpoint}{score_tls}
  tritonclient: grpcclient.InferenceServerClient("{endpoint}"{tritonclient_tls}).load_model(
    "fraud", headers={{"authorization": "Bearer {admin_key}"}})
{labels}
Ctrl-C stops everything.""",
            flush=True,
        )
        supervisor = Supervisor(mesh, say=lambda line: print(line, flush=True))
        while not stop.wait(0.2):
            supervisor.check()  # a crashed service is started again; only Ctrl-C stops the mesh
        print("stopping…", flush=True)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
