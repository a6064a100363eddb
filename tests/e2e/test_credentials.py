"""Credentials through the running gateway: JWTs signed by a trusted key (and the ways they fail), and API
keys rotated in the key file without a restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from demo.mesh import LocalMesh
from gateway.auth import hash_key
from tests.e2e.meshes import auth, fraud_inputs, token


async def outcome(client: aioclient.InferenceServerClient, authorization: str) -> str:
    """ "OK" or the status and message of one `fraud` request made with that credential."""
    try:
        await client.infer(
            "fraud", fraud_inputs(["u1"], ["m1"], [3.0]), headers={"authorization": f"Bearer {authorization}"}
        )
    except InferenceServerException as error:
        return f"{error.status()} {error.message()}"
    return "OK"


async def test_a_signed_token_is_a_credential_and_each_bad_one_is_refused(mesh: LocalMesh) -> None:
    now = int(time.time())
    async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
        assert await outcome(client, token()) == "OK"
        cases = {
            "token expired": token(exp=now - 120, iat=now - 600, nbf=now - 600),
            "token audience is not accepted": token(aud="someone-else"),
            "token issuer is not accepted": token(iss="https://evil.test"),
            "unknown signing key": token(kid="not-in-the-jwks"),
        }
        for message, credential in cases.items():
            assert await outcome(client, credential) == f"StatusCode.UNAUTHENTICATED {message}", message
        tampered = token()[:-4] + ("AAAA" if not token().endswith("AAAA") else "BBBB")
        assert (await outcome(client, tampered)).startswith("StatusCode.UNAUTHENTICATED")
        # The token's claims are its permissions: a model it does not list is PERMISSION_DENIED.
        denied = await outcome(client, token(models=["bench_mlp"]))
        assert denied.startswith("StatusCode.PERMISSION_DENIED")


async def wait_for(
    client: aioclient.InferenceServerClient, credential: str, wanted: str, timeout_s: float = 10
) -> None:
    deadline = time.monotonic() + timeout_s
    while (seen := await outcome(client, credential)).split(" ")[0] != wanted:
        assert time.monotonic() < deadline, f"still {seen} after {timeout_s}s"
        await asyncio.sleep(0.05)  # poll: the gateway re-reads the key file when it changes


async def test_api_keys_rotate_without_a_restart(mesh: LocalMesh) -> None:
    path = mesh.options.run_dir / "api_keys.json"
    original = path.read_text()
    new_key = "test-rotated-key-0123456789"
    document = json.loads(original)
    try:
        async with aioclient.InferenceServerClient(mesh.gateway_address) as client:
            assert (await outcome(client, new_key)).startswith("StatusCode.UNAUTHENTICATED")
            document["keys"].append({"sha256": hash_key(new_key), "tenant": "demo", "models": ["fraud"]})
            _replace(path, json.dumps(document))
            await wait_for(client, new_key, "OK")
            log = mesh.gateway.log_path
            warnings_before = log.read_text().count("not reloaded")
            _replace(path, "{not json")  # a broken file keeps the keys in force
            deadline = time.monotonic() + 10
            while log.read_text().count("not reloaded") == warnings_before:  # await the gateway's re-read
                assert time.monotonic() < deadline, "the gateway never looked at the broken key file"
                await asyncio.sleep(0.05)
            assert await outcome(client, new_key) == "OK"
            _replace(path, original)  # the new key revoked again
            await wait_for(client, new_key, "StatusCode.UNAUTHENTICATED")
            assert await outcome(client, auth()["authorization"].removeprefix("Bearer ")) == "OK"
    finally:
        _replace(path, original)


def _replace(path: Path, text: str) -> None:
    """Atomically, as a deploy tool writes a file (a reader never sees half of it)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)
