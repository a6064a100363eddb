"""Changing models while serving, through the gateway with tritonclient unchanged: Triton's repository API (admin
only), version policies, statistics, zero-downtime loads and unloads under load, poll mode, and memory that stays
flat over many loads and unloads."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from demo.mesh import ApiKey, LocalMesh, MeshOptions
from infermesh.model_config import MODEL_FILE, file_sha256, pin_version
from tests.e2e.meshes import DEMO_KEY, LIMITED_KEY, auth, fraud_inputs

ADMIN_KEY = "test-lifecycle-admin-key-0123456789"
FAST_CHANGES = {
    "model_service": {"unload_grace_s": 1.0},
    "router": {"repository_refresh_s": 0.1},
    "gateway": {"repository_refresh_s": 0.2},
}


def lifecycle_mesh(demo_dir: Path, run_dir: Path, **options: object) -> LocalMesh:
    """The mesh on its own copy of the demo repository (versions are added to it), with an admin key. `fraud` starts
    there as a model with one version and the default policy (the newest)."""
    repository = run_dir / "model_repository"
    shutil.copytree(demo_dir / "model_repository", repository)
    shutil.rmtree(repository / "fraud" / "2")
    config = json.loads((repository / "fraud" / "config.json").read_text())
    config.pop("version_policy", None)
    (repository / "fraud" / "config.json").write_text(json.dumps(config))
    settings = {**FAST_CHANGES, **options}
    mesh_options = MeshOptions(
        demo_dir=demo_dir,
        run_dir=run_dir,
        api_keys=[
            ApiKey(DEMO_KEY, "demo", ["fraud", "bench_mlp"]),
            ApiKey(LIMITED_KEY, "limited", ["bench_mlp"]),
            ApiKey(ADMIN_KEY, "ops", ["*"], role="admin"),
        ],
        model_repository=repository,
        **settings,  # type: ignore[arg-type]
    )
    return LocalMesh(mesh_options).start()


@pytest.fixture(scope="module")
def mesh(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = lifecycle_mesh(demo_dir, tmp_path_factory.mktemp("lifecycle"))
    yield mesh
    mesh.stop()


def add_version(mesh: LocalMesh, model: str, version: str) -> None:
    """A new version folder: a copy of version 1 (weights and checksum), pinned in the config and renamed into
    place in one step (as `infermesh models publish` does)."""
    folder = mesh.repository / model
    staging = folder / f".staging-{version}"
    shutil.copytree(folder / "1", staging)
    pin_version(folder, version, file_sha256(staging / MODEL_FILE))
    staging.rename(folder / version)


def fraud_config(mesh: LocalMesh, **changes: object) -> str:
    config = json.loads((mesh.repository / "fraud" / "config.json").read_text())
    config.update(changes)
    return json.dumps(config)


def index(client: grpcclient.InferenceServerClient, model: str) -> dict[str, str]:
    reply = client.get_model_repository_index(headers=auth(ADMIN_KEY), as_json=True)
    return {m.get("version", ""): m.get("state", "") for m in reply.get("models", []) if m["name"] == model}


def status_of(call: Callable[[], object]) -> str:
    try:
        call()
    except InferenceServerException as error:
        return str(error.status())
    return "OK"


def test_the_repository_api_is_for_admins_only(mesh: LocalMesh) -> None:
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    for key in (DEMO_KEY, LIMITED_KEY):
        for call in (
            lambda key=key: client.get_model_repository_index(headers=auth(key)),
            lambda key=key: client.load_model("fraud", headers=auth(key)),
            lambda key=key: client.unload_model("fraud", headers=auth(key)),
        ):
            assert status_of(call) == "StatusCode.PERMISSION_DENIED"
    assert status_of(lambda: client.get_model_repository_index()) == "StatusCode.UNAUTHENTICATED"
    assert index(client, "fraud") == {"1": "READY"}
    assert status_of(lambda: client.load_model("no_such_model", headers=auth(ADMIN_KEY))) == "StatusCode.NOT_FOUND"
    bad = lambda: client.load_model("fraud", config='{"name": "fraud", "inputs": 3}', headers=auth(ADMIN_KEY))  # noqa: E731
    assert status_of(bad) == "StatusCode.INVALID_ARGUMENT"
    assert client.get_server_metadata().extensions[:3] == ["model_repository", "model_configuration", "statistics"]


def test_statistics_count_what_was_served_and_each_tenant_sees_its_own_models(mesh: LocalMesh) -> None:
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    before = client.get_inference_statistics("fraud", headers=auth(), as_json=True)
    done = int(before["model_stats"][0]["inference_stats"].get("success", {}).get("count", 0)) if before else 0
    for _ in range(3):
        client.infer("fraud", fraud_inputs(["u1", "u2"], ["m1", "m2"], [10.0, 20.0]), headers=auth())
    stats = client.get_inference_statistics("fraud", headers=auth(), as_json=True)["model_stats"]
    (fraud,) = stats
    assert fraud["name"] == "fraud" and fraud["version"] == "1"
    inference = fraud["inference_stats"]
    assert int(inference["success"]["count"]) == done + 3
    assert int(inference["success"]["ns"]) > 0 and int(inference["compute_infer"]["ns"]) > 0
    assert int(fraud["inference_count"]) >= 6 and int(fraud["execution_count"]) >= 1
    assert int(fraud["last_inference"]) > (time.time() - 60) * 1000
    assert {int(b["batch_size"]) for b in fraud["batch_stats"]} >= {2}
    # A tenant sees only its models; one it may not use is PERMISSION_DENIED (names do not leak), not NOT_FOUND.
    limited = client.get_inference_statistics(headers=auth(LIMITED_KEY), as_json=True)["model_stats"]
    assert {s["name"] for s in limited} == {"bench_mlp"}
    denied = lambda: client.get_inference_statistics("fraud", headers=auth(LIMITED_KEY))  # noqa: E731
    assert status_of(denied) == "StatusCode.PERMISSION_DENIED"


class Traffic:
    """Clients sending `fraud` requests (no version: the newest ready one) until stopped; counts what came back."""

    def __init__(self, address: str, clients: int) -> None:
        self.address = address
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, index: int) -> None:
        client = grpcclient.InferenceServerClient(self.address)
        inputs = fraud_inputs([f"u{index}"], ["m1"], [42.0])
        while not self._stop.is_set():
            try:
                result = client.infer("fraud", inputs, headers=auth(), client_timeout=5)
            except InferenceServerException as error:
                with self._lock:
                    self.failures.append(f"{error.status()}: {error.message()}")
                continue
            with self._lock:
                self.versions[result.get_response().model_version] += 1

    def count(self, version: str) -> int:
        with self._lock:
            return self.versions[version]

    def wait_for(self, version: str, more: int = 20, timeout_s: float = 20.0) -> None:
        """Until `more` further answers came from `version`."""
        target = self.count(version) + more
        give_up = time.monotonic() + timeout_s
        while self.count(version) < target:
            assert time.monotonic() < give_up, f"no answers from version {version}: {dict(self.versions)}"
            time.sleep(0.02)


def test_versions_change_under_load_without_a_failed_request(mesh: LocalMesh) -> None:
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    admin = auth(ADMIN_KEY)
    add_version(mesh, "fraud", "2")
    assert index(client, "fraud") == {"1": "READY"}  # explicit mode: a new folder waits for a load
    with Traffic(mesh.gateway_address, clients=6) as traffic:
        traffic.wait_for("1")
        client.load_model("fraud", headers=admin)  # policy latest 1: version 2 in, version 1 out
        traffic.wait_for("2")
        assert index(client, "fraud") == {"1": "UNAVAILABLE", "2": "READY"}
        client.load_model(
            "fraud", config=fraud_config(mesh, version_policy={"specific": {"versions": [1]}}), headers=admin
        )
        traffic.wait_for("1")
        assert index(client, "fraud") == {"1": "READY", "2": "UNAVAILABLE"}
        both = fraud_config(mesh, version_policy={"all": {}})
        client.load_model("fraud", config=both, headers=admin)
        traffic.wait_for("2")  # no version asked: the newest ready one
        assert index(client, "fraud") == {"1": "READY", "2": "READY"}
        client.load_model("fraud", config=both, headers=admin)  # the same again: nothing changes
        client.load_model("fraud", headers=admin)  # back to the repository's config: latest 1
        traffic.wait_for("2")
    assert traffic.failures == []
    assert index(client, "fraud") == {"1": "UNAVAILABLE", "2": "READY"}
    config = client.get_model_config("fraud", headers=auth(), as_json=True)["config"]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    old = lambda: client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), model_version="1", headers=auth())  # noqa: E731
    assert status_of(old) == "StatusCode.UNAVAILABLE"
    unknown = lambda: client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), model_version="7", headers=auth())  # noqa: E731
    assert status_of(unknown) == "StatusCode.NOT_FOUND"


def test_a_smaller_batch_limit_loaded_under_load_fails_no_request(mesh: LocalMesh) -> None:
    """Requests already merging at the gateway and the router under the old limit are not refused by the new one."""
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    current = client.infer("fraud", fraud_inputs(["u1"], ["m1"], [1.0]), headers=auth()).get_response().model_version
    with Traffic(mesh.gateway_address, clients=12) as traffic:
        traffic.wait_for(current)
        client.load_model("fraud", config=fraud_config(mesh, max_batch_size=2), headers=auth(ADMIN_KEY))
        traffic.wait_for(current, more=100)
        client.load_model("fraud", headers=auth(ADMIN_KEY))
        traffic.wait_for(current)
    assert traffic.failures == []


def test_an_unloaded_model_stops_serving_and_loads_again(mesh: LocalMesh) -> None:
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    client.unload_model("bench_mlp", headers=auth(ADMIN_KEY))
    assert set(index(client, "bench_mlp").values()) == {"UNAVAILABLE"}
    assert not client.is_model_ready("bench_mlp", headers=auth())
    client.load_model("bench_mlp", headers=auth(ADMIN_KEY))
    assert set(index(client, "bench_mlp").values()) == {"READY"}
    assert client.is_model_ready("bench_mlp", headers=auth())


def test_a_tampered_version_is_refused_with_its_reason_while_the_honest_one_serves(mesh: LocalMesh) -> None:
    """Version 2 of `pinned` has weights changed after they were pinned, and a sidecar forged to match them: the
    model services refuse it (UNAVAILABLE, the reason in the repository index) and serve version 1."""
    folder = mesh.repository / "pinned"
    shutil.copytree(mesh.repository / "bench_mlp" / "1", folder / "1")
    shutil.copytree(mesh.repository / "bench_mlp" / "1", folder / "2")
    config = json.loads((mesh.repository / "bench_mlp" / "config.json").read_text())
    digest = config["version_digests"]["1"]
    config.update(name="pinned", version_policy={"all": {}}, version_digests={"1": digest, "2": digest})
    (folder / "config.json").write_text(json.dumps(config))
    weights = folder / "2" / MODEL_FILE
    weights.write_bytes(weights.read_bytes() + b"\0")  # still loads: a zip archive ignores trailing bytes
    (folder / "2" / (MODEL_FILE + ".sha256")).write_text(f"{file_sha256(weights)}  {MODEL_FILE}\n")

    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    admin = auth(ADMIN_KEY)
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("pinned", headers=admin)
    assert "version '2'" in refused.value.message() and "SHA-256 mismatch" in refused.value.message()
    reply = client.get_model_repository_index(headers=admin, as_json=True)
    states = {m["version"]: (m["state"], m.get("reason", "")) for m in reply["models"] if m["name"] == "pinned"}
    assert states["1"] == ("READY", "")
    assert states["2"][0] == "UNAVAILABLE" and states["2"][1].startswith("SHA-256 mismatch: the weights have ")
    x = grpcclient.InferInput("x", [1, 256], "FP32")
    x.set_data_from_numpy(np.ones((1, 256), dtype=np.float32))
    honest = client.infer("pinned", [x], model_version="1", headers=admin)
    assert honest.as_numpy("y").shape == (1, 256)
    tampered = lambda: client.infer("pinned", [x], model_version="2", headers=admin)  # noqa: E731
    assert status_of(tampered) == "StatusCode.UNAVAILABLE"


def test_a_config_fetched_in_triton_s_form_loads_back_changed(mesh: LocalMesh) -> None:
    """Triton's round trip: get_model_config(as_json=True), change it, load_model(config=...)."""
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    admin = auth(ADMIN_KEY)
    config = client.get_model_config("bench_mlp", headers=admin, as_json=True)["config"]
    assert int(config["max_batch_size"]) == 256
    config["max_batch_size"] = 32
    client.load_model("bench_mlp", config=json.dumps(config), headers=admin)
    changed = client.get_model_config("bench_mlp", headers=admin, as_json=True)["config"]
    assert int(changed["max_batch_size"]) == 32
    x = grpcclient.InferInput("x", [33, 256], "FP32")
    x.set_data_from_numpy(np.zeros((33, 256), dtype=np.float32))
    too_many = lambda: client.infer("bench_mlp", [x], headers=auth())  # noqa: E731
    assert status_of(too_many) == "StatusCode.INVALID_ARGUMENT"  # the new max_batch_size is in force
    client.load_model("bench_mlp", headers=admin)  # the folder's config again
    assert int(client.get_model_config("bench_mlp", headers=admin, as_json=True)["config"]["max_batch_size"]) == 256


