"""Unit tests of the model registry: checksum verification, loading, warm-up, forward passes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from infermesh.errors import InvalidInput, NotFound, Unavailable
from model_service.registry import ModelRegistry, resolve_device
from tests.model_service.models import PairModel, pair_config, tiny_fraud_module, write_model, write_model_config


def load(repo: Path) -> ModelRegistry:
    registry = ModelRegistry(repo, device="cpu")
    registry.load_all()
    return registry


def test_loads_and_predicts_every_output_in_declared_shape(small_repo: Path) -> None:
    registry = load(small_repo)
    assert registry.is_ready("pair") and registry.is_ready("tiny_fraud")
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.array([1, 2, 3, 4], dtype=np.float32)
    outputs = registry.get("pair").predict({"a": a, "b": b})
    assert set(outputs) == {"total", "doubled"}
    assert outputs["total"].shape == (4,)  # the model answers [N, 1]; the config declares [-1]
    np.testing.assert_array_equal(outputs["total"], a.sum(axis=1) + b)
    np.testing.assert_array_equal(outputs["doubled"], a * 2)
    assert outputs["total"].dtype == np.float32


def test_feature_spec_model_takes_the_joined_tensor(small_repo: Path) -> None:
    registry = load(small_repo)
    model = registry.get("tiny_fraud")
    assert [spec.name for spec in model.input_specs] == ["features"]
    features = np.random.default_rng(0).random((3, 13), dtype=np.float32)
    readonly = np.frombuffer(features.tobytes(), dtype=np.float32).reshape(3, 13)  # as decoded from raw bytes
    probability = model.predict({"features": readonly})["fraud_probability"]
    expected = tiny_fraud_module()(torch.from_numpy(features)).detach().numpy().reshape(3)
    np.testing.assert_allclose(probability, expected, rtol=1e-6)


WRONG_PIN = "sha256:" + "0" * 64


def test_pinned_digest_mismatch_is_refused_and_other_models_still_load(small_repo: Path) -> None:
    write_model_config(small_repo, {**pair_config(), "version_digests": {"1": WRONG_PIN}})
    registry = load(small_repo)
    assert not registry.is_ready("pair")
    assert registry.failures[("pair", "1")].startswith("SHA-256 mismatch: the weights have ")
    assert registry.failures[("pair", "1")].endswith("config.json pins " + "0" * 64)
    with pytest.raises(Unavailable, match="'pair' has no ready version"):
        registry.get("pair")
    with pytest.raises(Unavailable, match="'pair' version '1' is not ready"):
        registry.get("pair", "1")
    assert registry.is_ready("tiny_fraud")


def test_tampered_weights_are_refused_even_with_a_matching_sidecar(small_repo: Path) -> None:
    weights = small_repo / "tiny_fraud" / "1" / "model.pt"
    forged = weights.read_bytes() + b"\0"
    weights.write_bytes(forged)
    # Whoever can replace the weights can replace the sidecar beside them; the pin in config.json still holds.
    (weights.parent / "model.pt.sha256").write_text(hashlib.sha256(forged).hexdigest() + "  model.pt\n")
    registry = load(small_repo)
    assert not registry.is_ready("tiny_fraud")
    assert "SHA-256 mismatch" in registry.failures[("tiny_fraud", "1")]
    assert registry.is_ready("pair")


def test_a_version_without_a_pin_is_refused_unless_pins_are_optional(small_repo: Path) -> None:
    config = json.loads((small_repo / "pair" / "config.json").read_text())
    del config["version_digests"]
    (small_repo / "pair" / "config.json").write_text(json.dumps(config))
    registry = load(small_repo)
    assert not registry.is_ready("pair")
    assert registry.failures[("pair", "1")].startswith("no pinned digest: config.json has no version_digests entry")
    # Pins optional: the sidecar is checked instead, and a missing one is still refused.
    relaxed = ModelRegistry(small_repo, device="cpu", require_pinned_digest=False)
    relaxed.load_all()
    assert relaxed.is_ready("pair")
    (small_repo / "pair" / "1" / "model.pt.sha256").unlink()
    relaxed = ModelRegistry(small_repo, device="cpu", require_pinned_digest=False)
    relaxed.load_all()
    assert "missing checksum" in relaxed.failures[("pair", "1")]


def test_a_load_override_cannot_change_the_pins(small_repo: Path) -> None:
    registry = ModelRegistry(small_repo, device="cpu")
    forged = json.dumps({**pair_config(), "version_digests": {"1": WRONG_PIN}})
    plan = registry.plan("pair", forged)
    assert plan.config.version_digests["1"] != WRONG_PIN  # the repository's pin, not the override's
    registry.apply_config(plan)
    registry.put(registry.load_version(plan, "1"))
    assert registry.is_ready("pair")


class WrongWidth(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return b, a[:, :2]  # `doubled` is declared [-1, 3]


def test_model_not_matching_its_config_is_refused_at_warm_up(tmp_path: Path) -> None:
    write_model(tmp_path, pair_config(), WrongWidth())
    registry = load(tmp_path)
    assert not registry.is_ready("pair")
    assert "doubled" in registry.failures[("pair", "1")]


def test_version_resolution(tmp_path: Path) -> None:
    write_model(tmp_path, pair_config(), PairModel(), version="1")
    write_model(tmp_path, pair_config(), PairModel(), version="2")
    write_model(tmp_path, pair_config(), PairModel(), version="10")
    write_model_config(
        tmp_path, {**pair_config(), "version_policy": {"all": {}}, "version_digests": {"10": "sha256:" + "0" * 64}}
    )
    registry = load(tmp_path)
    assert registry.get("pair").version == "2"  # latest READY version: 10 was refused
    assert registry.get("pair", "1").version == "1"
    assert registry.ready_versions("pair") == ["1", "2"]
    with pytest.raises(NotFound, match="model 'pair' has no version '3'"):
        registry.get("pair", "3")
    with pytest.raises(Unavailable):
        registry.get("pair", "10")
    with pytest.raises(NotFound, match="model 'nope' not found"):
        registry.get("nope")


def test_auto_device_picks_cuda_only_when_available() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_autocast_answers_the_declared_fp32(small_repo: Path) -> None:
    cpu = load(small_repo)
    registry = ModelRegistry(small_repo, device="cuda", amp=True)
    registry.load_all()
    features = np.random.default_rng(1).random((4, 13), dtype=np.float32)
    on_gpu = registry.get("tiny_fraud").predict({"features": features})["fraud_probability"]
    assert on_gpu.dtype == np.float32 and on_gpu.shape == (4,)
    expected = cpu.get("tiny_fraud").predict({"features": features})["fraud_probability"]
    np.testing.assert_allclose(on_gpu, expected, atol=1e-2)  # float16 compute


def test_a_cuda_device_that_is_not_there_fails_at_start() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        with pytest.raises(ValueError, match="no CUDA device here"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda").type == "cuda"
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{count}")


@pytest.mark.parametrize("name", ["", ".hidden", "../pair", "pair\x00", "x" * 10_000, "pair/1"])
def test_a_name_that_is_no_model_folder_is_not_found_whatever_it_holds(small_repo: Path, name: str) -> None:
    """Names come from the repository API's caller: a NUL byte or a name longer than the file system allows made
    the lookup itself raise (INTERNAL to the caller)."""
    with pytest.raises(NotFound, match="is not in the model repository"):
        load(small_repo).plan(name)


def test_an_output_s_label_file_is_read_into_its_labels_at_load(small_repo: Path) -> None:
    """Triton's label_filename: the labels travel in the config (to the gateway's classification extension)."""
    (small_repo / "pair" / "labels.txt").write_text("x\ny\nz\n")
    config = pair_config()
    config["outputs"] = [
        {"name": "total", "datatype": "FP32", "shape": [-1]},
        {"name": "doubled", "datatype": "FP32", "shape": [-1, 3], "label_filename": "labels.txt"},
    ]
    plan = ModelRegistry(small_repo, device="cpu").plan("pair", json.dumps(config))
    assert [spec.labels for spec in plan.config.outputs] == [None, ["x", "y", "z"]]
    assert '"labels":["x","y","z"]' in plan.config_json  # what the router and the gateway are given


@pytest.mark.parametrize("filename", ["../labels.txt", "missing.txt", "1"])
def test_a_label_file_outside_the_model_s_folder_or_not_a_file_is_refused(small_repo: Path, filename: str) -> None:
    (small_repo / "labels.txt").write_text("outside\n")
    config = pair_config()
    config["outputs"] = [{"name": "total", "datatype": "FP32", "shape": [-1], "label_filename": filename}]
    with pytest.raises(InvalidInput, match=f"output 'total': label_filename '{filename}' is not a file"):
        ModelRegistry(small_repo, device="cpu").plan("pair", json.dumps(config))
