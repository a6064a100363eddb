"""Helpers to start the whole mesh as real processes for the end-to-end tests."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import numpy as np
from cryptography.hazmat.primitives.asymmetric import rsa
from tritonclient.grpc import InferInput  # the same class tritonclient.grpc.aio uses

from demo.mesh import ApiKey, LocalMesh, MeshOptions

DEMO_KEY = "test-demo-key-0123456789"
LIMITED_KEY = "test-limited-key-0123456789"
ALL_MODELS_KEY = "test-all-models-key-0123456789"
FLOOD_KEY = "test-flood-key-0123456789"  # tenant "flood": 20 requests/s, burst 10, 4 in flight
ADMIN_KEY = "test-admin-key-0123456789"  # tenant "admin", role admin: the repository API


JWT_ISSUER = "https://issuer.infermesh.test"
JWT_AUDIENCE = "infermesh-gateway"
JWT_KID = "test-signer-1"
# One signing key per test session; its public half is the JWKS the gateway trusts.
SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def auth(key: str = DEMO_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def token(kid: str = JWT_KID, **claims: Any) -> str:
    """A JWT as an identity provider would issue it for tenant "demo" (claims override the defaults)."""
    now = int(time.time())
    payload = {
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "tenant": "demo",
        "models": ["fraud"],
        **claims,
    }
    return jwt.encode(payload, SIGNING_KEY, algorithm="RS256", headers={"kid": kid})


def write_jwks(path: Path) -> Path:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(SIGNING_KEY.public_key()))
    path.write_text(json.dumps({"keys": [{**public, "kid": JWT_KID, "use": "sig", "alg": "RS256"}]}))
    return path


def repository_with_strict_variant(demo_dir: Path, target: Path, **fraud_overrides: object) -> Path:
    """Copy of the demo repository plus `fraud_strict`: the same model with on_missing=reject."""
    repository = target / "model_repository"
    shutil.copytree(demo_dir / "model_repository", repository)
    config_path = repository / "fraud" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(fraud_overrides)
    config_path.write_text(json.dumps(config))
    strict = repository / "fraud_strict"
    shutil.copytree(repository / "fraud", strict)
    config["name"] = "fraud_strict"
    config["feature_spec"]["on_missing"] = "reject"
    (strict / "config.json").write_text(json.dumps(config))
    return repository


def start_mesh(demo_dir: Path, run_dir: Path, **options: object) -> LocalMesh:
    repository = options.pop("model_repository", None) or repository_with_strict_variant(demo_dir, run_dir)
    gateway = {
        "jwks_path": write_jwks(run_dir / "jwks.json"),
        "jwt_issuer": JWT_ISSUER,
        "jwt_audience": JWT_AUDIENCE,
        "credentials_reload_s": 0.2,
        "http_port": 0,  # the HTTP/REST front on a free port
        **options.pop("gateway", {}),  # type: ignore[dict-item]
    }
    mesh_options = MeshOptions(
        demo_dir=demo_dir,
        run_dir=run_dir,
        api_keys=[
            ApiKey(DEMO_KEY, "demo", ["fraud", "fraud_strict", "bench_mlp"]),
            ApiKey(LIMITED_KEY, "limited", ["bench_mlp"]),
            ApiKey(ALL_MODELS_KEY, "ops", ["*"]),
            ApiKey(FLOOD_KEY, "flood", ["fraud"]),
            ApiKey(ADMIN_KEY, "admin", ["*"], role="admin"),
        ],
        tenants={"flood": {"rate_per_s": 20, "burst": 10, "max_inflight": 4}},
        model_repository=repository,
        gateway=gateway,
        **options,  # type: ignore[arg-type]
    )
    return LocalMesh(mesh_options).start()


def fraud_inputs(users: list[str], merchants: list[str], amounts: list[float]) -> list[InferInput]:
    """The `fraud` model's public inputs, raw, for tritonclient.grpc and tritonclient.grpc.aio alike."""
    inputs = [
        InferInput("user_id", [len(users)], "BYTES"),
        InferInput("merchant_id", [len(merchants)], "BYTES"),
        InferInput("amount", [len(amounts)], "FP32"),
    ]
    inputs[0].set_data_from_numpy(np.array([u.encode() for u in users], dtype=object))
    inputs[1].set_data_from_numpy(np.array([m.encode() for m in merchants], dtype=object))
    inputs[2].set_data_from_numpy(np.array(amounts, dtype=np.float32))
    return inputs


def metric(port: int, name: str, labels: str) -> float:
    """Sum of a metric's samples whose labels contain `labels`, scraped from a running service."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