def test_a_label_file_loaded_with_a_config_names_the_classes_of_the_classification_extension(mesh: LocalMesh) -> None:
    """Triton's label_filename, read by the model service at load, reaches the gateway with the config: class_count
    answers "<value>:<index>:<label>" (Triton's format) with the model's real top classes."""
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    admin = auth(ADMIN_KEY)
    (mesh.repository / "bench_mlp" / "classes.txt").write_text("".join(f"class-{i}\n" for i in range(256)))
    config = client.get_model_config("bench_mlp", headers=admin, as_json=True)["config"]
    config["output"][0]["label_filename"] = "classes.txt"
    client.load_model("bench_mlp", config=json.dumps(config), headers=admin)
    try:
        served = client.get_model_config("bench_mlp", headers=admin, as_json=True)["config"]
        assert served["output"][0]["label_filename"] == "classes.txt"  # Triton's config round trip keeps it
        x = grpcclient.InferInput("x", [2, 256], "FP32")
        x.set_data_from_numpy(np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32))
        values = client.infer("bench_mlp", [x], headers=auth()).as_numpy("y")
        top = [grpcclient.InferRequestedOutput("y", class_count=3)]
        classes = client.infer("bench_mlp", [x], outputs=top, headers=auth()).as_numpy("y")
        assert classes.shape == (2, 3)
        for row in range(2):
            best = np.argsort(-values[row], kind="stable")[:3]
            parsed = [entry.decode().split(":") for entry in classes[row]]
            assert [int(index) for _, index, _ in parsed] == list(best)
            assert [label for _, _, label in parsed] == [f"class-{i}" for i in best]
            assert [float(v) for v, _, _ in parsed] == pytest.approx(values[row][best], abs=1e-5)
    finally:
        client.load_model("bench_mlp", headers=admin)  # the folder's config again


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_loading_and_unloading_a_hundred_times_leaves_memory_flat(demo_dir: Path, tmp_path: Path) -> None:
    # No traffic here, so no grace is needed before a version leaves: the cycles run at the speed of loading.
    mesh = lifecycle_mesh(demo_dir, tmp_path, model_service={"unload_grace_s": 0.0})
    try:
        cycles(mesh)
    finally:
        mesh.stop()


def cycles(mesh: LocalMesh) -> None:
    client = grpcclient.InferenceServerClient(mesh.gateway_address)
    admin = auth(ADMIN_KEY)

    def cycle() -> None:
        client.unload_model("bench_mlp", headers=admin)
        client.load_model("bench_mlp", headers=admin)

    for _ in range(10):  # allocators and caches settle first
        cycle()
    processes = {p.name: p.process.pid for p in mesh.processes() if p.process is not None}
    before = {name: rss_mib(pid) for name, pid in processes.items()}
    for _ in range(90):
        cycle()
    grown = {name: rss_mib(pid) - before[name] for name, pid in processes.items()}
    assert all(growth < 20 for growth in grown.values()), grown
    assert set(index(client, "bench_mlp").values()) == {"READY"}


def test_poll_mode_serves_a_new_version_by_itself(demo_dir: Path, tmp_path: Path) -> None:
    polled = lifecycle_mesh(
        demo_dir, tmp_path, model_service={"unload_grace_s": 0.3, "repository_poll_s": 0.2}, replicas=1
    )
    try:
        client = grpcclient.InferenceServerClient(polled.gateway_address)
        with Traffic(polled.gateway_address, clients=2) as traffic:
            traffic.wait_for("1")
            add_version(polled, "fraud", "2")
            traffic.wait_for("2")
        assert traffic.failures == []
        give_up = time.monotonic() + 10
        while index(client, "fraud") != {"1": "UNAVAILABLE", "2": "READY"}:  # version 1 drains after its grace
            assert time.monotonic() < give_up, index(client, "fraud")
            time.sleep(0.05)
    finally:
        polled.stop()
